"""``python -m infinite.sim paper`` and ``sweep``: the paper's comparison, and scaling plots.

``paper``: Llama2-7B on 32 A100s (4 nodes x 8), every trace, each policy;
throughput of infinite over vllm-multi on the short traces and over
vllm-single on the long ones, and the longest request each can hold, beside
the paper's figures (1.35-1.73x, 1.4-3.4x, 2-19x); also over the paper's own
baselines (vllm-multi-paper: no chunked prefill; vllm-single-tp) and the
busy fraction of infinite's GPUs.

``sweep``: throughput and the longest request that fits against the number
of GPUs, per policy, as a table, JSON and (with matplotlib) two plots.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from infinite.bench.common import print_table, write_json
from infinite.sim.report import plot
from infinite.sim.runner import Setup, make_trace, run_policy, setup_from
from infinite.sim.traces import REPRESENTATIVE, TRACES

PAPER = {"short": (1.35, 1.73), "long": (1.4, 3.4), "context": (2.0, 19.0)}
BASELINE = {"short": "vllm-multi", "long": "vllm-single"}


def _args(argv: Sequence[str], sweep: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m infinite.sim {'sweep' if sweep else 'paper'}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", default="a100")
    ap.add_argument("--model", default="llama2-7b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds of arrivals (default: 300 for short traces, 1800 for long)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--plan-interval", type=float, default=0.5)
    if sweep:
        ap.add_argument("--trace", default="mixed")
        ap.add_argument("--gpus", default="8,16,32,64,128", help="comma-separated GPU counts")
        ap.add_argument("--policies", default="infinite,vllm-multi,vllm-single")
        ap.add_argument("--plots", default="docs", help="folder for the PNG plots")
        ap.add_argument("--json", default="bench-results/sim-sweep.json")
    else:
        ap.add_argument("--gpus", type=int, default=32)
        ap.add_argument("--traces", default=",".join(TRACES))
        ap.add_argument("--best-static", default=",".join(REPRESENTATIVE[k] for k in ("short", "long")),
                        help="traces on which best-static is also run (it simulates every mix)")
        ap.add_argument("--json", default="bench-results/sim-paper.json")
    return ap.parse_args(argv)


def _setup(args: argparse.Namespace, gpus: int) -> Setup:
    return setup_from(args.gpu, args.model, gpus, max_num_batched_tokens=args.max_num_batched_tokens,
                      plan_interval_s=args.plan_interval)


def _duration(args: argparse.Namespace, family: str) -> float:
    return args.duration if args.duration is not None else (300.0 if family == "short" else 1800.0)


def compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    setup = _setup(args, args.gpus)
    best = set(args.best_static.split(",")) if args.best_static else set()
    rows = []
    for name in args.traces.split(","):
        spec = TRACES[name]
        trace, info = make_trace(name, setup, _duration(args, spec.family), args.seed)
        runs = {}
        for p in ("infinite", "vllm-multi", "vllm-multi-routed", "vllm-multi-paper", "vllm-single", "vllm-single-tp") + \
                (("best-static",) if name in best else ()):
            runs[p] = run_policy(p, setup, trace)
            r = runs[p]
            print(f"  {name:17s} {p:12s} {r['throughput_tokens_per_s']:10.0f} tok/s  "
                  f"{r['requests_completed']}/{r['requests_offered']} done  wall {r['wall_s']:.1f}s", flush=True)
        def over(b: str) -> float | None:
            t = runs[b]["throughput_tokens_per_s"]
            return runs["infinite"]["throughput_tokens_per_s"] / t if t else None

        ratio = over(BASELINE[spec.family])
        ctx = runs["infinite"]["capacity_tokens"] / runs["vllm-multi"]["capacity_tokens"]
        lo, hi = PAPER[spec.family]
        rows.append({
            "trace": name, "family": spec.family, "requests": len(trace), "description": info["description"],
            "baseline": BASELINE[spec.family], "ratio": ratio, "paper": f"{lo}-{hi}x",
            "ratios": {b: over(b) for b in runs if b != "infinite"},
            "within_or_above": ratio is not None and ratio >= lo,
            "max_context_ratio": ctx, "runs": runs,
        })
    return rows


def main(argv: Sequence[str]) -> int:
    args = _args(argv, sweep=False)
    rows = compare(args)
    cols = ["trace", "baseline", "infinite tok/s", "baseline tok/s", "ratio", "paper", "x multi", "x routed",
            "x multi-paper", "x single", "x single-tp", "inf busy", "inf groups", "inf served", "base served",
            "inf max ctx", "multi capacity", "ctx ratio"]
    table = []
    for r in rows:
        inf, base = r["runs"]["infinite"], r["runs"][r["baseline"]]
        x = r["ratios"]
        table.append([r["trace"], r["baseline"], inf["throughput_tokens_per_s"], base["throughput_tokens_per_s"],
                      r["ratio"], r["paper"], x["vllm-multi"], x["vllm-multi-routed"], x["vllm-multi-paper"],
                      x["vllm-single"], x["vllm-single-tp"], inf["busy_fraction"], inf["prefill_groups"],
                      f"{inf['requests_completed']}/{inf['requests_offered']}",
                      f"{base['requests_completed']}/{base['requests_offered']}", inf["max_context_served"],
                      r["runs"]["vllm-multi"]["capacity_tokens"], r["max_context_ratio"]])
    print_table(f"{args.gpus} x {args.gpu}, {args.model}: infinite against the paper's baselines", cols, table)
    path = write_json(args.json, {"gpus": args.gpus, "gpu": args.gpu, "model": args.model, "paper": PAPER,
                                  "rows": rows})
    print(f"wrote {path}")
    return 0


def sweep_main(argv: Sequence[str]) -> int:
    args = _args(argv, sweep=True)
    policies = args.policies.split(",")
    points: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    table = []
    for n in (int(x) for x in args.gpus.split(",")):
        setup = _setup(args, n)
        name = REPRESENTATIVE.get(args.trace, args.trace)
        trace, _ = make_trace(name, setup, _duration(args, TRACES[name].family), args.seed)
        for p in policies:
            try:
                r = run_policy(p, setup, trace)
            except ValueError as err:
                print(f"  {n} GPUs {p}: not possible: {err}")
                continue
            points[p].append({"gpus": n, **r})
            table.append([n, p, len(trace), r["throughput_tokens_per_s"], r["requests_completed"],
                          r["capacity_tokens"], r["max_context_served"], r["wall_s"]])
            print(f"  {n:5d} GPUs {p:12s} {r['throughput_tokens_per_s']:10.0f} tok/s wall {r['wall_s']:.1f}s", flush=True)
    print_table(f"{args.gpu}, {args.model}, trace {args.trace}: scaling",
                ["gpus", "policy", "requests", "tok/s", "completed", "capacity tokens", "max served", "wall_s"], table)
    thr = {p: [(x["gpus"], x["throughput_tokens_per_s"]) for x in pts] for p, pts in points.items()}
    ctx = {p: [(x["gpus"], x["capacity_tokens"]) for x in pts] for p, pts in points.items()}
    made = [plot(thr, "GPUs", "tokens/s", f"throughput, {args.model} on {args.gpu}, trace {args.trace}",
                 f"{args.plots}/sim-throughput.png", logy=True),
            plot(ctx, "GPUs", "tokens", f"longest request that fits, {args.model} on {args.gpu}",
                 f"{args.plots}/sim-max-context.png", logy=True)]
    if None in made:
        print("matplotlib is not installed (pip install 'infinite[sim]'): no plots written")
    else:
        print("wrote " + ", ".join(made))
    path = write_json(args.json, {"gpu": args.gpu, "model": args.model, "trace": args.trace, "points": points})
    print(f"wrote {path}")
    return 0
