"""``python -m infinite.sim``: simulate a deployment on a trace; ``paper``, ``sweep``, ``validate``, ``tight``.

    python -m infinite.sim --gpus 32 --gpu a100 --model llama2-7b --trace short --policy infinite --json out.json
    python -m infinite.sim paper      # Llama2-7B on 32 A100s against the paper's figures (docs/sim.md)
    python -m infinite.sim sweep      # throughput and max context vs GPUs, plots in docs/
    python -m infinite.sim validate   # the simulator against LocalCluster on this machine's CPU
    python -m infinite.sim tight      # where lending pays on this CPU when every request fits one pool

Each prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infinite.bench.common import print_table, write_json
from infinite.cluster.sp_policy import GroupPolicy
from infinite.sim.policies import POLICIES
from infinite.sim.report import SUMMARY_COLUMNS, table_rows
from infinite.sim.runner import make_trace, run_policy, setup_from
from infinite.sim.traces import REPRESENTATIVE, TRACES

COMMANDS = ("run", "paper", "sweep", "validate", "tight")


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpu", default="a100", help="a100 | h100 | h200 | cpu (constants measured by validate)")
    ap.add_argument("--model", default="llama2-7b", help="llama2-7b | llama2-13b | llama2-70b | checkpoint DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--plan-interval", type=float, default=0.5, help="seconds between placement runs")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192,
                    help="token budget of a step (vLLM v1's server default on large-memory GPUs)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-blocks", type=int, default=None,
                    help="KV blocks per instance (default: what the devices hold after the weights)")
    ap.add_argument("--groups", choices=("on", "off"), default="on",
                    help="infinite: prefill long prompts on groups of idle instances (sp_policy)")
    d = GroupPolicy()
    ap.add_argument("--group-min-tokens", type=int, default=d.min_prompt_tokens, help="GroupPolicy.min_prompt_tokens")
    ap.add_argument("--group-min-speedup", type=float, default=d.min_speedup, help="GroupPolicy.min_speedup")
    ap.add_argument("--group-min-efficiency", type=float, default=d.min_efficiency,
                    help="GroupPolicy.min_efficiency")
    ap.add_argument("--json", default=None, help="write the results here")


def _knobs(args: argparse.Namespace) -> dict:
    out = dict(block_size=args.block_size, plan_interval_s=args.plan_interval,
               max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    if args.groups == "off":
        out["groups"] = None
    else:
        pol = GroupPolicy(min_prompt_tokens=args.group_min_tokens, min_speedup=args.group_min_speedup,
                          min_efficiency=args.group_min_efficiency)
        if pol != GroupPolicy():
            out["groups"] = pol
    if getattr(args, "drain", None) is not None:
        out["drain_s"] = args.drain
    if args.kv_blocks is not None:
        out["kv_blocks"] = args.kv_blocks
    return out


def parse_run(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m infinite.sim", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ap)
    ap.add_argument("--gpus", type=int, default=32)
    names = ", ".join([*REPRESENTATIVE, *TRACES])
    ap.add_argument("--trace", default="short", help=f"{names}, or a JSON-lines FILE")
    ap.add_argument("--policy", default="infinite", help=" | ".join(POLICIES) + " | all")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (generated traces)")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: the trace's per-GPU rate)")
    ap.add_argument("--drain", type=float, default=3600.0,
                    help="seconds to keep serving after the last arrival; what is left is reported unfinished")
    args = ap.parse_args(argv)
    if args.gpus < 1:
        ap.error("--gpus must be >= 1")
    if args.policy != "all" and args.policy not in POLICIES:
        ap.error(f"--policy must be one of {', '.join(POLICIES)} or all")
    return args


def cmd_run(argv: Sequence[str]) -> int:
    args = parse_run(argv)
    setup = setup_from(args.gpu, args.model, args.gpus, **_knobs(args))
    trace, info = make_trace(args.trace, setup, args.duration, args.seed, args.rate)
    policies = POLICIES if args.policy == "all" else (args.policy,)
    rows = []
    for p in policies:
        try:
            rows.append(run_policy(p, setup, trace))
        except ValueError as err:  # e.g. vllm-single on more GPUs than the model has heads
            print(f"{p}: not possible: {err}", file=sys.stderr)
    title = (f"{args.gpus} x {setup.gpu.name}, {setup.model.name}, trace {info['name']} "
             f"({len(trace)} requests)")
    print_table(title, SUMMARY_COLUMNS + ["wall_s"], table_rows(rows, SUMMARY_COLUMNS + ["wall_s"]))
    if args.json:
        out = rows[0] if len(rows) == 1 else {"runs": rows}
        knobs = {k: (v.__dict__ if isinstance(v, GroupPolicy) else v) for k, v in _knobs(args).items()}
        path = write_json(args.json, {**out, "trace": info, "gpus": args.gpus, "gpu": setup.gpu.to_dict(),
                                      "model": setup.model.name, "config": knobs})
        print(f"wrote {path}")
    return 0 if rows else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in COMMANDS else "run"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    if cmd == "run":
        return cmd_run(rest)
    if cmd == "paper":
        from infinite.sim.paper import main as paper_main

        return paper_main(rest)
    if cmd == "sweep":
        from infinite.sim.paper import sweep_main

        return sweep_main(rest)
    if cmd == "tight":
        from infinite.sim.tight import main as tight_main

        return tight_main(rest)
    from infinite.sim.validate import main as validate_main

    return validate_main(rest)


if __name__ == "__main__":
    sys.exit(main())
