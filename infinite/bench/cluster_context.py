"""Part (e) of ``python -m infinite.bench cluster``: a decode step's host work at a long context.

One request's KV spread over three instances (a third on each of two creditors,
the rest, with the tail, at home), decoded at each ``--contexts`` length side by
side in one run (the lengths alternate repeat by repeat). Three CPU rank
processes on the point-to-point data plane, one torch thread each, serve the
embedded tiny Llama's shape with a context limit long enough for the longest
case (``infinite.tiny.write_tiny_checkpoint(..., max_position_embeddings)``).

The prompt's KV is written synthetically instead of computing a 256K-token
prefill: every pool holds random K/V, the request's blocks are reserved on the
creditors through the ordinary ``try_move_kvcache`` (``Reserve``), and the
request enters its home's batch with its prompt computed, so every step is a
decode step. What is measured is the home's host work per decode step, from the
engine's step timers: schedule + prepare + postprocess, everything but the
forward and its waits for the creditors; beside it the forward, the bytes the
home sends each creditor per step (the step's header and block diffs, once; the
queries, per layer) and the size of the outputs message the home sends rank 0
per step (``messages.Outputs``, msgpack).

Modes, each side by side over the contexts: ``stream`` (a delta output every
step, encoded as the home sends it to rank 0, between steps as the instance's
loop does), ``final`` (only the finished output, as ``LLM.generate`` asks), and
``final-cold``, a control: ``final`` with ``--context-cold-mb`` of memory
touched on the home before every step, so that every context's host work starts
from caches as cold as a long context's forward leaves them (on CPU the forward
of a 256K-token step reads hundreds of MB; a 1K-token one hardly any).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

TARGET = 1.2  # host time per step at the longest context / at the shortest, at most
MODES = {"stream": (False, False), "final": (True, False), "final-cold": (True, True)}  # (final only, cold)
BLOCK = 16
RANKS = 3
HEADER_BYTES = 8 * 8  # p2p.HEADER int64s


def run_context(contexts: list[int], steps: int, repeats: int, warmup: int, cold_mb: int, timeout: float,
                seed: int) -> dict[str, Any]:
    """Start the three ranks, run the cases on rank 0, stop everything; rank 0's measurements."""
    from infinite.bench.procs import _env
    from infinite.cluster.rpc_transport import free_port
    from infinite.kv.rmanager import blocks_for
    from infinite.tiny import write_tiny_checkpoint

    longest = blocks_for(max(contexts) + warmup + steps + 2, BLOCK)
    pool = longest - 2 * (longest // RANKS) + 8  # the home's share of the longest request, and some room
    with tempfile.TemporaryDirectory(prefix="bench-context-") as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "ckpt", max_position_embeddings=longest * BLOCK)
        spec = {"ckpt": str(ckpt), "pool": pool, "contexts": contexts, "steps": steps, "repeats": repeats,
                "warmup": warmup, "cold_mb": cold_mb, "seed": seed, "timeout": timeout, "out": str(Path(tmp) / "result.json"),
                "rpc": f"tcp://127.0.0.1:{free_port()}", "data": f"tcp://127.0.0.1:{free_port()}"}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        procs = [subprocess.Popen([sys.executable, "-m", "infinite.bench.cluster_context", str(spec_path), str(r)],
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
                 for r in range(RANKS)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            logs = [p.communicate(timeout=30)[0] for p in procs]
        if any(p.returncode for p in procs) or not Path(spec["out"]).exists():
            tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{log[-3000:]}"
                              for r, (p, log) in enumerate(zip(procs, logs)))
            raise RuntimeError(f"the long-context ranks failed:\n{tails}")
        result = json.loads(Path(spec["out"]).read_text())
    result["config"].update(ranks=RANKS, pool_blocks=pool, block_size=BLOCK, threads_per_rank=1)
    result["host_path_us"] = host_path(contexts, steps + warmup, cold_mb)
    return result


def host_path(contexts: list[int], steps: int, cold_mb: int) -> dict[str, Any]:
    """The remote decode step's own host path alone, in this process: the persistent batch's sync, the
    micro-batch's local inputs and its parts for the creditors (StepRunner.micro_batches' work), for one
    request per context with its blocks a third on each of two creditors; warm, and with ``cold_mb``
    touched before every step (as a long forward leaves the caches) -> microseconds per step."""
    import torch

    from infinite.cluster.remote_attention import RemoteWire
    from infinite.kv.rmanager import RBlock, RManager, blocks_for
    from infinite.runtime.input_batch import InputBatch
    from infinite.runtime.model_runner import prepare_inputs
    from infinite.runtime.request import Request
    from infinite.sampling.params import SamplingParams

    flush = torch.zeros(cold_mb << 18)
    out: dict[str, Any] = {}
    for cold in (False, True):
        for ctx in contexts:
            nb = blocks_for(ctx + steps + 1, BLOCK)
            share = nb // RANKS
            rm = RManager(0, nb - 2 * share + 1, BLOCK)
            rm.append_remote("r", [RBlock(1 + i // share, i % share) for i in range(2 * share)])
            rm.allocate("r", blocks_for(ctx, BLOCK) - 2 * share)  # the prompt's; then one as decoding needs
            req = Request("r", [0] * ctx, SamplingParams(), max_tokens=steps + 1)
            req.num_computed_tokens = ctx - 1
            ib = InputBatch(rm, 8, nb - 2 * share + 1, torch.device("cpu"))
            wire = RemoteWire(0)
            times = []
            for _ in range(steps):
                if rm.num_needed("r", req.num_computed_tokens + 1):  # the scheduler's growth: a block now and then
                    rm.allocate("r", 1)
                if cold:
                    flush.add_(1.0)
                t0 = time.perf_counter()
                ib.sync([req])
                inputs = prepare_inputs(ib, {"r": 1}, torch.device("cpu"), rows=[0])
                parts = wire.parts(ib, inputs.rows, inputs.q_lens, inputs.q_starts)
                RemoteWire.attach_drops(parts, ib.take_remote_dropped(), ib)
                times.append(time.perf_counter() - t0)
                req.output_token_ids.append(5)
                req.num_computed_tokens += 1
            out.setdefault("cold" if cold else "warm", {})[str(ctx)] = 1e6 * statistics.median(times[1:])
    lo, hi = str(min(contexts)), str(max(contexts))
    out["ratios"] = {k: out[k][hi] / out[k][lo] for k in ("warm", "cold")}
    return out


def _rank_main(spec: dict[str, Any], rank: int) -> int:
    """One rank: its instance on the point-to-point plane; rank 0 runs the cases, the others serve."""
    import torch

    from infinite.cluster.endpoint import RankEndpoint
    from infinite.cluster.instance import Instance
    from infinite.cluster.p2p import P2PTransport
    from infinite.runtime.config import EngineConfig

    torch.set_num_threads(1)
    cfg = EngineConfig(model=spec["ckpt"], dtype="float32", device="cpu", num_kv_blocks=spec["pool"],
                       block_size=BLOCK, num_instances=RANKS, max_lend_fraction=1.0, max_num_seqs=8,
                       threads_per_rank=1, data_plane="p2p")
    tr = P2PTransport(rank, RANKS, spec["rpc"], spec["data"], torch.device("cpu"), timeout_s=spec["timeout"],
                      data_timeout_s=spec["timeout"])
    inst = Instance(cfg, rank, RANKS, tr, timeout_s=spec["timeout"])
    gen = torch.Generator().manual_seed(spec["seed"] + rank)
    with torch.no_grad():  # the synthetic KV of every pool
        inst.engine.kv.k.normal_(generator=gen)
        inst.engine.kv.v.normal_(generator=gen)
    tr.start(RankEndpoint(inst, None))
    try:
        if rank != 0:
            while not inst.stopping:  # serve until rank 0 says stop
                time.sleep(0.05)
            return 0
        deadline = time.monotonic() + spec["timeout"]
        for c in range(1, RANKS):  # RPC's group is dynamic: the others may not have joined it yet
            while True:
                try:
                    tr.ping(c, timeout=5.0).wait()
                    break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        result = _cases(inst, tr, spec)
        Path(spec["out"]).write_text(json.dumps(result))
        for c in range(1, RANKS):
            tr.stop(c).wait()
        return 0
    finally:
        tr.close()
        inst.close()


def _cases(inst, tr, spec: dict[str, Any]) -> dict[str, Any]:
    from infinite.cluster import messages as M
    from infinite.cluster.p2p import meta_ints

    sent: Counter = Counter()  # bytes rank 0 sent each creditor (data plane), since the last reset
    meta_sent: Counter = Counter()
    attention = tr.attention

    def counting(dst, call, tensors, timeout=None):
        q = tensors.q
        n = q.numel() * q.element_size()
        if tensors.slots is not None:
            n += (tensors.k.numel() + tensors.v.numel()) * q.element_size()
        if call.meta is not None:  # the step's header and block diffs, as the p2p plane encodes them
            m = HEADER_BYTES + 8 * meta_ints(call.meta, tensors.slots).numel()
            meta_sent[dst] += m
            n += m
        sent[dst] += n
        return attention(dst, call, tensors, timeout)

    tr.attention = counting  # the step runner calls it through the same transport object
    rng = random.Random(spec["seed"])
    steps: dict[tuple[str, int], list[dict[str, float]]] = {(m, c): [] for m in MODES for c in spec["contexts"]}
    first_meta: dict[int, dict[str, int]] = {}
    for rep in range(spec["repeats"]):
        for mode, (final_only, cold) in MODES.items():
            for ctx in spec["contexts"]:
                rows, first = _one_case(inst, ctx, spec, rng, f"{mode}{ctx}-{rep}", final_only, cold, sent, meta_sent, M)
                steps[(mode, ctx)].extend(rows)
                first_meta[ctx] = first
    tr.attention = attention
    cases: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    for (mode, ctx), rows in steps.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        cases[mode][str(ctx)] = {
            "context": ctx, "steps": len(rows),
            "host_ms": med["host_ms"], "host_ms_mean": statistics.fmean(r["host_ms"] for r in rows),
            "host_ms_steps": [round(r["host_ms"], 4) for r in rows],
            "host_ms_p90": sorted(r["host_ms"] for r in rows)[int(0.9 * (len(rows) - 1))],
            "schedule_ms": med["schedule_ms"], "prepare_ms": med["prepare_ms"], "postprocess_ms": med["postprocess_ms"],
            "forward_ms": med["forward_ms"],
            "bytes_per_creditor": {str(c): med[f"bytes_{c}"] for c in range(1, RANKS)},
            "meta_bytes_per_creditor": {str(c): med[f"meta_{c}"] for c in range(1, RANKS)},
            "first_step_meta_bytes": first_meta[ctx],
            "outputs_bytes": med["outputs_bytes"], "outputs_encode_ms": med["outputs_encode_ms"],
        }
    lo, hi = str(min(spec["contexts"])), str(max(spec["contexts"]))
    ratios = {m: cases[m][hi]["host_ms"] / cases[m][lo]["host_ms"] for m in MODES}
    return {
        "config": {"contexts": spec["contexts"], "steps": spec["steps"], "repeats": spec["repeats"],
                   "warmup": spec["warmup"], "modes": list(MODES), "cold_mb": spec["cold_mb"]},
        "cases": cases, "ratios": ratios, "target_ratio": TARGET,
        "meets_target": {m: r <= TARGET for m, r in ratios.items()},
    }


def _one_case(inst, ctx: int, spec: dict[str, Any], rng: random.Random, rid: str, final_only: bool, cold: bool,
              sent: Counter, meta_sent: Counter, M) -> tuple[list[dict[str, float]], dict[str, int]]:
    """Place one request of ``ctx`` tokens over the three pools, decode it, take it away again."""
    import torch

    from infinite.kv.rmanager import RBlock, blocks_for
    from infinite.runtime.request import Status
    from infinite.sampling.params import SamplingParams

    e, tr = inst.engine, inst.transport
    warmup, n_steps = spec["warmup"], spec["steps"]
    nb = blocks_for(ctx + warmup + n_steps + 1, BLOCK)
    share = nb // RANKS
    refs = []
    for c in range(1, RANKS):  # the oldest blocks on the creditors, a third each (local-first: the tail at home)
        got = tr.reserve(c, M.Reserve(0, rid, share), timeout=spec["timeout"]).wait().blocks
        if len(got) != share:
            raise RuntimeError(f"rank {c} lent {len(got)} of {share} blocks")
        refs += [RBlock(c, b) for b in got]
    inst.rm.append_remote(rid, refs)
    inst.rm.allocate(rid, nb - len(refs))
    vocab = e.model_config.vocab_size
    prompt = [rng.randrange(10, vocab) for _ in range(ctx)]
    params = SamplingParams(temperature=0.0, max_tokens=warmup + n_steps + 1, ignore_eos=True)
    req = e.build_request(rid, prompt, params, params.max_tokens, None)
    req.num_computed_tokens = ctx - 1  # the prompt's KV is in place: the next step decodes its last token
    req.output_kind = "final_only" if final_only else "delta"  # a home's outputs to rank 0 are deltas
    e.submit(req)
    e.scheduler.waiting.remove(req)  # admitted as it is: its blocks are all there
    req.status = Status.RUNNING
    e.scheduler.running.append(req)
    rows, first = [], {}
    flush = torch.zeros(spec["cold_mb"] << 18) if cold else None  # float32: 2**18 per MB
    for i in range(warmup + n_steps):
        if flush is not None:
            flush.add_(1.0)  # every cache line of it, before the step's host work begins
        t = e.timing
        before = (t.schedule_s, t.prepare_s, t.postprocess_s, t.forward_s, t.decode_steps)
        sent.clear()
        meta_sent.clear()
        res = inst._begin_step()
        if res is None or res[1] is not None:
            raise RuntimeError("expected one micro-batch run on the compute thread")
        outs = res[2]
        t0 = time.perf_counter()
        wire = M.encode(M.Outputs(0, outs, []))  # what the home sends rank 0 for this step
        encode_s = time.perf_counter() - t0
        d = [a - b for a, b in zip((t.schedule_s, t.prepare_s, t.postprocess_s, t.forward_s, t.decode_steps), before)]
        if d[4] != 1:
            raise RuntimeError("a timed step was not a decode step")
        if i == 0:
            first = {str(c): meta_sent[c] for c in range(1, RANKS)}
        if i < warmup:
            continue
        row = {"host_ms": 1e3 * (d[0] + d[1] + d[2]), "schedule_ms": 1e3 * d[0], "prepare_ms": 1e3 * d[1],
               "postprocess_ms": 1e3 * d[2], "forward_ms": 1e3 * d[3], "outputs_bytes": len(wire),
               "outputs_encode_ms": 1e3 * encode_s}
        for c in range(1, RANKS):
            row[f"bytes_{c}"] = sent[c]
            row[f"meta_{c}"] = meta_sent[c]
        rows.append(row)
    e.abort_request(rid)  # its blocks go back, the creditors' too (Release)
    if inst.rm.num_free != inst.rm.num_blocks:
        raise RuntimeError("the home leaked blocks")
    return rows, first


def print_context(r: dict[str, Any]) -> None:
    from infinite.bench.common import print_table

    c = r["config"]
    rows = []
    for mode, by_ctx in r["cases"].items():
        for case in by_ctx.values():
            b, m = case["bytes_per_creditor"], case["meta_bytes_per_creditor"]
            rows.append([mode, case["context"], case["steps"], case["host_ms"], case["host_ms_p90"],
                         case["schedule_ms"], case["prepare_ms"], case["postprocess_ms"], case["forward_ms"],
                         "/".join(str(int(b[k])) for k in sorted(b)), "/".join(str(int(m[k])) for k in sorted(m)),
                         "/".join(str(v) for _, v in sorted(case["first_step_meta_bytes"].items())),
                         int(case["outputs_bytes"])])
    print_table(f"(e) a decode step's host work, one request's KV over {c['ranks']} instances "
                f"(median of {c['repeats']} x {c['steps']} steps per context, ms)",
                ["outputs", "context", "steps", "host ms", "host p90", "schedule", "prepare", "postprocess",
                 "forward", "B/creditor/step", "of which diffs", "1st step diffs", "B to rank 0/step"], rows)
    lo, hi = min(c["contexts"]), max(c["contexts"])
    hp = r["host_path_us"]
    print_table("the remote step's host path alone (sync, local inputs, creditors' parts), in one process, "
                "µs per step", ["caches", *(str(x) for x in c["contexts"]), f"{hi} / {lo}"],
                [[k, *(hp[k][str(x)] for x in c["contexts"]), hp["ratios"][k]] for k in ("warm", "cold")])
    for mode, ratio in r["ratios"].items():
        print(f"{mode}: host ms per step {hi} / {lo} tokens = {ratio:.2f} (target <= {r['target_ratio']}: "
              f"{'met' if r['meets_target'][mode] else 'NOT met'})", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    sys.exit(_rank_main(json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2])))
