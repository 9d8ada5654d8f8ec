"""``python -m infinite.bench NAME [args]``: run ``infinite.bench.NAME.main(args)``.

Imports are lazy so that a bench module that is missing (or whose own imports
fail) gives a clear message naming it instead of breaking every bench.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from infinite.bench import BENCHES

USAGE = (
    f"usage: python -m infinite.bench {{{','.join(BENCHES)}}} [args]\n"
    "  offline  generated tokens/s of Infinite vs transformers.generate (batch 1 and 16)\n"
    "  kernels  decode MicroAttention speed against the memory-bandwidth limit\n"
    "  gpu      one instance on one GPU: kernels, decode with/without graphs, GPU busy, prefill, agreement\n"
    "  cluster  distributed runtime: throughput and KV lending across instances\n"
    "  serve    online serving benchmark against an OpenAI-compatible server\n"
    "  grammar  structured-output overhead per decode step (llguidance masks in the sampler)\n"
    "  soak     mixed streaming load while a rank is killed and a new one joins\n"
    "  prefix   the prefix cache on and off: shared documents, multi-turn chat, a prefix on another instance\n"
    "Run `python -m infinite.bench NAME --help` for a bench's own options."
)


def load_bench(name: str):
    """The bench module ``infinite.bench.<name>``; ValueError for an unknown or missing one."""
    if name not in BENCHES:
        raise ValueError(f"unknown bench {name!r}: choose from {', '.join(BENCHES)}")
    module = f"infinite.bench.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ValueError(f"bench {name!r} is not available: module {module} does not exist yet") from e
        raise
    if not callable(getattr(mod, "main", None)):
        raise ValueError(f"bench {name!r} is not runnable: {module} has no main(argv)")
    return mod


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    try:
        mod = load_bench(args[0])
    except ValueError as e:
        print(f"error: {e}\n{USAGE}", file=sys.stderr)
        return 2
    rc = mod.main(args[1:])
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
