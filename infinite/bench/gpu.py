"""``python -m infinite.bench gpu``: one instance on one GPU against its limits, in one command.

Writes a random-weight Llama-3-8B-shaped bfloat16 checkpoint (token-id
prompts, nothing downloaded), then measures, each part in its own time box so
that one failure still leaves the others' figures:

* ``kernels``: kernel correctness against float64, decode MicroAttention GB/s and
  % of copy bandwidth against SDPA, causal prefill against SDPA flash
  (``python -m infinite.bench kernels --quick``);
* ``decode``: decode milliseconds per step at batch 1/16/64/256 (context 512),
  CUDA graphs on, then the same engine with ``enforce_eager``; a step is the
  time of a 33-token generation minus a 1-token one, over 32 (how the issue's
  figures were taken);
* ``busy``: the GPU-busy share of a batch-1 decode step: the device time of one
  replay of its graph (CUDA events, many replays) over the measured step time;
  and the torch profiler's kernel time over wall time for a 17-token run;
* ``prefill``: one prompt of 16K and 64K tokens, the engine against
  transformers + SDPA on the same GPU (``logits_to_keep=1``);
* ``agree``: greedy tokens of the embedded tiny model in float32 with graphs
  on against transformers on the same GPU.

Prints one table and writes JSON (``--out``). On a machine without a GPU it
says so and exits 2. docs/gpu.md says how to run it on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from infinite.bench.common import format_table, write_json

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072),
    "tiny-gqa": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=131072),
    # For the CPU smoke test of this script (tests/test_bench_gpu.py).
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, rope_theta=10000.0, max_position_embeddings=2048),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="/tmp/infinite-bench-8b", help="checkpoint folder (written when missing)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--batches", default="1,16,64,256", help="decode batch sizes")
    p.add_argument("--context", type=int, default=512, help="prompt tokens of the decode cases")
    p.add_argument("--prefill", default="16384,65536", help="prompt lengths of the prefill cases")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="the engine's step budget (prefill chunk)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--parts", default="kernels,decode,busy,prefill,agree", help="which parts to run")
    p.add_argument("--device", default="cuda", help="cuda (a CPU run is a smoke test of the script, tiny shapes only)")
    p.add_argument("--out", default="bench-results/gpu.json", help="JSON result path")
    return p.parse_args(argv)


# ---- helpers ------------------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_checkpoint(path: str, shape: str, device: str = "cuda") -> float:
    """A random-weight bfloat16 checkpoint of ``shape`` written by transformers on the GPU; seconds taken."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
        for p in m.parameters():  # scaled so activations stay finite through 32 layers
            if p.dim() == 2:
                p.data.normal_(0, 0.02)
    m.save_pretrained(path, safe_serialization=True, max_shard_size="5GB")
    del m
    _free()
    return time.time() - t0


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def _free(*objs: Any) -> None:
    for o in objs:
        close = getattr(o, "shutdown", None)
        if close is not None:
            close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _greedy(n: int, **kw: Any):
    from infinite import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def _timed_generate(llm, prompts, n: int) -> float:
    _sync()
    t = time.perf_counter()
    llm.generate(prompts, _greedy(n), use_tqdm=False)
    _sync()
    return time.perf_counter() - t


def decode_step_ms(llm, vocab: int, batch: int, context: int) -> dict[str, float]:
    """ms per decode step at ``batch`` x ``context``: (33-token run - 1-token run) / 32."""
    ps = _prompts(batch, context, vocab, batch)
    _timed_generate(llm, ps[:2], 2)  # warm
    t1 = _timed_generate(llm, ps, 1)
    t33 = _timed_generate(llm, ps, 33)
    step = (t33 - t1) / 32
    return {"batch": batch, "context": context, "prefill_s": t1, "step_ms": step * 1e3, "tok_s": batch / step}


# ---- parts --------------------------------------------------------------------------------------


def part_kernels(args, res: dict) -> None:
    from infinite.bench import kernels

    res["kernels"] = kernels.run(kernels._parse(["--quick", "--prefill", "16384", "65536"]))


def _engine(args, eager: bool):
    from infinite import LLM

    cpu = args.device == "cpu"
    return LLM(model=args.ckpt, dtype="float32" if cpu else "bfloat16", device=args.device,
               gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=2048 if cpu else None,
               max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=eager,
               max_model_len=SHAPES[args.shape]["max_position_embeddings"])


def part_decode(args, res: dict) -> None:
    vocab = SHAPES[args.shape]["vocab_size"]
    out = res.setdefault("decode", {})
    for mode, eager in (("graphs", False), ("eager", True)):
        t0 = time.time()
        llm = _engine(args, eager)
        eng = llm.engine
        out[f"{mode}_setup"] = {"load_s": time.time() - t0, "kv_blocks": eng.rm.num_blocks,
                                "graphs": None if eng.graph_report is None else vars(eng.graph_report),
                                "memory_plan": None if eng.memory_plan is None else vars(eng.memory_plan)}
        rows = out.setdefault(mode, [])
        for b in [int(x) for x in args.batches.split(",")]:
            rows.append(decode_step_ms(llm, vocab, b, args.context))
            print(f"decode {mode}: {rows[-1]}", flush=True)
        if mode == "graphs" and "busy" in args.parts:
            part_busy(llm, vocab, args, res)
        _free(llm)
        del llm, eng
        _free()


def part_busy(llm, vocab: int, args, res: dict) -> None:
    """GPU-busy share of a batch-1 decode step, two ways."""
    eng = llm.engine
    busy: dict[str, Any] = {}
    step = decode_step_ms(llm, vocab, 1, args.context)
    busy["step_ms"] = step["step_ms"]
    if eng.graphs is not None and eng.graphs.graphs:
        g = eng.graphs.graphs[eng.graphs.bucket(1)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(50):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        busy["graph_replay_ms"] = start.elapsed_time(end) / 50
        busy["busy_share_graph"] = busy["graph_replay_ms"] / step["step_ms"]
    try:
        from torch.profiler import ProfilerActivity, profile

        ps = _prompts(1, args.context, vocab, 7)
        llm.generate(ps, _greedy(1), use_tqdm=False)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            wall = _timed_generate(llm, ps, 17)
        kernels_s = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 1e6
        busy["profiler_wall_s"] = wall
        busy["profiler_kernel_s"] = kernels_s
        busy["busy_share_profiler"] = kernels_s / wall
    except Exception:  # noqa: BLE001 - the profiler is optional evidence
        busy["profiler_error"] = traceback.format_exc(limit=2)
    res["busy"] = busy
    print(f"busy: {busy}", flush=True)


def part_prefill(args, res: dict) -> None:
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = [int(x) for x in args.prefill.split(",")]
    rows = res.setdefault("prefill", [])
    llm = _engine(args, False)
    llm.generate(_prompts(1, 256, vocab, 1), _greedy(1), use_tqdm=False)  # warm
    for n in lengths:
        rows.append({"tokens": n, "infinite_s": _timed_generate(llm, _prompts(1, n, vocab, n), 1)})
        print(f"prefill infinite: {rows[-1]}", flush=True)
    _free(llm)
    del llm
    _free()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    with torch.inference_mode():
        model(input_ids=torch.tensor(_prompts(1, 256, vocab, 1), device=args.device), logits_to_keep=1)
        for row in rows:
            ids = torch.tensor(_prompts(1, row["tokens"], vocab, row["tokens"]), device=args.device)
            _sync()
            t = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1, use_cache=False)
            _sync()
            row["transformers_sdpa_s"] = time.perf_counter() - t
            row["ratio"] = row["infinite_s"] / row["transformers_sdpa_s"]
            print(f"prefill: {row}", flush=True)
    del model
    _free()


def part_agree(args, res: dict) -> None:
    """Greedy tokens of the tiny model, float32, graphs on, against transformers on the GPU."""
    from transformers import AutoModelForCausalLM

    from infinite import LLM
    from infinite.tiny import default_model_dir

    tiny = str(default_model_dir())
    cfg = json.loads((Path(tiny) / "config.json").read_text())
    prompts = _prompts(8, 48, cfg["vocab_size"], 5)
    llm = LLM(model=tiny, dtype="float32", device=args.device, gpu_memory_utilization=0.3,
              num_kv_blocks=256 if args.device == "cpu" else None)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, _greedy(32), use_tqdm=False)]
    graphs = llm.engine.graphs is not None and llm.engine.graphs.captured
    _free(llm)
    del llm
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).to(args.device).eval()
    ref = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p], device=args.device), max_new_tokens=32, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            ref.append(out[0, len(p):].tolist())
    agree = sum(a == b for a, b in zip(ours, ref)) / len(ref)
    res["agree"] = {"prompts": len(ref), "tokens": 32, "graphs": graphs, "greedy_agreement": agree}
    print(f"agree: {res['agree']}", flush=True)
    del model
    _free()


PARTS: dict[str, Callable] = {"kernels": part_kernels, "decode": part_decode, "prefill": part_prefill,
                              "agree": part_agree}


def table(res: dict) -> str:
    rows: list[list[Any]] = []
    d = res.get("decode", {})
    eager = {r["batch"]: r for r in d.get("eager", [])}
    for r in d.get("graphs", []):
        e = eager.get(r["batch"])
        rows.append([f"decode ms/step, batch {r['batch']}, ctx {r['context']}", r["step_ms"],
                     None if e is None else e["step_ms"], f"{r['tok_s']:.0f} tok/s"])
    b = res.get("busy", {})
    if "busy_share_graph" in b:
        rows.append(["GPU busy, batch-1 decode (graph replay / step)", b["busy_share_graph"], None,
                     f"replay {b['graph_replay_ms']:.2f} ms"])
    if "busy_share_profiler" in b:
        rows.append(["GPU busy, batch-1 decode (profiler kernels / wall)", b["busy_share_profiler"], None, ""])
    for r in res.get("prefill", []):
        rows.append([f"prefill {r['tokens']} tokens, s", r["infinite_s"], r.get("transformers_sdpa_s"),
                     f"ratio {r['ratio']:.2f}" if "ratio" in r else ""])
    k = res.get("kernels", {})
    for r in k.get("decode", []):
        rows.append([f"decode MA ctx {r['context']} batch {r['batch']}, GB/s", r["ma_GBps"], r.get("sdpa_us"),
                     f"{r['pct_of_copy']:.0f}% of copy, MA/SDPA {r['ma_over_sdpa'] or 0:.2f}"])
    for r in k.get("correctness", []):
        rows.append([f"correct {r['case']} {r['dtype']}", r["err_out"], None, "ok" if r["ok"] else "FAIL"])
    a = res.get("agree")
    if a:
        rows.append(["greedy agreement, tiny float32, graphs " + ("on" if a["graphs"] else "off"),
                     a["greedy_agreement"], None, f"{a['prompts']} prompts x {a['tokens']}"])
    for name, err in res.get("errors", {}).items():
        rows.append([f"{name}: FAILED", None, None, err.strip().splitlines()[-1][:80]])
    return format_table(f"infinite bench gpu | {res.get('device', '?')} | {res.get('shape')}",
                        ["figure", "infinite (graphs)", "eager / reference", "note"], rows)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device here", file=sys.stderr)
        return 2
    name = "cpu (smoke test)" if args.device == "cpu" else torch.cuda.get_device_name(0)
    res: dict[str, Any] = {"bench": "gpu", "device": name, "shape": args.shape,
                           "config": vars(args), "errors": {}, "seconds": {}}
    if not (Path(args.ckpt) / "config.json").exists():
        res["checkpoint_write_s"] = write_checkpoint(args.ckpt, args.shape, args.device)
        print(f"wrote {args.shape} to {args.ckpt} in {res['checkpoint_write_s']:.0f}s", flush=True)
    for name in [p for p in args.parts.split(",") if p in PARTS]:
        t0 = time.time()
        try:
            PARTS[name](args, res)
        except Exception:  # noqa: BLE001 - one part failing must not lose the others' figures
            res["errors"][name] = traceback.format_exc()
            print(f"part {name} failed:\n{res['errors'][name]}", flush=True)
            _free()
        res["seconds"][name] = time.time() - t0
        write_json(args.out, res)
    print(table(res), flush=True)
    print(f"wrote {args.out}")
    return 0 if not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
