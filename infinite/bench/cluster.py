"""``python -m infinite.bench cluster``: what lending KV blocks across instances costs and buys.

(a) **split**: per-token decode latency of one long request whose KV cache is
split about 50/50 between the home instance and a creditor, against the same
request alone on one instance. Both run in 2-rank clusters (same code path,
one thread per rank): "one" has lending off and a pool that holds the whole
request; "split" has pools of half the request, so the home fills its own pool
and borrows the rest. The two clusters stay up together and the repeats
alternate between them, so background load hits both alike.

(b) **mixed**: a named trace (``--trace``, see ``infinite.bench.workload.TRACES``;
every parameter can be overridden), seeded, Poisson arrivals, each request
submitted at its arrival time. Modes, each a separate deployment of the same
machine:

* ``on``: one N-rank cluster with lending (gManager routing, on-demand loans,
  periodic placement);
* ``off-routed``: the same cluster and the same routing with lending off — the
  headline baseline: the ratio on / off-routed is what lending itself buys;
* ``round-robin``: N independent single-instance engines behind a round robin
  (a static deployment; a request larger than one pool is rejected);
* ``single``: one instance with the whole cluster's memory and all the cores
  (the analog of one big tensor-parallel instance).

TTFT and E2E run from the submit time to the first / last token times the
ranks record (same host clock).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from infinite.bench.common import print_table, write_json
from infinite.bench.workload import (TRACES, _greedy, decode_ms_per_token, make_workload, model_vocab, percentile,
                                     random_prompt, serve_workload, summarize)
from infinite.kv.rmanager import blocks_for
from infinite.runtime.config import EngineConfig

SPLIT_TARGET = 1.3  # split / one decode latency, at most
NO_REGRET = 0.95  # lending on / off-routed tokens/s, at least, on every trace
MODES = ("on", "off-routed", "round-robin", "single")

# ---- arguments ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _positive_ints(text: str) -> list[int]:
    """'A,B,...': two or more distinct positive integers, ascending."""
    vals = [_positive_int(t.strip()) for t in text.split(",") if t.strip()]
    if len(vals) < 2 or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"expected two or more distinct positive integers, got {text!r}")
    return sorted(vals)


def _int_range(text: str) -> tuple[int, int]:
    """'LO-HI' or 'N' (both ends included)."""
    try:
        lo, _, hi = text.partition("-")
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with positive integers, got {text!r}") from None
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return a, b


def _modes(text: str) -> list[str]:
    """Mode labels; a mode named again runs again as ``MODE#2`` (an A/A control: how far two runs
    of the same configuration differ on this machine, next to the ratio being judged)."""
    vals = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in vals if m not in MODES]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODES)}, got {text!r}")
    seen: dict[str, int] = {}
    out = []
    for m in vals:
        seen[m] = seen.get(m, 0) + 1
        out.append(m if seen[m] == 1 else f"{m}#{seen[m]}")
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench cluster", description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("roundtrip", "split", "mixed", "context", "sp-prefill", "all"), default="all",
                   help="which benchmark (default all: every part but sp-prefill, which runs on its own)")
    f = p.add_argument_group("(f) sp-prefill: a long prompt prefilled by a group of 1, 2, 3 ranks; a mixed trace")
    f.add_argument("--sp-prompt", type=_positive_int, default=16384, help="prompt tokens of the single prompt")
    f.add_argument("--sp-ranks", type=_positive_ints, default=[1, 2, 3], help="group sizes, side by side")
    f.add_argument("--sp-hidden", type=_positive_int, default=1024, help="hidden size of the wide test model")
    f.add_argument("--sp-intermediate", type=_positive_int, default=4096, help="its FFN size")
    f.add_argument("--sp-budget", type=_positive_int, default=2048, help="step budget (max_num_batched_tokens)")
    f.add_argument("--sp-repeats", type=_positive_int, default=2, help="runs per group size, interleaved; fastest")
    f.add_argument("--sp-mixed-long", type=int, default=2, help="long prompts of the mixed trace (0: no trace)")
    f.add_argument("--sp-mixed-short", type=_positive_int, default=40, help="its short requests")
    f.add_argument("--sp-mixed-long-prompt", type=_positive_int, default=8192, help="its long prompts' tokens")
    f.add_argument("--sp-mixed-rate", type=_positive_float, default=4.0, help="its arrivals per second")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny Llama)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--out", default="bench-results/cluster.json", help="JSON result path ('' to skip)")
    p.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds one run may take before aborting")
    p.add_argument("--data-plane", choices=("p2p", "rpc"), default="p2p", help="remote MicroAttention transport")
    a = p.add_argument_group("(a) split")
    a.add_argument("--context", type=_positive_int, default=3000, help="prompt tokens of the long request")
    a.add_argument("--decode-tokens", type=_positive_int, default=64, help="tokens it generates (>= 2)")
    a.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per configuration; median")
    b = p.add_argument_group("(b) mixed: --trace picks the defaults of every flag below")
    b.add_argument("--trace", choices=sorted(TRACES), default="mixed-saturated", help="named workload")
    b.add_argument("--ranks", type=_positive_int, default=2, help="instances (default 2)")
    b.add_argument("--modes", type=_modes, default=["on", "off-routed", "round-robin"],
                   help=f"subset of {','.join(MODES)} (default on,off-routed,round-robin)")
    b.add_argument("--pool-blocks", type=_positive_int, help="KV blocks per instance")
    b.add_argument("--num-long", type=int, help="long requests")
    b.add_argument("--num-short", type=int, help="short requests")
    b.add_argument("--long-prompt", type=_int_range, help="long prompt tokens, LO-HI")
    b.add_argument("--long-output", type=_int_range, help="long output tokens, LO-HI")
    b.add_argument("--short-prompt", type=_int_range, help="short prompt tokens, LO-HI")
    b.add_argument("--short-output", type=_int_range, help="short output tokens, LO-HI")
    b.add_argument("--rate", type=_positive_float, help="Poisson arrival rate, requests/s")
    b.add_argument("--max-num-seqs", type=_positive_int, help="batch size cap per instance")
    b.add_argument("--mixed-repeats", type=_positive_int, default=1, help="runs per mode, alternating; median")
    c = p.add_argument_group("(e) context: a decode step's host work, one request's KV over 3 instances")
    c.add_argument("--contexts", type=_positive_ints, default=[1024, 262144],
                   help="context lengths compared side by side (default 1024,262144)")
    c.add_argument("--context-steps", type=_positive_int, default=20, help="decode steps timed per run")
    c.add_argument("--context-warmup", type=_positive_int, default=3, help="decode steps before the timed ones")
    c.add_argument("--context-repeats", type=_positive_int, default=2, help="runs per context, alternating")
    c.add_argument("--context-cold-mb", type=_positive_int, default=256,
                   help="memory the control mode touches before each step (default 256)")
    args = p.parse_args(list(argv))
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (latency is measured between the first and last token)")
    trace = TRACES[args.trace]
    for name in ("pool_blocks", "num_long", "num_short", "long_prompt", "long_output", "short_prompt",
                 "short_output", "rate", "max_num_seqs"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(trace, name))
    if args.num_long < 0 or args.num_short < 0:
        p.error("--num-long and --num-short must be >= 0")
    return args


def _sum_stats(stats: list[dict], keys: Sequence[str]) -> dict[str, float]:
    return {k: sum(s.get(k, 0) for s in stats) for k in keys}


# ---- cluster plumbing ----------------------------------------------------------------------------------


def _cluster(model: str | None, ranks: int, pool: int, lending: bool, threads: int | None = None, **kw: Any):
    """A LocalCluster of ``ranks`` instances; ``threads`` torch threads per rank (default: cores / ranks)."""
    from infinite.cluster.local import LocalCluster

    cfg = EngineConfig(model=model, dtype="float32", num_instances=ranks, num_kv_blocks=pool,
                       enable_lending=lending, threads_per_rank=threads, **kw)
    return LocalCluster(cfg)


def _run_alone(eng, prompt: Sequence[int], max_tokens: int, rid: str, timeout: float):
    """Submit one request and wait for it."""
    req = eng.make_request(list(prompt), _greedy(max_tokens), rid)
    eng.submit(req)
    deadline = time.monotonic() + timeout
    while True:
        for out in eng.step():
            if out.request_id == rid:
                return out
        if time.monotonic() > deadline:
            eng.abort_request(rid)
            raise TimeoutError(f"{rid} did not finish in {timeout:.0f} s")


@contextmanager
def _closing(*engines):
    try:
        yield engines
    finally:
        for e in engines:
            e.shutdown()


# ---- (a) split ----------------------------------------------------------------------------------------------


def run_split(args: argparse.Namespace) -> dict[str, Any]:
    from infinite.runtime.engine import resolve_model_dir

    total = blocks_for(args.context + args.decode_tokens, 16)
    half = -(-total // 2)
    rng = random.Random(args.seed)
    vocab = model_vocab(resolve_model_dir(args.model))
    prompt = random_prompt(rng, args.context, vocab)
    warm = random_prompt(rng, 48, vocab)
    setups = {
        "one": dict(pool=total + 4, lending=False, data_plane=args.data_plane),
        "split": dict(pool=half, lending=True, max_lend_fraction=1.0, data_plane=args.data_plane),
    }
    engines = {name: _cluster(args.model, 2, s["pool"], s["lending"],
                              **{k: v for k, v in s.items() if k not in ("pool", "lending")})
               for name, s in setups.items()}
    res: dict[str, dict[str, Any]] = {n: {"pool_blocks": s["pool"], "ms_per_token": [], "kv_blocks": [],
                                          "token_ids": None} for n, s in setups.items()}
    with _closing(*engines.values()):
        # decode steps' own counters: the prefill's chunks send many rows and must not blur them
        keys = ("remote_calls", "remote_wait_ms", "decode_remote_calls", "decode_remote_wait_ms",
                "decode_served_calls", "decode_served_ms", "migrations")
        for name, eng in engines.items():
            _run_alone(eng, warm, 8, f"warm-{name}", args.timeout)
        before = {n: _sum_stats(e.stats(), keys) for n, e in engines.items()}
        for i in range(args.repeats):
            for name, eng in engines.items():
                out = _run_alone(eng, prompt, args.decode_tokens, f"{name}-{i}", args.timeout)
                r = res[name]
                r["ms_per_token"].append(decode_ms_per_token(out))
                r["kv_blocks"].append({int(k): v for k, v in out.extra.get("kv_blocks", {}).items()})
                toks = list(out.outputs[0].token_ids)
                if r["token_ids"] is None:
                    r["token_ids"] = toks
                elif r["token_ids"] != toks:
                    raise RuntimeError(f"{name}: greedy output changed between repeats")
        for name, eng in engines.items():
            after = _sum_stats(eng.stats(), keys)
            r = res[name]
            for k in after:
                r[k] = after[k] - before[name][k]
            steps = args.repeats * (args.decode_tokens - 1)
            r["remote_calls_per_decode_step"] = r["decode_remote_calls"] / steps
            r["remote_wait_ms_per_token"] = r["decode_remote_wait_ms"] / steps
            # the creditor's attention per call (queries in, (out, LSE) computed), decode steps only
            r["creditor_ms_per_call"] = (r["decode_served_ms"] / r["decode_served_calls"]
                                         if r["decode_served_calls"] else 0.0)
            r["median_ms_per_token"] = statistics.median(r["ms_per_token"])
    one, split = res["one"], res["split"]
    ratio = split["median_ms_per_token"] / one["median_ms_per_token"]
    same = one["token_ids"] == split["token_ids"]
    for r in res.values():
        r.pop("token_ids")
    return {
        "config": {"context": args.context, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                   "request_blocks": total, "ranks": 2, "threads_per_rank": EngineConfig().rank_threads(2)},
        "one": one, "split": split, "ratio": ratio, "target_ratio": SPLIT_TARGET,
        "meets_target": ratio <= SPLIT_TARGET, "same_tokens": same,
    }


def print_split(r: dict[str, Any]) -> None:
    rows = []
    for name in ("one", "split"):
        s = r[name]
        kv = s["kv_blocks"][-1] if s["kv_blocks"] else {}
        rows.append([name, s["pool_blocks"], "/".join(f"{k}:{v}" for k, v in sorted(kv.items())),
                     s["median_ms_per_token"], min(s["ms_per_token"]), max(s["ms_per_token"]),
                     s["remote_calls_per_decode_step"], s["remote_wait_ms_per_token"], s["creditor_ms_per_call"]])
    c = r["config"]
    print_table(f"(a) decode latency, {c['context']}-token context, {c['decode_tokens']} tokens, "
                f"median of {c['repeats']}", ["config", "pool", "KV blocks rank:n", "ms/token", "min", "max",
                                             "remote calls/step", "remote wait ms/token", "creditor ms/call"], rows)
    print("(remote calls, waits and the creditor's time: decode steps only)")
    print(f"split / one = {r['ratio']:.2f} (target <= {r['target_ratio']}: "
          f"{'met' if r['meets_target'] else 'NOT met'}); same greedy tokens: {r['same_tokens']}", flush=True)


# ---- (0) round trip ------------------------------------------------------------------------------------------


def run_roundtrip(args: argparse.Namespace) -> dict[str, Any]:
    """One layer of remote MicroAttention with nothing to attend, rank 0 to rank 1, on each data
    plane: the gManager's start-up probes (20 per plane), which are its remote-latency prior."""
    out = {}
    for plane in ("p2p", "rpc"):
        eng = _cluster(args.model, 2, 16, True, data_plane=plane)
        with _closing(eng):
            probes = eng.cluster_status()["cost_model"]["probe_s"]
        out[plane] = {"probes": len(probes), "median_us": 1e6 * statistics.median(probes),
                      "p90_us": 1e6 * percentile(probes, 90), "min_us": 1e6 * min(probes)}
    out["rpc_over_p2p"] = out["rpc"]["median_us"] / out["p2p"]["median_us"]
    return out


def print_roundtrip(r: dict[str, Any]) -> None:
    rows = [[plane, r[plane]["probes"], r[plane]["median_us"], r[plane]["p90_us"], r[plane]["min_us"]]
            for plane in ("p2p", "rpc")]
    print_table("(0) remote MicroAttention round trip per layer, nothing to attend (µs)",
                ["data plane", "probes", "median", "p90", "min"], rows)
    print(f"rpc / p2p = {r['rpc_over_p2p']:.1f}", flush=True)


# ---- (b) mixed ----------------------------------------------------------------------------------------------


def _deployment(args: argparse.Namespace, mode: str) -> tuple[list, str]:
    """The engines of one mode and how requests reach them ("rr" or "cluster")."""
    n = args.ranks
    kw = dict(max_num_seqs=args.max_num_seqs, data_plane=args.data_plane)
    cores = EngineConfig().rank_threads(1)
    if mode == "round-robin":
        return [_cluster(args.model, 1, args.pool_blocks, False, threads=max(1, cores // n), **kw)
                for _ in range(n)], "rr"
    if mode == "single":
        return [_cluster(args.model, 1, n * args.pool_blocks, False, threads=cores, **kw)], "cluster"
    return [_cluster(args.model, n, args.pool_blocks, mode == "on", **kw)], "cluster"


def _by_home(records, weight) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if r.home is not None:
            out[str(r.home)] = out.get(str(r.home), 0) + weight(r)
    return dict(sorted(out.items()))


def run_mixed_mode(args: argparse.Namespace, label: str, work) -> dict[str, Any]:
    mode = label.split("#")[0]
    engines, route = _deployment(args, mode)
    with _closing(*engines):
        for i, e in enumerate(engines):  # first-call costs out of the clock, on every rank
            for j in range(args.ranks if mode in ("on", "off-routed") else 1):
                _run_alone(e, random_prompt(random.Random(j), 24, (10, 100)), 4, f"warm-{i}-{j}", args.timeout)
        records = serve_workload(engines, route, work, args.timeout)
        stats = [s for e in engines for s in e.stats()]
        status = engines[0].cluster_status() if mode == "on" else {}
    summary = summarize(records)
    summary.update(
        mode=label, route="round robin" if route == "rr" else "gManager",
        preemptions=sum(s.get("num_preemptions", 0) for s in stats),
        remote_calls=sum(s.get("remote_calls", 0) for s in stats),
        migrations=sum(s.get("migrations", 0) for s in stats),
        migrated_blocks=sum(s.get("migrated_blocks", 0) for s in stats),
        moves_issued=status.get("moves_issued", 0), loans_refused=status.get("loans_refused", 0),
        long_kv_blocks={r.request_id: r.kv_blocks for r in records if r.kind == "long" and r.kv_blocks},
        # how routing spread the work: requests and their tokens (prompt + max_tokens) per home
        requests_by_home=_by_home(records, lambda r: 1),
        tokens_by_home=_by_home(records, lambda r: r.prompt_tokens + r.max_tokens),
        rejected_errors=sorted({r.error for r in records if r.rejected and r.error}),
    )
    return summary


def run_mixed(args: argparse.Namespace) -> dict[str, Any]:
    from infinite.runtime.engine import resolve_model_dir

    vocab = model_vocab(resolve_model_dir(args.model))
    work = make_workload(args.num_long, args.num_short, args.long_prompt, args.long_output, args.short_prompt,
                         args.short_output, args.rate, vocab, args.seed)
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    for _ in range(args.mixed_repeats):  # modes alternate, so background load hits them alike
        for mode in args.modes:
            runs[mode].append(run_mixed_mode(args, mode, work))
    results = {}
    for mode, rs in runs.items():  # the run with the median tokens/s stands for the mode
        rs = sorted(rs, key=lambda r: r["tokens_per_s"])
        results[mode] = {**rs[len(rs) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs[mode]]}
    out: dict[str, Any] = {
        "config": {"trace": args.trace, "about": TRACES[args.trace].about, "ranks": args.ranks,
                   "pool_blocks": args.pool_blocks, "block_size": 16, "num_long": args.num_long,
                   "num_short": args.num_short, "long_prompt": list(args.long_prompt),
                   "long_output": list(args.long_output), "short_prompt": list(args.short_prompt),
                   "short_output": list(args.short_output), "rate": args.rate, "seed": args.seed,
                   "max_num_seqs": args.max_num_seqs, "offered_requests": len(work), "repeats": args.mixed_repeats,
                   "offered_output_tokens": sum(w.max_tokens for w in work), "last_arrival_s": work[-1].arrival_s},
        "modes": results,
    }
    on = results.get("on")
    if on is not None:
        out["ratios"] = {f"on/{m}": on["tokens_per_s"] / s["tokens_per_s"]
                         for m, s in results.items() if m != "on" and s["tokens_per_s"] > 0}
        for m in results:  # A/A controls: a mode run again, against its first run
            base = m.split("#")[0]
            if m != base and results[base]["tokens_per_s"] > 0:
                out["ratios"][f"{m}/{base}"] = results[m]["tokens_per_s"] / results[base]["tokens_per_s"]
        if "on/off-routed" in out["ratios"]:
            out["no_regret"] = out["ratios"]["on/off-routed"] >= NO_REGRET
    return out


def print_mixed(r: dict[str, Any]) -> None:
    c = r["config"]
    cols = ["mode", "route", "served", "rejected", "gen tokens", "makespan s", "tokens/s", "TTFT p50", "TTFT p99",
            "E2E p50", "E2E p99", "preempt", "loans refused", "moved blocks"]
    rows = [[mode, s["route"], s["served"], s["rejected"], s["generated_tokens"], s["makespan_s"], s["tokens_per_s"],
             s["ttft_s"]["p50"], s["ttft_s"]["p99"], s["e2e_s"]["p50"], s["e2e_s"]["p99"], s["preemptions"],
             s["loans_refused"], s["migrated_blocks"]] for mode, s in r["modes"].items()]
    print_table(f"(b) trace {c['trace']} (median of {c['repeats']} alternating runs): {c['about']}; "
                f"{c['ranks']} instances x {c['pool_blocks']} blocks, "
                f"{c['num_long']} long (prompt {c['long_prompt']}, output {c['long_output']}) + {c['num_short']} short "
                f"(prompt {c['short_prompt']}, output {c['short_output']}), {c['rate']}/s Poisson", cols, rows)
    for name, ratio in r.get("ratios", {}).items():
        tag = ""
        if name == "on/off-routed":
            tag = f"  (headline: lending itself; no regret needs >= {NO_REGRET}: {'met' if r['no_regret'] else 'NOT met'})"
        print(f"tokens/s {name} = {ratio:.2f}{tag}", flush=True)


# ---- main ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)  # this process only drives; the ranks do the work
    payload: dict[str, Any] = {"bench": "cluster", "args": {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in vars(args).items()}}
    if args.part in ("roundtrip", "all"):
        payload["roundtrip"] = run_roundtrip(args)
        print_roundtrip(payload["roundtrip"])
    if args.part in ("split", "all"):
        payload["split"] = run_split(args)
        print_split(payload["split"])
    if args.part in ("mixed", "all"):
        payload["mixed"] = run_mixed(args)
        print_mixed(payload["mixed"])
    if args.part in ("context", "all"):
        from infinite.bench.cluster_context import print_context, run_context

        payload["context"] = run_context(args.contexts, args.context_steps, args.context_repeats,
                                         args.context_warmup, args.context_cold_mb, args.timeout, args.seed)
        print_context(payload["context"])
    if args.part == "sp-prefill":
        from infinite.bench.cluster_sp import print_sp_prefill, run_sp_prefill

        payload["sp_prefill"] = run_sp_prefill(args.sp_prompt, args.sp_ranks, args.sp_hidden, args.sp_intermediate,
                                               args.sp_budget, args.sp_mixed_long, args.sp_mixed_short,
                                               args.sp_mixed_long_prompt, args.sp_mixed_rate, args.timeout, args.seed,
                                               args.sp_repeats)
        print_sp_prefill(payload["sp_prefill"])
    if args.out:
        path = write_json(args.out, payload)
        print(f"wrote {path}", flush=True)
    return 0
