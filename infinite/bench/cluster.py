"""``python -m infinite.bench cluster``: what lending KV blocks across instances costs and buys.

(a) **split**: per-token decode latency of one long request whose KV cache is
split about 50/50 between the home instance and a creditor, against the same
request alone on one instance. Both run in 2-rank clusters (same code path,
one thread per rank): "one" has lending off and a pool that holds the whole
request; "split" has lending on, ``max_lend_fraction=1`` and pools of half the
request, so the home fills its own pool and borrows the rest while it grows.
The two clusters stay up together and the repeats alternate between them, so
background load hits both alike.

(b) **mixed**: a few long and many short requests, seeded, Poisson arrivals,
each submitted at its arrival time while the cluster serves. "off" is the
static deployment: N independent single-instance clusters (one thread each),
requests assigned round robin, a request larger than one pool rejected. "on"
is one N-rank cluster with lending: the gManager routes each request to the
instance with the most free memory and moves long requests' KV blocks to
creditors. "off-routed" (optional) is the N-rank cluster with lending off: the
gManager's memory-aware routing without lending, to separate the two effects.
TTFT and E2E are measured from the submit time to the first / last token times
the ranks record (same host clock).

Run under ``if __name__ == "__main__"`` guards only: the ranks are spawned
processes that re-import the main module.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinite.bench.common import print_table, write_json
from infinite.runtime.config import EngineConfig
from infinite.kv.rmanager import blocks_for
from infinite.sampling.params import SamplingParams

SPLIT_TARGET = 1.3  # split / one decode latency, at most (issue 4)
MIXED_TARGET = 1.5  # lending on / off generated tokens/s, at least (issue 4)
MODES = ("off", "off-routed", "on")
LOST_AFTER_S = 3.0  # silence after which an idle cluster's missing outputs count as lost

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
    vals = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in vals if m not in MODES]
    if not vals or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return vals


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench cluster", description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("split", "mixed", "all"), default="all", help="which benchmark (default all)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny Llama)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--out", default="bench-results/cluster.json", help="JSON result path ('' to skip)")
    p.add_argument("--timeout", type=_positive_float, default=150.0, help="seconds one run may take before aborting")
    a = p.add_argument_group("(a) split")
    a.add_argument("--context", type=_positive_int, default=3000, help="prompt tokens of the long request")
    a.add_argument("--decode-tokens", type=_positive_int, default=64, help="tokens it generates (>= 2)")
    a.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per configuration; median")
    b = p.add_argument_group("(b) mixed")
    b.add_argument("--ranks", type=_positive_int, default=2, help="instances (default 2)")
    b.add_argument("--modes", type=_modes, default=["off", "on"], help=f"subset of {','.join(MODES)} (default off,on)")
    b.add_argument("--pool-blocks", type=_positive_int, default=240, help="KV blocks per instance")
    b.add_argument("--num-long", type=_positive_int, default=1, help="long requests")
    b.add_argument("--num-short", type=_positive_int, default=60, help="short requests")
    b.add_argument("--long-prompt", type=_int_range, default=(3000, 3000), help="long prompt tokens, LO-HI")
    b.add_argument("--long-output", type=_int_range, default=(600, 600), help="long output tokens, LO-HI")
    b.add_argument("--short-prompt", type=_int_range, default=(32, 160), help="short prompt tokens, LO-HI")
    b.add_argument("--short-output", type=_int_range, default=(64, 160), help="short output tokens, LO-HI")
    b.add_argument("--rate", type=_positive_float, default=10.0, help="Poisson arrival rate, requests/s")
    b.add_argument("--max-num-seqs", type=_positive_int, default=64, help="batch size cap per instance")
    args = p.parse_args(list(argv))
    if args.decode_tokens < 2:
        p.error("--decode-tokens must be at least 2 (latency is measured between the first and last token)")
    return args


# ---- pure helpers: workload and statistics ----------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    request_id: str
    kind: str  # long | short
    arrival_s: float  # seconds after the start of the run
    prompt: tuple[int, ...]
    max_tokens: int


def random_prompt(rng: random.Random, length: int, vocab: tuple[int, int]) -> tuple[int, ...]:
    """Token ids drawn from [lo, hi): random ids keep a tiny model from repeating itself into EOS."""
    lo, hi = vocab
    return tuple(rng.randrange(lo, hi) for _ in range(length))


def make_workload(
    num_long: int, num_short: int, long_prompt: tuple[int, int], long_output: tuple[int, int],
    short_prompt: tuple[int, int], short_output: tuple[int, int], rate: float, vocab: tuple[int, int], seed: int,
) -> list[WorkItem]:
    """Poisson arrivals (exponential gaps at ``rate``/s); long requests spaced evenly through the stream.

    Request i is long when i is a multiple of the stream length / num_long, so each long request
    arrives at the head of a run of short ones: the situation where it fills its instance's
    memory while short requests keep coming.
    """
    if num_long < 0 or num_short < 0 or num_long + num_short == 0:
        raise ValueError(f"need some requests, got num_long={num_long}, num_short={num_short}")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rng = random.Random(seed)
    n = num_long + num_short
    long_at = {round(j * n / num_long) for j in range(num_long)} if num_long else set()
    items, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        kind = "long" if i in long_at else "short"
        plen, olen = (long_prompt, long_output) if kind == "long" else (short_prompt, short_output)
        prompt = random_prompt(rng, rng.randint(*plen), vocab)
        items.append(WorkItem(f"{kind}-{i}", kind, t, prompt, rng.randint(*olen)))
    return items


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in [0, 100]); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass
class Record:
    """One request's fate in a mixed run; times are wall-clock seconds (time.time())."""

    request_id: str
    kind: str
    prompt_tokens: int
    max_tokens: int
    submitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None  # why it was rejected or failed
    rejected: bool = False
    home: int | None = None
    kv_blocks: dict[int, int] = field(default_factory=dict)


def summarize(records: Sequence[Record]) -> dict[str, Any]:
    """Served / rejected counts, generated tokens/s over the makespan, TTFT and E2E statistics."""
    served = [r for r in records if r.finished is not None and r.error is None]
    starts = [r.submitted for r in records if r.submitted is not None]
    ends = [r.finished for r in served]
    makespan = (max(ends) - min(starts)) if ends and starts else 0.0
    tokens = sum(r.output_tokens for r in served)
    ttft = [r.first_token - r.submitted for r in served if r.first_token is not None]
    e2e = [r.finished - r.submitted for r in served]

    def stats(xs: list[float]) -> dict[str, float | None]:
        return {"mean": statistics.fmean(xs) if xs else None, "p50": percentile(xs, 50), "p99": percentile(xs, 99)}

    by_kind = {}
    for kind in sorted({r.kind for r in records}):
        rs = [r for r in records if r.kind == kind]
        ok = [r for r in rs if r in served]
        by_kind[kind] = {"total": len(rs), "served": len(ok), "rejected": sum(r.rejected for r in rs),
                         "ttft_s": stats([r.first_token - r.submitted for r in ok if r.first_token is not None]),
                         "e2e_s": stats([r.finished - r.submitted for r in ok])}
    return {
        "requests": len(records),
        "served": len(served),
        "rejected": sum(r.rejected for r in records),
        "failed": sum(not r.rejected and r.error is not None for r in records),  # incl. lost by the runtime
        "unfinished": sum(r.submitted is not None and r.finished is None and r.error is None for r in records),
        "generated_tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "ttft_s": stats(ttft),
        "e2e_s": stats(e2e),
        "by_kind": by_kind,
    }


def decode_ms_per_token(out) -> float:
    """(last token time - first token time) / (tokens - 1): decode only, the prefill excluded."""
    n = len(out.outputs[0].token_ids)
    m = out.metrics
    if n < 2 or m is None or m.first_token_time is None or m.finished_time is None:
        raise ValueError(f"request {out.request_id}: need >= 2 tokens and first/last token times to time decode")
    return 1e3 * (m.finished_time - m.first_token_time) / (n - 1)


def model_vocab(model_dir: str) -> tuple[int, int]:
    """[lo, hi) of token ids for random prompts: above every special id in config.json, below vocab_size."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = {**cfg, **cfg.get("text_config", {})}
    special = [0]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        special += v if isinstance(v, list) else [] if v is None else [v]
    lo = max(special) + 1
    if lo >= cfg["vocab_size"]:
        raise ValueError(f"no ordinary token ids in {model_dir}: vocab_size {cfg['vocab_size']}")
    return lo, cfg["vocab_size"]


def _sum_stats(stats: list[dict], keys: Sequence[str]) -> dict[str, float]:
    return {k: sum(s.get(k, 0) for s in stats) for k in keys}


# ---- cluster plumbing ----------------------------------------------------------------------------------


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _cluster(model: str | None, ranks: int, pool: int, lending: bool, threads: int | None = None, **kw: Any):
    """A LocalCluster of ``ranks`` instances; ``threads`` torch threads per rank (default: cores / ranks)."""
    from infinite.cluster.local import LocalCluster
    from infinite.runtime.config import EngineConfig

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
        "one": dict(pool=total + 4, lending=False),
        "split": dict(pool=half, lending=True, max_lend_fraction=1.0),
    }
    engines = {name: _cluster(args.model, 2, s["pool"], s["lending"],
                              **{k: v for k, v in s.items() if k not in ("pool", "lending")})
               for name, s in setups.items()}
    res: dict[str, dict[str, Any]] = {n: {"pool_blocks": s["pool"], "ms_per_token": [], "kv_blocks": [],
                                          "token_ids": None} for n, s in setups.items()}
    with _closing(*engines.values()):
        for name, eng in engines.items():
            _run_alone(eng, warm, 8, f"warm-{name}", args.timeout)
        before = {n: _sum_stats(e.stats(), ("remote_calls", "remote_wait_ms", "migrations")) for n, e in engines.items()}
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
            after = _sum_stats(eng.stats(), ("remote_calls", "remote_wait_ms", "migrations"))
            r = res[name]
            for k in after:
                r[k] = after[k] - before[name][k]
            steps = args.repeats * (args.decode_tokens - 1)
            r["remote_calls_per_decode_step"] = r["remote_calls"] / steps
            r["remote_wait_ms_per_token"] = r["remote_wait_ms"] / steps
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
                     s["remote_calls_per_decode_step"], s["remote_wait_ms_per_token"]])
    c = r["config"]
    print_table(f"(a) decode latency, {c['context']}-token context, {c['decode_tokens']} tokens, "
                f"median of {c['repeats']}", ["config", "pool", "KV blocks rank:n", "ms/token", "min", "max",
                                             "remote calls/step", "remote wait ms/token"], rows)
    print(f"split / one = {r['ratio']:.2f} (target <= {r['target_ratio']}: "
          f"{'met' if r['meets_target'] else 'NOT met'}); same greedy tokens: {r['same_tokens']}", flush=True)


# ---- (b) mixed ----------------------------------------------------------------------------------------------


class _Collector(threading.Thread):
    """Steps one engine until every request it was given has come back (or the run is stopped)."""

    def __init__(self, eng, records: dict[str, Record], first_rank: int = 0) -> None:
        super().__init__(daemon=True)
        self.eng = eng
        self.first_rank = first_rank  # instance number of the engine's rank 0 in the whole deployment
        self.records = records
        self.expected: set[str] = set()
        self.lock = threading.Lock()
        self.all_submitted = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def expect(self, rid: str) -> None:
        with self.lock:
            self.expected.add(rid)

    def _done(self) -> bool:
        with self.lock:
            return self.all_submitted.is_set() and not self.expected

    def _mark_lost_if_idle(self) -> None:
        """Requests the runtime dropped (every rank idle, yet no output) are recorded as lost.

        Without this a request that never reached an instance would hold the run until --timeout.
        """
        if any(s.get("num_running", 0) or s.get("num_waiting", 0) for s in self.eng.stats()):
            return
        with self.lock:
            lost, self.expected = self.expected, set()
        for rid in lost:
            self.records[rid].error = "lost: no instance ran it and no output came back"

    def run(self) -> None:
        quiet_since = time.monotonic()
        while not self.stop.is_set() and not self._done():
            if self.all_submitted.is_set() and time.monotonic() - quiet_since > LOST_AFTER_S:
                self._mark_lost_if_idle()
                quiet_since = time.monotonic()
                continue
            try:
                outs = self.eng.step()
            except RuntimeError as err:  # a request failed on its rank: "request RID failed: ..."
                msg = str(err)
                rid = msg.split()[1] if msg.startswith("request ") else None
                if rid is None or rid not in self.records:
                    self.error = err
                    return
                self.records[rid].error = msg
                with self.lock:
                    self.expected.discard(rid)
                continue
            if outs:
                quiet_since = time.monotonic()
            for out in outs:
                rec = self.records.get(out.request_id)
                if rec is None or not out.finished:
                    continue
                m = out.metrics
                rec.first_token = m.first_token_time if m else None
                rec.finished = (m.finished_time or m.last_token_time) if m else time.time()
                rec.output_tokens = len(out.outputs[0].token_ids)
                rec.finish_reason = out.outputs[0].finish_reason
                rank = out.extra.get("rank")
                rec.home = None if rank is None else self.first_rank + rank
                rec.kv_blocks = {int(k): v for k, v in out.extra.get("kv_blocks", {}).items()}
                if "error" in out.extra:
                    rec.error = str(out.extra["error"])
                with self.lock:
                    self.expected.discard(out.request_id)


def serve_workload(engines: Sequence, route: str, work: Sequence[WorkItem], timeout: float) -> list[Record]:
    """Submit each item at its arrival time and collect the outputs.

    ``route``: "rr" sends request i to engines[i % N] (a static deployment's load balancer);
    "cluster" sends everything to engines[0], whose gManager picks the home. A request that
    make_request refuses (larger than what one request may hold) is recorded as rejected.
    """
    if route not in ("rr", "cluster"):
        raise ValueError(f"route must be 'rr' or 'cluster', got {route!r}")
    records = {w.request_id: Record(w.request_id, w.kind, len(w.prompt), w.max_tokens) for w in work}
    made = []
    for i, w in enumerate(work):  # validate up front: a refusal costs nothing at serving time
        idx = i % len(engines) if route == "rr" else 0
        try:
            req = engines[idx].make_request(list(w.prompt), _greedy(w.max_tokens), w.request_id)
        except ValueError as err:
            records[w.request_id].rejected = True
            records[w.request_id].error = str(err)
            continue
        made.append((w, idx, req))
    collectors = [_Collector(e, records, i if route == "rr" else 0) for i, e in enumerate(engines)]
    for c in collectors:
        c.start()
    t0 = time.time()
    for w, idx, req in made:
        delay = t0 + w.arrival_s - time.time()
        if delay > 0:
            time.sleep(delay)
        collectors[idx].expect(w.request_id)
        records[w.request_id].submitted = time.time()
        engines[idx].submit(req)
    for c in collectors:
        c.all_submitted.set()
    deadline = time.monotonic() + timeout
    for c in collectors:
        c.join(max(0.0, deadline - time.monotonic()))
    for c in collectors:
        c.stop.set()
        c.join(5)
        if c.error is not None:
            raise RuntimeError(f"serving failed: {c.error}") from c.error
    for w, idx, _ in made:
        if records[w.request_id].finished is None and records[w.request_id].error is None:
            engines[idx].abort_request(w.request_id)
    return [records[w.request_id] for w in work]


def run_mixed_mode(args: argparse.Namespace, mode: str, work: Sequence[WorkItem]) -> dict[str, Any]:
    n = args.ranks
    kw = dict(max_num_seqs=args.max_num_seqs)
    threads = EngineConfig().rank_threads(n)
    if mode == "off":
        engines = [_cluster(args.model, 1, args.pool_blocks, False, threads=threads, **kw) for _ in range(n)]
        route = "rr"
    else:
        engines = [_cluster(args.model, n, args.pool_blocks, mode == "on", **kw)]
        route = "cluster"
    with _closing(*engines):
        for i, e in enumerate(engines):  # first-call costs out of the clock, on every rank
            for j in range(n if route == "cluster" else 1):
                _run_alone(e, random_prompt(random.Random(j), 24, (10, 100)), 4, f"warm-{i}-{j}", args.timeout)
        records = serve_workload(engines, route, work, args.timeout)
        stats = [s for e in engines for s in e.stats()]
        moves = engines[0].cluster_status().get("moves_issued", 0) if mode == "on" else 0
    summary = summarize(records)
    summary.update(
        mode=mode, route="round robin" if route == "rr" else "gManager",
        preemptions=sum(s.get("num_preemptions", 0) for s in stats),
        remote_calls=sum(s.get("remote_calls", 0) for s in stats),
        migrations=sum(s.get("migrations", 0) for s in stats),
        migrated_blocks=sum(s.get("migrated_blocks", 0) for s in stats),
        moves_issued=moves,
        long_kv_blocks={r.request_id: r.kv_blocks for r in records if r.kind == "long" and r.kv_blocks},
        rejected_errors=sorted({r.error for r in records if r.rejected and r.error}),
    )
    return summary


def run_mixed(args: argparse.Namespace) -> dict[str, Any]:
    from infinite.runtime.engine import resolve_model_dir

    vocab = model_vocab(resolve_model_dir(args.model))
    work = make_workload(args.num_long, args.num_short, args.long_prompt, args.long_output, args.short_prompt,
                         args.short_output, args.rate, vocab, args.seed)
    results = {mode: run_mixed_mode(args, mode, work) for mode in args.modes}
    out: dict[str, Any] = {
        "config": {"ranks": args.ranks, "pool_blocks": args.pool_blocks, "block_size": 16,
                   "num_long": args.num_long, "num_short": args.num_short, "long_prompt": list(args.long_prompt),
                   "long_output": list(args.long_output), "short_prompt": list(args.short_prompt),
                   "short_output": list(args.short_output), "rate": args.rate, "seed": args.seed,
                   "max_num_seqs": args.max_num_seqs, "offered_requests": len(work),
                   "offered_output_tokens": sum(w.max_tokens for w in work),
                   "last_arrival_s": work[-1].arrival_s},
        "modes": results,
    }
    if "on" in results and "off" in results and results["off"]["tokens_per_s"] > 0:
        ratio = results["on"]["tokens_per_s"] / results["off"]["tokens_per_s"]
        out.update(ratio=ratio, target_ratio=MIXED_TARGET, meets_target=ratio >= MIXED_TARGET)
    return out


def print_mixed(r: dict[str, Any]) -> None:
    c = r["config"]
    cols = ["mode", "route", "served", "rejected", "gen tokens", "makespan s", "tokens/s", "TTFT mean", "TTFT p50",
            "TTFT p99", "E2E mean", "E2E p50", "E2E p99", "preempt", "moved blocks"]
    rows = []
    for mode, s in r["modes"].items():
        rows.append([mode, s["route"], s["served"], s["rejected"], s["generated_tokens"], s["makespan_s"],
                     s["tokens_per_s"], s["ttft_s"]["mean"], s["ttft_s"]["p50"], s["ttft_s"]["p99"],
                     s["e2e_s"]["mean"], s["e2e_s"]["p50"], s["e2e_s"]["p99"], s["preemptions"],
                     s["migrated_blocks"]])
    print_table(f"(b) mixed workload: {c['ranks']} instances x {c['pool_blocks']} blocks, {c['num_long']} long + "
                f"{c['num_short']} short, {c['rate']}/s Poisson (seconds)", cols, rows)
    if "ratio" in r:
        print(f"on / off tokens/s = {r['ratio']:.2f} (target >= {r['target_ratio']}: "
              f"{'met' if r['meets_target'] else 'NOT met'})", flush=True)


# ---- main ----------------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(1)  # this process only drives; the ranks do the work
    payload: dict[str, Any] = {"bench": "cluster", "args": {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in vars(args).items()}}
    if args.part in ("split", "all"):
        payload["split"] = run_split(args)
        print_split(payload["split"])
    if args.part in ("mixed", "all"):
        payload["mixed"] = run_mixed(args)
        print_mixed(payload["mixed"])
    if args.out:
        path = write_json(args.out, payload)
        print(f"wrote {path}", flush=True)
    return 0


__all__ = ["WorkItem", "Record", "make_workload", "percentile", "summarize", "decode_ms_per_token",
           "serve_workload", "run_split", "run_mixed", "main", "parse_args"]
