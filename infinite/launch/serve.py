"""``torchrun --nproc-per-node N -m infinite.launch.serve [infinite serve flags]``

Rank r is instance r; rank 0 also runs the gManager and the HTTP front-end.
With ``--tensor-parallel-size T`` every T consecutive torchrun ranks are one
instance (torchrun rank r is rank r % T of instance r // T), so a node's ranks
form whole groups when T divides ``--nproc-per-node``. torchrun's rendezvous (env://) is reused for RPC, so
multi-node works the way torchrun does (--nnodes, --rdzv-endpoint, ...).
Works with N=1. Each process runs on cuda:LOCAL_RANK when there are GPUs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from infinite.cli import build_parser, engine_config, server_settings
from infinite.cluster.rank import RankOptions, run_rank
from infinite.launch.http import http_front_end


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(prog="python -m infinite.launch.serve").parse_args(["serve", *(argv or sys.argv[1:])])
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except KeyError as e:
        print(f"infinite.launch.serve: {e.args[0]} is not set: start it with torchrun", file=sys.stderr)
        return 2
    tp = args.tensor_parallel_size
    if tp < 1 or world % tp:
        print(f"infinite.launch.serve: --tensor-parallel-size {tp} does not divide the {world} ranks torchrun "
              "started", file=sys.stderr)
        return 2
    args.num_instances = world // tp
    config = engine_config(args)

    def listening(host: str, port: int) -> None:
        print(f"infinite: listening on http://{host}:{port} ({world // tp} instances)", flush=True)

    # watch_parent: a worker whose torchrun agent was killed outright (SIGKILL: no chance to stop
    # its workers) stops too instead of lingering as an orphan.
    opts = RankOptions(rank // tp, world // tp, "env://", local_world_size=local_world, log_level=args.log_level,
                       watch_parent=True, tp_rank=rank % tp, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return run_rank(config, opts, http_front_end(server_settings(args), args.host, args.port, listening))


if __name__ == "__main__":
    sys.exit(main())
