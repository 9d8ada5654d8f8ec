"""``torchrun --nproc-per-node N -m infinite.launch.serve [infinite serve flags]``

Rank r is instance r; rank 0 also runs the gManager and the HTTP front-end.
torchrun's rendezvous (env://) is reused for RPC, so multi-node works the
way torchrun does (--nnodes, --rdzv-endpoint, ...). Works with N=1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from infinite.cli import add_serve_args, engine_config, server_settings
from infinite.cluster.rank import ServeArgs, run_rank


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infinite.launch.serve",
                                     description="one rank of an Infinite cluster (under torchrun)")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except KeyError as e:
        print(f"infinite.launch.serve: {e.args[0]} is not set: start it with torchrun", file=sys.stderr)
        return 2
    args.num_instances = world
    config = engine_config(args)
    if config.device is None:
        import torch

        if torch.cuda.is_available():
            config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    settings = server_settings(args)

    def listening(host: str, port: int) -> None:
        print(f"infinite: listening on http://{host}:{port} ({world} instances)", flush=True)

    return run_rank(rank, world, config, master_port=None, role="serve" if rank == 0 else "worker",
                    serve=ServeArgs(args.host, args.port, settings, listening),
                    num_threads=max(1, (os.cpu_count() or 1) // local_world))


if __name__ == "__main__":
    sys.exit(main())
