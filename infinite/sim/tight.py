"""``python -m infinite.sim tight``: where does lending pay when memory is tight but every request
fits one pool? A search over the cluster bench's trace family on the measured ``cpu`` device.

Why a search: the lending issue asks for a trace where lending beats the same cluster without it
(same routing) by 1.3x on this machine, or evidence that none exists. Each point is the bench's own
workload generator (``infinite.bench.workload.make_workload``: the same seeded requests the
LocalCluster bench serves), simulated with lending on and off on 2 instances of the embedded
model; the ratio is output tokens/s over the makespan, the bench's headline measure.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infinite.cluster.policy import LendingPolicy
from infinite.sim.engine import SimConfig, simulate
from infinite.bench.common import print_table
from infinite.sim.report import summarize
from infinite.sim.traces import TraceRequest

__all__ = ["TightPoint", "grid", "point_trace", "evaluate", "main"]

BLOCK = 16
VOCAB = (3, 250)  # ids are irrelevant to the simulator; only lengths and arrivals matter


@dataclass(frozen=True)
class TightPoint:
    """One trace of the family: long requests that take ``fill`` of one pool each, short ones streaming in."""

    fill: float  # a long request's prompt + output, as a fraction of one pool
    num_long: int
    num_short: int
    rate: float  # Poisson arrivals, requests/s
    short_output: tuple[int, int]
    pool_blocks: int = 96
    ranks: int = 2

    def long_lengths(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(prompt range, output range) of a long request: a quarter of it generated, all of it in one pool."""
        total = int(self.fill * self.pool_blocks * BLOCK)
        out = max(1, total // 4)
        return (total - out - 32, total - out), (out - 32, out)


def grid(pool_blocks: int = 96, ranks: int = 2) -> list[TightPoint]:
    """The searched points: how full a long request makes its pool, how many, how fast short ones come."""
    return [TightPoint(fill, n_long, 80, rate, out, pool_blocks, ranks)
            for fill, n_long, rate, out in itertools.product(
                (0.5, 0.7, 0.85, 0.95), (2, 4, 8), (4.0, 8.0, 16.0, 40.0), ((32, 96), (64, 128), (128, 256)))]


def point_trace(p: TightPoint, seed: int) -> list[TraceRequest]:
    from infinite.bench.workload import make_workload

    lp, lo = p.long_lengths()
    work = make_workload(p.num_long, p.num_short, lp, lo, (64, 160), p.short_output, p.rate, VOCAB, seed)
    return [TraceRequest(w.request_id, w.arrival_s, len(w.prompt), w.max_tokens) for w in work]


def evaluate(p: TightPoint, spec, model, seed: int = 0) -> dict[str, Any]:
    """Lending on and off (both routed by the gManager's rule) on the same trace; their tokens/s ratio.

    ``on`` follows the runtime (no loan or move for throughput before remote steps were measured,
    which on this family means none: every request fits a pool); ``eager`` lends on the cost
    model from its first fit, so the search also shows what lending for throughput would buy."""
    trace = point_trace(p, seed)
    runs = {}
    for name, lending, eager in (("on", True, False), ("eager", True, True), ("off_routed", False, False)):
        cfg = SimConfig(spec, model, (1,) * p.ranks, lending, kv_blocks=p.pool_blocks, max_num_batched_tokens=2048,
                        max_num_seqs=64, drain_s=1e6, policy=LendingPolicy(eager=eager))
        runs[name] = summarize(simulate(trace, cfg))
    off = runs["off_routed"]["output_tokens_per_s"]

    def ratio(name: str) -> float:
        return runs[name]["output_tokens_per_s"] / off if off > 0 else float("inf")

    return {"point": asdict(p), **runs, "ratio": ratio("on"), "eager_ratio": ratio("eager")}


def _args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m infinite.sim tight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=None, help="cpu constants (default: the last `validate` fit)")
    ap.add_argument("--pool-blocks", type=int, default=96)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2", help="each point's ratio is the median over these seeds")
    ap.add_argument("--top", type=int, default=10, help="rows printed, best ratio first")
    ap.add_argument("--json", default="bench-results/sim-tight.json")
    return ap.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    import statistics

    from infinite.runtime.engine import resolve_model_dir
    from infinite.sim.cpu import cpu_spec
    from infinite.sim.models import ModelSpec

    args = _args(argv)
    spec = cpu_spec(args.spec)
    model = ModelSpec.from_dir(resolve_model_dir(None), dtype_bytes=4)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for p in grid(args.pool_blocks, args.ranks):
        evals = [evaluate(p, spec, model, s) for s in seeds]
        rows.append({"point": asdict(p), "ratio": statistics.median(e["ratio"] for e in evals),
                     "ratios": [e["ratio"] for e in evals],
                     "eager_ratio": statistics.median(e["eager_ratio"] for e in evals),
                     "eager_tokens_per_s": statistics.median(e["eager"]["output_tokens_per_s"] for e in evals),
                     "eager_blocks_lent": sum(e["eager"]["blocks_borrowed"] + e["eager"]["blocks_moved"] for e in evals),
                     "on_tokens_per_s": statistics.median(e["on"]["output_tokens_per_s"] for e in evals),
                     "off_tokens_per_s": statistics.median(e["off_routed"]["output_tokens_per_s"] for e in evals),
                     "blocks_borrowed": sum(e["on"]["blocks_borrowed"] for e in evals),
                     "preemptions_on_off": (sum(e["on"]["preemptions"] for e in evals),
                                            sum(e["off_routed"]["preemptions"] for e in evals))})
    rows.sort(key=lambda r: (-r["eager_ratio"], -r["ratio"]))
    cols = ["fill", "long", "rate/s", "short out", "off tok/s", "on/off", "eager/off", "eager lent", "borrowed (on)",
            "preempt on/off"]
    table = [[r["point"]["fill"], r["point"]["num_long"], r["point"]["rate"], "-".join(map(str, r["point"]["short_output"])),
              round(r["off_tokens_per_s"]), round(r["ratio"], 3), round(r["eager_ratio"], 3), r["eager_blocks_lent"],
              r["blocks_borrowed"], "/".join(map(str, r["preemptions_on_off"]))] for r in rows[:args.top]]
    print_table(f"lending on / off-routed, {args.ranks} x {args.pool_blocks} blocks, cpu device, "
                f"{len(rows)} traces, median of seeds {seeds}", cols, table)
    for key, what in (("ratio", "on (the runtime's rule)"), ("eager_ratio", "eager (lending for throughput)")):
        vals = [r[key] for r in rows]
        print(f"{what}: best {max(vals):.3f}, worst {min(vals):.3f} of off-routed; >= 1.3 on "
              f"{sum(v >= 1.3 for v in vals)} of {len(vals)} traces, < 0.95 on {sum(v < 0.95 for v in vals)}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": spec.to_dict(), "seeds": seeds, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")
    return 0
