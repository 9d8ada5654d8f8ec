"""``infinite join --cluster HOST:PORT``: add an instance to a running cluster.

HOST:PORT is the cluster's store: what ``infinite serve --num-instances N``
prints at start-up, or torchrun's ``MASTER_ADDR:MASTER_PORT``. The new rank
reads the cluster's engine config from it, takes a fresh rank id, joins
torch RPC's dynamic group, loads the model, announces itself to rank 0 and
starts taking requests and lending its pool. SIGTERM makes it leave again
(drained: its requests move, the blocks it lent come back).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from infinite.cluster import rpc_membership
from infinite.cluster.rank import RankOptions, run_rank
from infinite.runtime.config import EngineConfig

log = logging.getLogger("infinite.join")


def add_join_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, metavar="HOST:PORT",
                   help="the running cluster's store (printed by `infinite serve`; torchrun's MASTER_ADDR:MASTER_PORT)")
    p.add_argument("--model", default=None,
                   help="the checkpoint folder on this host (default: the path the cluster uses)")
    p.add_argument("--threads-per-rank", type=int, default=None, help="torch CPU threads (default: the cluster's)")
    p.add_argument("--device", default=None,
                   help="cpu|cuda[:N]: the device of this instance (default: the cluster's setting, on cuda:0; "
                        "give a free GPU on a host that already runs ranks)")
    p.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for the cluster (default 120)")
    p.add_argument("--log-level", default="info", type=str.lower, choices=["debug", "info", "warning", "error"])


def run_join(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        ticket = rpc_membership.claim(args.cluster, args.join_timeout)
    except (ValueError, TimeoutError, RuntimeError) as e:
        print(f"infinite join: cannot join {args.cluster}: {e}", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("model", args.model), ("threads_per_rank", args.threads_per_rank),
                                   ("device", args.device)) if v is not None}
    config = EngineConfig(**{**ticket.config.__dict__, **overrides})
    if config.tensor_parallel_size > 1:
        print(f"infinite join: the cluster at {args.cluster} runs tensor-parallel instances "
              f"(--tensor-parallel-size {config.tensor_parallel_size}); an instance cannot join it: its ranks would "
              "need the point-to-point group fixed at the cluster's start", file=sys.stderr)
        return 2
    print(f"infinite: joining the cluster at {args.cluster} as rank {ticket.rank}", flush=True)
    opts = RankOptions(ticket.rank, ticket.rank + 1, ticket.init_method, local_world_size=1, log_level=args.log_level,
                       joining=True, start_timeout_s=args.join_timeout, local_rank=0)
    return run_rank(config, opts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infinite join", description=__doc__.splitlines()[0])
    add_join_args(p)
    return run_join(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
