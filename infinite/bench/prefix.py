"""``python -m infinite.bench prefix``: what the prefix cache buys, and what it costs when nothing repeats.

Every part runs caching on and off on the same machine in one invocation, so the
ratios are side by side (deployments are LocalClusters: ranks as processes, as
``LLM(num_instances=N)`` runs them; a 1-instance deployment is one rank).

(a) **doc**: the shared-document trace: ``--docs`` documents of ``--doc-tokens``
    tokens, ``--questions`` questions each (a document followed by a short
    question), Poisson arrivals at ``--rate``/s, on 1 and 2 instances: TTFT
    p50/p99, generated tokens/s, hit rate (prompt tokens served from a cache).
(b) **chat**: a multi-turn chat trace: ``--chats`` conversations sharing a system
    prompt, ``--turns`` turns each; every turn resends the whole transcript (its
    previous prompt, the answer, a new user message) once the previous turn ends.
(c) **remote**: 2 instances; a document is cached on instance 1, and a question
    over it runs at home on instance 0 (``data_parallel_rank``): the cached blocks
    serve it in place (lent by reference, remote MicroAttention), against the same
    question recomputed at the same home (a ``cache_salt`` no one else uses: a
    miss), alternating; TTFT p50 of each.
(d) **noshare**: random prompts that share nothing, caching on vs off, alternating
    ``--repeats`` times: tokens/s (the median run of each stands for it).

Targets (issue 18): (a) TTFT p50 >= 5x lower and tokens/s >= 2x higher with
caching; (c) TTFT >= 3x lower served in place than recomputed; (d) on/off
tokens/s >= 0.97.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from infinite.bench.cluster import _closing, _int_range, _positive_float, _positive_int
from infinite.bench.common import print_table, write_json
from infinite.bench.workload import Record, WorkItem, model_vocab, random_prompt, serve_workload, summarize
from infinite.runtime.config import EngineConfig
from infinite.sampling.params import SamplingParams

PARTS = ("doc", "chat", "remote", "noshare")
TARGETS = {"doc_ttft_p50": 5.0, "doc_tokens_per_s": 2.0, "remote_ttft_p50": 3.0, "noshare_tokens_per_s": 0.97}

# ---- traces (pure) ---------------------------------------------------------------------------------------


def doc_trace(docs: int, doc_tokens: int, questions: int, question_tokens: int, output_tokens: int, rate: float,
              vocab: tuple[int, int], seed: int) -> list[WorkItem]:
    """Questions over shared documents: prompt = document + question; the questions of all documents
    interleave in a random order, arriving Poisson at ``rate``/s."""
    if min(docs, doc_tokens, questions, question_tokens, output_tokens) < 1 or not rate > 0:
        raise ValueError("doc_trace needs positive sizes and rate")
    rng = random.Random(seed)
    texts = [random_prompt(rng, doc_tokens, vocab) for _ in range(docs)]
    order = [d for d in range(docs) for _ in range(questions)]
    rng.shuffle(order)
    items, t = [], 0.0
    for i, d in enumerate(order):
        if i:
            t += rng.expovariate(rate)
        items.append(WorkItem(f"doc{d}-q{i}", f"doc{d}", t, texts[d] + random_prompt(rng, question_tokens, vocab),
                              output_tokens))
    return items


def noshare_trace(n: int, prompt: tuple[int, int], output: tuple[int, int], rate: float, vocab: tuple[int, int],
                  seed: int) -> list[WorkItem]:
    """Requests whose prompts share nothing (random tokens): the prefix cache only costs here."""
    rng = random.Random(seed)
    items, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        items.append(WorkItem(f"ns-{i}", "noshare", t, random_prompt(rng, rng.randint(*prompt), vocab),
                              rng.randint(*output)))
    return items


def next_turn(prompt: Sequence[int], answer: Sequence[int], user: Sequence[int]) -> tuple[int, ...]:
    """A chat's next prompt: the whole transcript so far, the answer, then the new user message."""
    return (*prompt, *answer, *user)


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


# ---- runs ---------------------------------------------------------------------------------------------------


def _engine(args: argparse.Namespace, ranks: int, caching: bool):
    from infinite.cluster.local import LocalCluster

    cfg = EngineConfig(model=args.model, dtype="float32", num_instances=ranks, num_kv_blocks=args.pool_blocks,
                       max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching,
                       threads_per_rank=max(1, EngineConfig().rank_threads(1) // ranks))
    return LocalCluster(cfg)


def _params(max_tokens: int, salt: str | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, cache_salt=salt)


def _submit(eng, prompt: Sequence[int], max_tokens: int, rid: str, home: int | None = None,
            salt: str | None = None):
    req = eng.make_request(list(prompt), _params(max_tokens, salt), rid)
    req.data_parallel_rank = home
    eng.submit(req)
    return req


def _wait(eng, rids: set[str], timeout: float) -> dict[str, Any]:
    """Step until every request of ``rids`` finished; their outputs by id."""
    done: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while rids - set(done):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rids - set(done))} requests did not finish in {timeout:.0f} s")
        for out in eng.step():
            if out.finished and out.request_id in rids:
                done[out.request_id] = out
    return done


def _warm(eng, ranks: int, vocab: tuple[int, int], timeout: float) -> None:
    """First-call costs out of the clock, on every rank (a salt nothing else uses: no cache entry counts)."""
    rng = random.Random(99)
    rids = {f"warm-{r}" for r in range(ranks)}
    for r in range(ranks):
        _submit(eng, random_prompt(rng, 40, vocab), 4, f"warm-{r}", home=r if ranks > 1 else None, salt="warm-up")
    _wait(eng, rids, timeout)


def _summary(records: list[Record], stats: list[dict]) -> dict[str, Any]:
    s = summarize(records)
    served = [r for r in records if r.finished is not None and r.error is None]
    prompt = sum(r.prompt_tokens for r in served)
    s["hit_rate"] = sum(r.cached_tokens for r in served) / prompt if prompt else 0.0
    s["remote_hit_tokens"] = sum(st.get("prefix_cache_remote_hits", 0) for st in stats)
    s["preemptions"] = sum(st.get("num_preemptions", 0) for st in stats)
    s["requests_by_home"] = {str(h): sum(1 for r in served if r.home == h) for h in sorted({r.home for r in served
                                                                                          if r.home is not None})}
    return s


def run_trace(args: argparse.Namespace, work: list[WorkItem], ranks: int, caching: bool, vocab) -> dict[str, Any]:
    eng = _engine(args, ranks, caching)
    with _closing(eng):
        _warm(eng, ranks, vocab, args.timeout)
        records = serve_workload([eng], "cluster", work, args.timeout)
        stats = eng.stats()
    return _summary(records, stats)


def run_chat_once(args: argparse.Namespace, ranks: int, caching: bool, vocab) -> dict[str, Any]:
    """Closed loop: each conversation's next turn is submitted when its previous turn ends."""
    rng = random.Random(args.seed + 1)
    system = random_prompt(rng, args.system_tokens, vocab)
    users = [[random_prompt(rng, args.user_tokens, vocab) for _ in range(args.turns)] for _ in range(args.chats)]
    eng = _engine(args, ranks, caching)
    records: dict[str, Record] = {}
    with _closing(eng):
        _warm(eng, ranks, vocab, args.timeout)
        prompts: dict[int, tuple[int, ...]] = {}
        live: dict[str, int] = {}

        def submit(c: int, turn: int, prompt: tuple[int, ...]) -> None:
            rid = f"chat{c}-t{turn}"
            prompts[c] = prompt
            records[rid] = Record(rid, "chat", len(prompt), args.chat_output, submitted=time.time())
            _submit(eng, prompt, args.chat_output, rid)
            live[rid] = c

        for c in range(args.chats):
            submit(c, 0, (*system, *users[c][0]))
        deadline = time.monotonic() + args.timeout
        while live:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the chat trace did not finish in {args.timeout:.0f} s")
            for out in eng.step():
                c = live.pop(out.request_id, None)
                if c is None or not out.finished:
                    continue
                rec = records[out.request_id]
                m = out.metrics
                rec.first_token, rec.finished = m.first_token_time, m.finished_time or m.last_token_time
                rec.output_tokens = len(out.outputs[0].token_ids)
                rec.cached_tokens = out.num_cached_tokens
                rec.home = out.extra.get("rank")
                turn = int(out.request_id.rsplit("-t", 1)[1]) + 1
                if turn < args.turns:
                    submit(c, turn, next_turn(prompts[c], out.outputs[0].token_ids, users[c][turn]))
        stats = eng.stats()
    return _summary(list(records.values()), stats)


def run_remote(args: argparse.Namespace, vocab) -> dict[str, Any]:
    """Instance 1 caches a document; questions at home on instance 0 use it in place, or (salted) recompute it."""
    rng = random.Random(args.seed + 2)
    doc = random_prompt(rng, args.doc_tokens, vocab)
    eng = _engine(args, 2, True)
    ttft: dict[str, list[float]] = {"in place": [], "recomputed": []}
    cached: dict[str, list[int]] = {"in place": [], "recomputed": []}
    kv: list[dict] = []
    with _closing(eng):
        _warm(eng, 2, vocab, args.timeout)
        _submit(eng, doc + random_prompt(rng, args.question_tokens, vocab), 2, "holder", home=1)
        _wait(eng, {"holder"}, args.timeout)
        time.sleep(0.5)  # a few heartbeats: the gManager learns where the document is
        for i in range(args.remote_repeats):
            question = doc + random_prompt(rng, args.question_tokens, vocab)
            for kind, salt in (("in place", None), ("recomputed", f"miss-{i}")):
                rid = f"{kind[:2]}-{i}"
                t0 = time.time()
                _submit(eng, question, args.output_tokens, rid, home=0, salt=salt)
                out = _wait(eng, {rid}, args.timeout)[rid]
                ttft[kind].append(out.metrics.first_token_time - t0)
                cached[kind].append(out.num_cached_tokens)
                if kind == "in place":
                    kv.append(out.extra.get("kv_blocks", {}))
        stats = eng.stats()
    p50 = {k: statistics.median(v) for k, v in ttft.items()}
    return {"ttft_s": ttft, "ttft_p50_s": p50, "cached_tokens": cached, "kv_blocks_in_place": kv,
            "remote_hit_tokens": sum(s.get("prefix_cache_remote_hits", 0) for s in stats),
            "ratio_ttft_p50": ratio(p50["recomputed"], p50["in place"])}


# ---- the parts ----------------------------------------------------------------------------------------------


def _on_off(runs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    on, off = runs["on"], runs["off"]
    return {"ttft_p50": ratio(off["ttft_s"]["p50"], on["ttft_s"]["p50"]),
            "ttft_p99": ratio(off["ttft_s"]["p99"], on["ttft_s"]["p99"]),
            "tokens_per_s": ratio(on["tokens_per_s"], off["tokens_per_s"])}


def run_part(args: argparse.Namespace, part: str, vocab) -> dict[str, Any]:
    if part == "remote":
        return run_remote(args, vocab)
    if part == "noshare":
        work = noshare_trace(args.noshare_requests, args.noshare_prompt, args.noshare_output, args.noshare_rate,
                             vocab, args.seed + 3)
        runs: dict[str, list] = {"on": [], "off": []}
        for _ in range(args.repeats):  # alternating, so background load hits both alike
            for mode in ("on", "off"):
                runs[mode].append(run_trace(args, work, 1, mode == "on", vocab))
        med = {m: sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2] for m, rs in runs.items()}
        return {"instances": {"1": {**med, "ratios": _on_off(med),
                                    "tokens_per_s_runs": {m: [r["tokens_per_s"] for r in rs]
                                                          for m, rs in runs.items()}}}}
    out: dict[str, Any] = {"instances": {}}
    work = doc_trace(args.docs, args.doc_tokens, args.questions, args.question_tokens, args.output_tokens,
                     args.rate, vocab, args.seed) if part == "doc" else []
    for ranks in args.instances:
        runs = {}
        for mode in ("on", "off"):
            runs[mode] = (run_trace(args, work, ranks, mode == "on", vocab) if part == "doc"
                          else run_chat_once(args, ranks, mode == "on", vocab))
        out["instances"][str(ranks)] = {**runs, "ratios": _on_off(runs)}
    return out


def print_part(part: str, r: dict[str, Any], args: argparse.Namespace) -> None:
    if part == "remote":
        p50 = r["ttft_p50_s"]
        print_table(f"(c) remote: a {args.doc_tokens}-token document cached on instance 1, questions at home on "
                    f"instance 0 ({args.remote_repeats} alternating)", ["question", "TTFT p50 s", "cached tokens"],
                    [[k, p50[k], statistics.median(r["cached_tokens"][k])] for k in ("in place", "recomputed")])
        x = r["ratio_ttft_p50"]
        print(f"TTFT p50 recomputed / in place = {x:.2f} (target >= {TARGETS['remote_ttft_p50']})" if x else
              "TTFT ratio: n/a", flush=True)
        return
    titles = {"doc": f"(a) doc: {args.docs} documents x {args.doc_tokens} tokens, {args.questions} questions each "
                     f"({args.question_tokens} tokens, {args.output_tokens} out), {args.rate}/s Poisson",
              "chat": f"(b) chat: {args.chats} conversations x {args.turns} turns, system prompt "
                      f"{args.system_tokens}, user {args.user_tokens}, answer {args.chat_output} tokens",
              "noshare": f"(d) noshare: {args.noshare_requests} unrelated prompts {args.noshare_prompt}, output "
                         f"{args.noshare_output}, {args.noshare_rate}/s (median of {args.repeats} alternating)"}
    cols = ["instances", "caching", "served", "TTFT p50 s", "TTFT p99 s", "tokens/s", "hit rate", "remote hits",
            "preempt"]
    rows = []
    for ranks, runs in r["instances"].items():
        for mode in ("on", "off"):
            s = runs[mode]
            rows.append([ranks, mode, s["served"], s["ttft_s"]["p50"], s["ttft_s"]["p99"], s["tokens_per_s"],
                         s["hit_rate"], s["remote_hit_tokens"], s["preemptions"]])
    print_table(titles[part], cols, rows)
    for ranks, runs in r["instances"].items():
        q = runs["ratios"]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{ranks} instance(s): TTFT p50 off/on = {fmt(q['ttft_p50'])}, p99 off/on = {fmt(q['ttft_p99'])}, "
              f"tokens/s on/off = {fmt(q['tokens_per_s'])}", flush=True)


def verdicts(payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target against what was measured (only the parts that ran)."""
    out: dict[str, dict[str, Any]] = {}

    def judge(name: str, value: float | None) -> None:
        out[name] = {"value": value, "target": TARGETS[name], "met": value is not None and value >= TARGETS[name]}

    one = payload.get("doc", {}).get("instances", {}).get("1")
    if one is not None:
        judge("doc_ttft_p50", one["ratios"]["ttft_p50"])
        judge("doc_tokens_per_s", one["ratios"]["tokens_per_s"])
    if "remote" in payload:
        judge("remote_ttft_p50", payload["remote"]["ratio_ttft_p50"])
    if "noshare" in payload:
        judge("noshare_tokens_per_s", payload["noshare"]["instances"]["1"]["ratios"]["tokens_per_s"])
    return out


# ---- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench prefix", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny Llama)")
    p.add_argument("--instances", default="1,2", help="deployments for doc and chat (default 1,2)")
    p.add_argument("--pool-blocks", type=_positive_int, default=2048, help="KV blocks per instance")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, help="token budget of a step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=_positive_float, default=1800.0, help="seconds one run may take")
    p.add_argument("--out", default="bench-results/prefix.json", help="JSON result path ('' to skip)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run: the ratios mean little)")
    d = p.add_argument_group("(a) doc and (c) remote")
    d.add_argument("--docs", type=_positive_int, default=2)
    d.add_argument("--doc-tokens", type=_positive_int, default=8192)
    d.add_argument("--questions", type=_positive_int, default=16)
    d.add_argument("--question-tokens", type=_positive_int, default=32)
    d.add_argument("--output-tokens", type=_positive_int, default=16)
    d.add_argument("--rate", type=_positive_float, default=0.5, help="questions per second (Poisson)")
    d.add_argument("--remote-repeats", type=_positive_int, default=3)
    c = p.add_argument_group("(b) chat")
    c.add_argument("--chats", type=_positive_int, default=4)
    c.add_argument("--turns", type=_positive_int, default=6)
    c.add_argument("--system-tokens", type=_positive_int, default=512)
    c.add_argument("--user-tokens", type=_positive_int, default=64)
    c.add_argument("--chat-output", type=_positive_int, default=32)
    n = p.add_argument_group("(d) noshare")
    n.add_argument("--noshare-requests", type=_positive_int, default=24)
    n.add_argument("--noshare-prompt", type=_int_range, default=(256, 1024))
    n.add_argument("--noshare-output", type=_int_range, default=(16, 48))
    n.add_argument("--noshare-rate", type=_positive_float, default=2.0)
    n.add_argument("--repeats", type=_positive_int, default=3)
    args = p.parse_args(list(argv))
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or set(args.parts) - set(PARTS):
        p.error(f"--parts: expected a comma-separated subset of {','.join(PARTS)}")
    try:
        args.instances = sorted({int(x) for x in args.instances.split(",") if x.strip()})
    except ValueError:
        p.error("--instances: expected a comma-separated list of 1 and/or 2")
    if not args.instances or set(args.instances) - {1, 2}:
        p.error("--instances: expected a comma-separated list of 1 and/or 2")
    if args.quick:
        for name, v in dict(docs=1, doc_tokens=256, questions=3, question_tokens=8, output_tokens=4, rate=4.0,
                            remote_repeats=1, chats=2, turns=2, system_tokens=32, user_tokens=8, chat_output=4,
                            noshare_requests=3, noshare_prompt=(16, 48), noshare_output=(2, 4), noshare_rate=8.0,
                            repeats=1, pool_blocks=256).items():
            setattr(args, name, v)
    return args


def main(argv: Sequence[str]) -> int:
    import torch

    from infinite.runtime.engine import resolve_model_dir

    args = parse_args(argv)
    torch.set_num_threads(1)  # this process only drives; the ranks do the work
    vocab = model_vocab(resolve_model_dir(args.model))
    payload: dict[str, Any] = {"bench": "prefix", "args": {k: (list(v) if isinstance(v, tuple) else v)
                                                            for k, v in vars(args).items()}}
    for part in args.parts:
        payload[part] = run_part(args, part, vocab)
        print_part(part, payload[part], args)
    payload["targets"] = verdicts(payload)
    for name, v in payload["targets"].items():
        val = "n/a" if v["value"] is None else f"{v['value']:.2f}"
        print(f"target {name}: {val} (>= {v['target']}): {'met' if v['met'] else 'NOT met'}", flush=True)
    if args.out:
        print(f"wrote {write_json(args.out, payload)}", flush=True)
    return 0
