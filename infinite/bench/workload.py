"""Workloads for the cluster benchmarks: seeded traces, a driver that submits each request at
its arrival time to one or several engines, and the statistics of what came back.

Pure pieces (traces, percentiles, summaries) are plain functions, tested directly; the
driver works with any engine that has the LLM-facing surface (make_request, submit,
step, abort_request, stats): LocalCluster here.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infinite.errors import RequestError
from infinite.sampling.params import SamplingParams

LOST_AFTER_S = 3.0  # silence after which an idle cluster's missing outputs count as lost


@dataclass(frozen=True)
class Trace:
    """A named workload: its requests' shapes and arrivals, and the pool it is meant for."""

    name: str
    about: str
    num_long: int
    num_short: int
    long_prompt: tuple[int, int]
    long_output: tuple[int, int]
    short_prompt: tuple[int, int]
    short_output: tuple[int, int]
    rate: float  # Poisson arrivals, requests/s
    pool_blocks: int  # per instance (x16 tokens)
    max_num_seqs: int = 64


TRACES: dict[str, Trace] = {t.name: t for t in (
    Trace("short", "short requests only, arrivals faster than service: pools fill",
          0, 60, (1, 1), (1, 1), (32, 160), (32, 96), 40.0, 96),
    Trace("mixed-saturated", "3 long (~1K tokens, each fits one pool) among 60 short, all offered at once",
          3, 60, (900, 1100), (100, 200), (32, 160), (32, 96), 200.0, 96),
    Trace("mixed-arrival", "the same mix arriving at 12 requests/s",
          3, 60, (900, 1100), (100, 200), (32, 160), (32, 96), 12.0, 96),
    Trace("long", "4 long requests larger than one pool (1.8-2.2K tokens > 1536) among 40 short",
          4, 40, (1800, 2200), (64, 128), (32, 160), (32, 96), 8.0, 96),
    Trace("tight", "2 long requests that nearly fill one pool each, short ones streaming in",
          2, 80, (1100, 1200), (300, 400), (64, 160), (64, 128), 16.0, 96),
)}


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
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


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


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


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
            except RequestError as err:  # a request failed on its rank: "request RID failed: ..."
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
                rec.cached_tokens = out.num_cached_tokens
                rank = out.extra.get("rank")
                rec.home = None if rank is None else self.first_rank + rank
                rec.kv_blocks = {int(k): v for k, v in out.extra.get("kv_blocks", {}).items()}
                if "error" in out.extra:
                    rec.error = str(out.extra["error"])
                with self.lock:
                    self.expected.discard(out.request_id)


def serve_workload(engines: Sequence, route: str, work: Sequence[WorkItem], timeout: float,
                   prepare: Callable[[WorkItem, Any], None] | None = None) -> list[Record]:
    """Submit each item at its arrival time and collect the outputs.

    ``prepare(item, request)``: placement of a request on purpose before it is submitted (a home, a
    prefill group).

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
        if prepare is not None:
            prepare(w, req)
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


