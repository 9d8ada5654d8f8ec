"""Serving benchmark in the style of ``vllm bench serve``.

    python -m infinite.bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8

Requests arrive as a Poisson process at ``--request-rate`` (``inf``: all at
once), each a streamed ``POST /v1/completions`` with ``stream_options.include_usage``,
so it runs against any OpenAI-compatible server. Prompt and output lengths
come from a synthetic mix (``longtail``: log-normal, most requests short and
a few up to the cluster's capacity; or ``uniform`` / ``fixed``). Reports
request throughput, output tokens/s, and TTFT / TPOT / ITL / E2E mean,
median and p99 in ms; ``--result-file`` writes them as JSON.

TTFT is the time to the first chunk with text, ITL the gaps between chunks
with text, TPOT ``(e2e - ttft) / (output_tokens - 1)``; output tokens come
from the server's usage numbers when it sends them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Common English words: one token each in most BPE vocabularies, so a prompt of
# L words is close to L tokens on any server.
WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they which one you were "
    "her all she there would their we him been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three sea light house keeper morning bread road river town window"
).split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int  # intended length (words or token ids)
    max_tokens: int


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


# --------------------------------------------------------------------------- dataset


def sample_lengths(rng: random.Random, n: int, mean: int, max_len: int, dist: str, min_len: int = 1) -> list[int]:
    """``n`` lengths in [min_len, max_len] with roughly the given mean."""
    if not 1 <= min_len <= mean <= max_len:
        raise ValueError(f"need 1 <= min ({min_len}) <= mean ({mean}) <= max ({max_len})")
    if dist == "fixed":
        return [mean] * n
    if dist == "uniform":
        lo = max(min_len, 2 * mean - max_len)
        return [rng.randint(lo, 2 * mean - lo) for _ in range(n)]
    if dist == "longtail":
        sigma = 1.0  # log-normal: median = mean / e^(sigma^2/2), a long right tail
        mu = math.log(mean) - sigma**2 / 2
        return [min(max_len, max(min_len, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]
    raise ValueError(f"unknown length distribution {dist!r}: expected longtail, uniform or fixed")


def synthetic_requests(
    n: int, rng: random.Random, input_mean: int, input_max: int, output_mean: int, output_max: int,
    dist: str = "longtail", prompt_format: str = "text", vocab: int = 1000,
) -> list[BenchRequest]:
    ins = sample_lengths(rng, n, input_mean, input_max, dist)
    outs = sample_lengths(rng, n, output_mean, output_max, dist)
    reqs = []
    for i, (li, lo) in enumerate(zip(ins, outs)):
        if prompt_format == "tokens":
            prompt: str | list[int] = [rng.randrange(10, vocab) for _ in range(li)]
        elif prompt_format == "text":
            prompt = " ".join([f"{i}:"] + [rng.choice(WORDS) for _ in range(li - 1)])  # distinct prefixes
        else:
            raise ValueError(f"unknown prompt format {prompt_format!r}: expected text or tokens")
        reqs.append(BenchRequest(prompt, li, lo))
    return reqs


# --------------------------------------------------------------------------- running


async def send_one(session: Any, url: str, headers: dict, model: str, req: BenchRequest, ignore_eos: bool) -> RequestResult:
    body: dict[str, Any] = {
        "model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "stream": True,
        "stream_options": {"include_usage": True}, "temperature": 0.0,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    res = RequestResult(ok=False, prompt_len=req.prompt_len)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    done = False
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.e2e = time.perf_counter() - t0
    res.output_tokens = res.output_tokens or chunks
    res.ok = done
    if not done:
        res.error = "stream ended without [DONE]"
    return res


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    base = args.url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        model, limit = await server_info(session, base, headers, args.model)
        input_max = args.input_len_max or max(1, min(limit - args.output_len_max, 8 * args.input_len_mean))
        rng = random.Random(args.seed)
        reqs = synthetic_requests(
            args.num_prompts, rng, args.input_len_mean, input_max, args.output_len_mean, args.output_len_max,
            args.length_dist, args.prompt_format,
        )
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def limited(r: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_one(session, base + "/v1/completions", headers, model, r, args.ignore_eos)
            async with sem:
                return await send_one(session, base + "/v1/completions", headers, model, r, args.ignore_eos)

        tasks = []
        t0 = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.ensure_future(limited(r)))
            if args.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    summary = summarize(results, duration)
    summary.update(
        model=model, url=base, num_prompts=args.num_prompts, request_rate=args.request_rate,
        max_concurrency=args.max_concurrency, length_dist=args.length_dist,
        input_len_mean=args.input_len_mean, input_len_max=input_max,
        output_len_mean=args.output_len_mean, output_len_max=args.output_len_max,
    )
    return summary


async def server_info(session: Any, base: str, headers: dict, model: str | None) -> tuple[str, int]:
    """The model to ask for and the longest request the server takes (capacity when it says)."""
    async with session.get(base + "/v1/models", headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models answered {resp.status}: {(await resp.text())[:300]}")
        cards = (await resp.json())["data"]
    if model is None:
        model = cards[0]["id"]
    card = next((c for c in cards if c["id"] == model), cards[0])
    limit = int(card.get("max_model_len") or 4096)
    try:  # Infinite's status page knows the KV capacity of the whole cluster
        async with session.get(base + "/status", headers=headers) as resp:
            if resp.status == 200:
                limit = min(limit, int((await resp.json()).get("capacity_tokens") or limit))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return model, limit


# --------------------------------------------------------------------------- report


def stats_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    xs = sorted(values)
    p99 = xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)]
    return {"mean": 1e3 * statistics.fmean(xs), "median": 1e3 * statistics.median(xs), "p99": 1e3 * p99}


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in ok]),
        "tpot_ms": stats_ms(tpot),
        "itl_ms": stats_ms([x for r in ok for x in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in ok]),
    }


def format_report(s: dict[str, Any]) -> str:
    lines = [
        "============ Serving Benchmark Result ============",
        f"{'Successful requests:':<40}{s['completed']:>10}",
        f"{'Failed requests:':<40}{s['failed']:>10}",
        f"{'Benchmark duration (s):':<40}{s['duration_s']:>10.2f}",
        f"{'Total input tokens:':<40}{s['total_input_tokens']:>10}",
        f"{'Total generated tokens:':<40}{s['total_output_tokens']:>10}",
        f"{'Request throughput (req/s):':<40}{s['request_throughput']:>10.2f}",
        f"{'Output token throughput (tok/s):':<40}{s['output_throughput']:>10.2f}",
        f"{'Total token throughput (tok/s):':<40}{s['total_token_throughput']:>10.2f}",
    ]
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2e_ms", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{title}{'-' * 15}")
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {key[:-3].upper()} (ms):':<40}{s[key][stat]:>10.2f}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    lines.append("=" * 50)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infinite.bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--length-dist", default="longtail", choices=["longtail", "uniform", "fixed"])
    p.add_argument("--input-len-mean", type=int, default=128)
    p.add_argument("--input-len-max", type=int, default=None, help="default: what the server holds, up to 8x the mean")
    p.add_argument("--output-len-mean", type=int, default=64)
    p.add_argument("--output-len-max", type=int, default=512)
    p.add_argument("--prompt-format", default="text", choices=["text", "tokens"], help="words, or random token ids")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="send ignore_eos (vLLM extension)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds")
    p.add_argument("--result-file", default=None, help="write the summary here as JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_prompts < 1 or args.request_rate <= 0 or (args.max_concurrency is not None and args.max_concurrency < 1):
        print("error: --num-prompts, --request-rate and --max-concurrency must be positive", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(args))
    except (RuntimeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))
    if args.result_file:
        with open(args.result_file, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
