"""``python -m infinite.sim``: lending off vs on over a mixed long+short trace."""

from __future__ import annotations

import argparse

from infinite.sim.simulator import SimConfig, compare_lending, mixed_trace


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2048, help="KV blocks per instance")
    ap.add_argument("--short", type=int, default=200, help="number of short requests")
    ap.add_argument("--long", type=int, default=6, help="number of long requests (larger than one instance)")
    args = ap.parse_args(argv)
    cfg = SimConfig(num_instances=args.instances, blocks_per_instance=args.blocks)
    trace = mixed_trace(args.seed, num_short=args.short, num_long=args.long)
    res = compare_lending(trace, cfg)
    cols = ["served", "rejected", "unfinished", "generated_tokens", "makespan_s", "throughput_tok_s",
            "mean_latency_s", "preemptions", "moves", "blocks_moved"]
    print(f"trace: {len(trace)} requests ({args.short} short, {args.long} long), "
          f"{args.instances} instances x {args.blocks} blocks x {cfg.block_size} tokens")
    print(f"{'metric':<18}" + "".join(f"{k:>14}" for k in res))
    for c in cols:
        vals = [getattr(r, c) for r in res.values()]
        print(f"{c:<18}" + "".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v:>14d}" for v in vals))


if __name__ == "__main__":
    main()
