"""Benchmarks, run as ``python -m infinite.bench {offline,kernels,cluster,serve,grammar} [args]``.

Each benchmark is a module here with ``main(argv) -> int``; the dispatcher in
``__main__`` imports only the one asked for, so one bench's heavy or missing
dependencies never break the others.
"""

BENCHES = ("offline", "kernels", "cluster", "serve", "grammar", "soak")

__all__ = ["BENCHES"]
