"""Soak: mixed streaming load on a local cluster while one rank is killed and a new one joins.

    python -m infinite.bench soak --ranks 3 --duration 60 --kill-at 20

Starts ``infinite serve --num-instances R`` (the embedded model unless
``--model``), computes each prompt's greedy answer on the undisturbed cluster,
then runs ``--concurrency`` clients for ``--duration`` seconds: streamed and
non-streamed completions and chats, short prompts and long ones that borrow
KV blocks across ranks. At ``--kill-at`` seconds the last worker rank gets
SIGKILL; at ``--join-at`` a new instance joins (``infinite join``). Every
request is classified:

* ok — ended normally with exactly the undisturbed greedy text;
* failed (by cause) — ended with an HTTP error or an error event (e.g.
  ``rank_lost`` when no survivor can hold it): an honest failure;
* mismatch — ended normally but with different text (counted as lost);
* lost — never ended, ended without ``[DONE]`` or cut short without an error:
  must be 0.

After the load it waits for the cluster to go idle and walks every pool
(blocks in tables, blocks lent, free list): blocks leaked must be 0. It
prints requests ok / recomputed / failed by cause / lost, blocks leaked,
rank memory before and after, the time the kill took to be detected, and
whether rank 0's cost model stayed calibrated through the load (looked up on
``/status`` every second: once its fit has seen remote steps it must not
forget them while they keep coming), and writes the numbers as JSON
(``--out``). Exit status 1 if anything was lost or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from infinite.bench.common import print_table, write_json
from infinite.bench.procs import LocalCluster, rss_mib
from infinite.bench.serve import WORDS

CLIENT_TIMEOUT_S = 60.0  # a request not ended by then counts as lost


@dataclass(frozen=True)
class Job:
    """One prompt of the mix: its route, whether it streams, and how long it is."""

    prompt: str
    max_tokens: int
    chat: bool
    stream: bool


def make_jobs(seed: int, n: int, long_words: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        words = long_words if i % 4 == 0 else rng.randint(3, 40)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        jobs.append(Job(prompt, rng.randint(8, 48), chat=i % 3 == 2, stream=i % 5 != 4))
    return jobs


def classify(status: int, events: list[dict], done: bool, text: str, expected: str | None) -> tuple[str, str]:
    """(outcome, cause) of one request: "ok", "failed" (with why), "mismatch" or "lost"."""
    if status != 200:
        return "failed", f"http {status}"
    errors = [e for e in events if "error" in e]
    if errors:
        return "failed", f"error {errors[-1]['error'].get('code')}"
    finishes = [c.get("finish_reason") for e in events for c in e.get("choices", []) if c.get("finish_reason")]
    if not done or not finishes or finishes[-1] not in ("stop", "length"):
        return "lost", "no normal end" if done else "no [DONE]"
    if expected is not None and text != expected:
        return "mismatch", "different text"
    return "ok", ""


def body_of(job: Job, stream: bool) -> dict:
    common = {"model": None, "max_tokens": job.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": stream}
    if job.chat:
        return {**common, "messages": [{"role": "user", "content": job.prompt}]}
    return {**common, "prompt": job.prompt}


def text_of(job: Job, events: list[dict]) -> str:
    key = "delta" if job.chat else None
    out = []
    for e in events:
        for c in e.get("choices", []):
            if job.chat:
                out.append((c.get(key) or c.get("message") or {}).get("content") or "")
            else:
                out.append(c.get("text") or "")
    return "".join(out)


async def one_request(session, url: str, job: Job, stream: bool) -> tuple[int, list[dict], bool]:
    """POST it; (status, the JSON events or body, whether it ended with [DONE] / a full body)."""
    path = "/v1/chat/completions" if job.chat else "/v1/completions"
    async with session.post(url + path, json=body_of(job, stream)) as resp:
        if not stream or resp.status != 200:
            raw = await resp.read()
            try:
                return resp.status, [json.loads(raw)], True
            except ValueError:
                return resp.status, [], False
        events, done = [], False
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                done = True
                break
            events.append(json.loads(line[6:]))
        return resp.status, events, done


async def run_load(cluster: LocalCluster, jobs: list[Job], expected: dict[int, str], args, events_log: list,
                   calibration: list) -> Counter:
    import aiohttp

    tally: Counter = Counter()
    t0 = time.monotonic()
    rng = random.Random(args.seed + 1)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)

    async def client(k: int) -> None:
        async with aiohttp.ClientSession(timeout=timeout) as s:
            n = 0
            while time.monotonic() - t0 < args.duration and n < args.max_requests_per_client:
                n += 1
                i = rng.randrange(len(jobs))
                job = jobs[i]
                try:
                    status, evs, done = await one_request(s, cluster.url, job, job.stream)
                except asyncio.TimeoutError:
                    status, evs, done = 200, [], False
                except aiohttp.ClientError as e:
                    tally[("failed", f"connection: {type(e).__name__}")] += 1
                    continue
                outcome, cause = classify(status, evs, done, text_of(job, evs), expected.get(i))
                tally[(outcome, cause)] += 1
                if outcome in ("lost", "mismatch"):
                    events_log.append({"job": i, "outcome": outcome, "cause": cause, "events": evs[-3:]})

    async def chaos() -> None:
        await asyncio.sleep(args.kill_at)
        workers = cluster.worker_pids()
        rank = max(workers)
        os.kill(workers[rank], signal.SIGKILL)
        killed = time.monotonic()
        events_log.append({"t": round(killed - t0, 2), "event": f"SIGKILL to rank {rank} (pid {workers[rank]})"})
        while cluster.health()[1].get("status") != "degraded":
            await asyncio.sleep(0.05)
            if time.monotonic() - killed > 30:
                raise RuntimeError("the kill was not detected in 30 s")
        events_log.append({"t": round(time.monotonic() - t0, 2), "event": "degraded",
                           "detected_after_s": round(time.monotonic() - killed, 2)})
        await asyncio.sleep(max(0.0, args.join_at - (time.monotonic() - t0)))
        cluster.join()
        events_log.append({"t": round(time.monotonic() - t0, 2), "event": "infinite join started"})
        await asyncio.get_running_loop().run_in_executor(None, cluster.wait_health, "ok", 120.0)
        events_log.append({"t": round(time.monotonic() - t0, 2), "event": "healthy again"})

    async def watch_cost_model() -> None:
        """Rank 0's cost model through the load (/status, every second): calibrated or not, and how
        many measured decode steps with and without remote calls its fit holds."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            while time.monotonic() - t0 < args.duration:
                try:
                    async with s.get(cluster.url + "/status") as r:
                        cm = (await r.json()).get("cost_model", {})
                    calibration.append({"t": round(time.monotonic() - t0, 1), "calibrated": cm.get("calibrated"),
                                        **{f"samples_{k}": v for k, v in cm.get("samples", {}).items()}})
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    pass  # rank 0 busy for a moment: the next look
                await asyncio.sleep(1.0)

    chaos_task = asyncio.ensure_future(chaos())
    watch_task = asyncio.ensure_future(watch_cost_model())
    await asyncio.gather(*(client(k) for k in range(args.concurrency)))
    await chaos_task
    await watch_task
    return tally


def calibration_summary(timeline: list[dict]) -> dict:
    """When the cost model was first calibrated, and whether it stayed so from then to the end of the
    load (lending for throughput switches itself off when it does not)."""
    first = next((x["t"] for x in timeline if x["calibrated"]), None)
    after = [x for x in timeline if first is not None and x["t"] >= first]
    return {"first_calibrated_s": first, "looks": len(timeline),
            "stayed_calibrated": first is not None and all(x["calibrated"] for x in after),
            "uncalibrated_looks_after_first": sum(1 for x in after if not x["calibrated"]),
            "remote_samples_at_end": timeline[-1].get("samples_remote") if timeline else None}


async def references(cluster: LocalCluster, jobs: list[Job]) -> dict[int, str]:
    """Each prompt's greedy text on the undisturbed cluster (non-streamed)."""
    import aiohttp

    out = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for i, job in enumerate(jobs):
            status, evs, _ = await one_request(s, cluster.url, job, False)
            if status != 200:
                raise RuntimeError(f"reference request {i} failed: {status} {evs}")
            c = evs[0]["choices"][0]
            out[i] = c["message"]["content"] if job.chat else c["text"]
    return out


def leaked_blocks(status: dict) -> int:
    """Blocks still held anywhere once idle, walked: entries in block tables, blocks lent, and
    pool blocks missing from the free lists. (A heartbeat walks only when its instance is idle;
    a busy one reports None, counted here as nothing walked.)"""
    return sum((i.get("table_blocks") or 0) + (i.get("lent_entries") or 0) + (i["total_blocks"] - i["free_blocks"])
               for i in status["instances"])


def wait_idle(cluster: LocalCluster, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = cluster.status()
        busy = st["in_flight"] or any(i["num_running"] or i["num_waiting"] for i in st["instances"])
        if not busy and not leaked_blocks(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infinite.bench soak", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds into the load when the last worker is killed")
    p.add_argument("--join-at", type=float, default=None, help="when a new instance joins (default: halfway after the kill)")
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--max-requests-per-client", type=int, default=10_000)
    p.add_argument("--num-kv-blocks", type=int, default=48, help="per instance")
    p.add_argument("--long-words", type=int, default=600, help="length of the long prompts (a quarter of the mix)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="soak.json")
    args = p.parse_args(argv)
    if args.ranks < 2 or not 0 < args.kill_at < args.duration:
        p.error("need --ranks >= 2 and 0 < --kill-at < --duration")
    if args.join_at is None:
        args.join_at = args.kill_at + (args.duration - args.kill_at) / 2
    extra = ["--num-kv-blocks", str(args.num_kv_blocks), "--dtype", "float32", "--threads-per-rank", "1",
             "--max-pending", "4096"]
    if args.model:
        extra += ["--model", args.model]
    cluster = LocalCluster(args.ranks, extra)
    events: list = []
    try:
        cluster.start()
        jobs = make_jobs(args.seed, args.prompts, args.long_words)
        expected = asyncio.run(references(cluster, jobs))
        mem_before = rss_mib(cluster.rank_pids())
        before = cluster.status()
        t0 = time.monotonic()
        calibration: list[dict] = []
        tally = asyncio.run(run_load(cluster, jobs, expected, args, events, calibration))
        elapsed = time.monotonic() - t0
        after = wait_idle(cluster)
        mem_after = rss_mib(cluster.rank_pids())
    finally:
        orphans = cluster.stop()
    ok = sum(n for (o, _), n in tally.items() if o == "ok")
    lost = sum(n for (o, _), n in tally.items() if o in ("lost", "mismatch"))
    failed = {c: n for (o, c), n in tally.items() if o == "failed"}
    rec = after.get("recovery", {})
    recomputed = rec.get("moved", 0) + rec.get("recomputed_at_home", 0)
    leaked = leaked_blocks(after)
    detected = next((e["detected_after_s"] for e in events if "detected_after_s" in e), None)
    cal = calibration_summary(calibration)
    rows = [["requests", sum(tally.values())], ["ok", ok], ["recomputed", recomputed],
            *[[f"failed: {c}", n] for c, n in sorted(failed.items())], ["lost", lost], ["blocks leaked", leaked],
            ["kill detected after s", detected], ["ranks before / after", f"{len(before['instances'])} / "
                                                  f"{len(after['instances'])}"],
            ["rank memory MiB before", round(mem_before, 1)], ["rank memory MiB after", round(mem_after, 1)],
            ["orphans", len(orphans)],
            ["cost model calibrated from s", cal["first_calibrated_s"]],
            ["stayed calibrated to the end", cal["stayed_calibrated"]],
            ["remote decode samples at the end", cal["remote_samples_at_end"]]]
    print_table(f"soak: {args.ranks} ranks, {elapsed:.0f} s of load, kill at {args.kill_at:.0f} s, "
                f"join at {args.join_at:.0f} s", ["what", "value"], rows)
    for e in events:
        print(json.dumps(e))
    write_json(args.out, {"args": vars(args), "requests": sum(tally.values()), "ok": ok, "recomputed": recomputed,
                          "failed": failed, "lost": lost, "blocks_leaked": leaked, "kill_detected_after_s": detected,
                          "memory_mib_before": mem_before, "memory_mib_after": mem_after, "orphans": orphans,
                          "events": events, "recovery": rec, "health_after": after.get("health"),
                          "cost_model": {**cal, "timeline": calibration}})
    return 1 if lost or leaked or orphans else 0
