"""Benchmarks, run as ``python -m infinite.bench {offline,kernels,gpu,cluster,serve,grammar,soak,prefix} [args]``.

Each benchmark is a module here with ``main(argv) -> int``; the dispatcher in
``__main__`` imports only the one asked for, so one bench's heavy or missing
dependencies never break the others.
"""

BENCHES = ("offline", "kernels", "gpu", "cluster", "serve", "grammar", "soak", "prefix")

__all__ = ["BENCHES"]
