"""``python -m infinite.bench offline``: generated tokens/s of Infinite vs ``transformers.generate``.

Both systems run the same checkpoint (the embedded default tiny Llama unless
``--model`` is given), the same random token-id prompts, greedy, with EOS
ignored so every prompt generates exactly ``--max-tokens`` tokens. Each batch
size is one call of ``LLM.generate`` against one call of
``model.generate`` on the left-padded batch; the clock covers the whole call
(prefill + decode), like vLLM's offline throughput bench. Both are warmed up
first and the timed repeats alternate between the systems, so background load
on a shared machine hits both alike. Greedy agreement (share of prompts whose
tokens are identical) is reported next to the speed: a fast wrong answer is
not a result.

Then the host side of a decode step: milliseconds per step spent in everything
but the forward (scheduling, preparing the step's inputs, sampling and
building outputs), from the engine's own step timers over decode-only steps,
at ``--host-batch`` requests of ``--host-batch-context`` tokens and at one
request of each of ``--host-contexts`` tokens. This is the time a GPU waits on
the host every step unless it is hidden; per-step work that grows with the
batch or the context shows up here. On a CPU the forward of a long context
streams its KV through the caches and leaves them cold for the host work that
follows, which slows that work without its growing: a control row runs the
shortest context with ``--host-cold-mb`` of memory touched before each step
(the cache state of the longest context, no more work), so that the long
context is compared with both.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from infinite.bench.common import format_table, write_json

# Targets from issue 2 (CPU): Infinite / transformers tokens/s at least this much.
TARGETS = {1: 1.0, 16: 2.0}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _positive_int(text: str) -> int:
    vals = _positive_ints(text)
    if len(vals) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return vals[0]


def _length_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_i, hi_i = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI prompt lengths, got {text!r}") from None
    if not sep or lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench offline", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny Llama)")
    p.add_argument("--batch-sizes", type=_positive_ints, default=[1, 16], help="comma-separated (default 1,16)")
    p.add_argument("--prompt-len", type=_positive_int, default=128, help="tokens per prompt (default 128)")
    p.add_argument("--prompt-lens", type=_length_range, default=None, metavar="LO:HI",
                   help="mixed workload: each prompt's length uniform in [LO, HI] (overrides --prompt-len); "
                        "transformers pads the batch to the longest prompt")
    p.add_argument("--max-tokens", type=_positive_int, default=128, help="generated tokens per prompt (default 128)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per system and batch size; median")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--block-size", type=_positive_int, default=16, help="Infinite's KV block size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available); transformers runs there too")
    p.add_argument("--host-batch", type=int, default=256, help="requests of the batched host-time case (0: skip)")
    p.add_argument("--host-contexts", type=_positive_ints, default=[1024, 30000],
                   help="context lengths of the one-request host-time cases (default 1024,30000)")
    p.add_argument("--host-steps", type=_positive_int, default=20, help="decode steps timed per host case")
    p.add_argument("--host-clock", choices=("auto", "thread", "wall"), default="auto",
                   help="the host cases' step timers: per-thread CPU time (not inflated by other processes on a "
                        "shared machine; the forward runs on the same thread on a CPU) or wall time; auto: thread "
                        "on a CPU, wall on a GPU (where the host waits for the device)")
    p.add_argument("--host-batch-context", type=_positive_int, default=512,
                   help="prompt tokens of each request of the batched host-time case")
    p.add_argument("--host-cold-mb", type=int, default=256,
                   help="control row: the shortest --host-contexts case with this much memory touched before each "
                        "step (the caches as cold as after a long context's forward; 0: no control row)")
    p.add_argument("--no-host", dest="host", action="store_false", help="skip the host-time cases")
    p.add_argument("--out", default="bench-results/offline.json", help="JSON result path ('' to skip)")
    return p.parse_args(list(argv))


# ---- workload ---------------------------------------------------------------------------------------


def read_model_info(model_dir: str | Path) -> dict[str, Any]:
    """vocab size, special ids to keep out of prompts, pad id and context length from config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if "text_config" in cfg:
        cfg = {**cfg, **cfg["text_config"]}
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        special.update(v if isinstance(v, list) else [] if v is None else [v])
    pad = cfg.get("pad_token_id")
    if pad is None:
        eos = cfg.get("eos_token_id")
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    return {"vocab_size": int(cfg["vocab_size"]), "special_ids": sorted(special), "pad_token_id": int(pad),
            "max_position_embeddings": cfg.get("max_position_embeddings")}


def make_prompts(num: int, length: int, vocab_size: int, exclude: Sequence[int], seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` token ids drawn uniformly from the vocabulary minus ``exclude``."""
    allowed = torch.tensor(sorted(set(range(vocab_size)) - set(exclude)), dtype=torch.int64)
    if allowed.numel() == 0:
        raise ValueError("no token ids left to build prompts from")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, allowed.numel(), (num, length), generator=gen)  # [num, length]
    return allowed[idx].tolist()


def make_mixed_prompts(num: int, lo: int, hi: int, vocab_size: int, exclude: Sequence[int],
                       seed: int) -> list[list[int]]:
    """``num`` prompts whose lengths are uniform in [lo, hi], token ids as in :func:`make_prompts`."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got {lo}, {hi}")
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (num,), generator=gen).tolist()
    full = make_prompts(num, hi, vocab_size, exclude, seed + 1)
    return [p[:n] for p, n in zip(full, lengths)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, L], attention_mask [B, L]) with each prompt right-aligned, as HF decoder-only generate wants."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.int64)
            mask[i, width - len(p):] = 1
    return ids, mask


def agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of prompts whose generated token lists are identical."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} outputs")
    return sum(list(x) == list(y) for x, y in zip(a, b)) / max(len(a), 1)


# ---- the two systems ----------------------------------------------------------------------------------

Generate = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, max_tokens) -> generated ids


def infinite_runner(model_dir: str, dtype: str, block_size: int, num_kv_blocks: int, device: str,
                    max_num_seqs: int) -> tuple[Generate, Any]:
    from infinite import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, block_size=block_size, num_kv_blocks=num_kv_blocks, device=device,
              max_num_seqs=max(max_num_seqs, 1))

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return run, llm


def transformers_runner(model_dir: str, dtype: torch.dtype, pad_id: int, device: str) -> Generate:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(device)
    base = copy.deepcopy(model.generation_config)
    base.do_sample = False
    base.eos_token_id = None  # generate exactly max_new_tokens, like ignore_eos
    base.pad_token_id = pad_id
    for name in ("temperature", "top_p", "top_k"):  # unset sampling knobs: greedy would warn about them
        if hasattr(base, name):
            setattr(base, name, None)

    @torch.inference_mode()
    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        ids, mask = left_pad(prompts, pad_id)
        gc = copy.deepcopy(base)
        gc.max_new_tokens = max_tokens
        gc.min_new_tokens = None
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=gc)  # [B, L + max_tokens]
        return out[:, ids.shape[1]:].tolist()

    return run


# ---- measurement -----------------------------------------------------------------------------------


@dataclass
class SystemResult:
    tokens_per_s: float  # generated tokens / median seconds
    seconds: list[float]  # one per timed repeat
    generated_tokens: int  # per run, counted from the outputs


@dataclass
class BatchResult:
    batch_size: int
    infinite: SystemResult
    transformers: SystemResult
    ratio: float  # infinite / transformers tokens/s
    target_ratio: float | None
    meets_target: bool | None
    greedy_agreement: float


def _timed(fn: Generate, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn(prompts, max_tokens)
    return time.perf_counter() - t0, out


def _count(outs: list[list[int]], batch: int, max_tokens: int, system: str) -> int:
    n = sum(len(o) for o in outs)
    if len(outs) != batch or any(len(o) != max_tokens for o in outs):
        raise RuntimeError(f"{system} generated {[len(o) for o in outs]} tokens; expected {max_tokens} x {batch}")
    return n


def bench_batch(inf: Generate, hf: Generate, prompts: list[list[int]], max_tokens: int, repeats: int) -> BatchResult:
    b = len(prompts)
    warm = min(max_tokens, 4)
    inf(prompts, warm)
    hf(prompts, warm)
    t_inf: list[float] = []
    t_hf: list[float] = []
    out_inf = out_hf = None
    for _ in range(repeats):  # alternate so background load hits both systems alike
        t, out_inf = _timed(inf, prompts, max_tokens)
        t_inf.append(t)
        t, out_hf = _timed(hf, prompts, max_tokens)
        t_hf.append(t)
    n_inf = _count(out_inf, b, max_tokens, "Infinite")
    n_hf = _count(out_hf, b, max_tokens, "transformers")
    r_inf = SystemResult(n_inf / statistics.median(t_inf), t_inf, n_inf)
    r_hf = SystemResult(n_hf / statistics.median(t_hf), t_hf, n_hf)
    ratio = r_inf.tokens_per_s / r_hf.tokens_per_s
    target = TARGETS.get(b)
    return BatchResult(b, r_inf, r_hf, ratio, target, None if target is None else ratio >= target,
                       agreement(out_inf, out_hf))


@dataclass
class HostResult:
    batch: int
    context: int  # prompt tokens of each request
    steps: int  # decode steps timed
    schedule_ms: float  # per step
    prepare_ms: float
    postprocess_ms: float  # sampling included
    host_ms: float  # schedule + prepare + postprocess: everything but the forward
    forward_ms: float
    cold_mb: int = 0  # memory touched before each step (the control row), else 0


def host_profile(model_dir: str, dtype: str, block_size: int, device: str, batch: int, context: int,
                 steps: int, seed: int, cold_mb: int = 0, clock: str = "wall") -> HostResult:
    """Host milliseconds per decode step of ``batch`` requests holding ``context`` tokens each, from the
    engine's step timers over ``steps`` decode-only steps (after every prompt is prefilled)."""
    from infinite.runtime.config import EngineConfig
    from infinite.runtime.engine import LLMEngine
    from infinite.sampling.params import SamplingParams

    budget = max(2048, min(context, 16384))
    # the first requests decode while the last are prefilled: none may finish before the timed steps end
    max_tokens = steps + 4 + 2 * -(-batch * context // budget)  # decodes share the budget: up to 2x the steps
    per_req = -(-(context + max_tokens) // block_size) + 1
    info = read_model_info(model_dir)
    eng = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, block_size=block_size, device=device,
                                 num_kv_blocks=batch * per_req, max_num_seqs=batch, max_num_batched_tokens=budget))
    eng.detokenize_in_background()  # as LLM makes it
    eng.clock = time.thread_time if clock == "thread" else time.perf_counter
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for prompt in make_prompts(batch, context, info["vocab_size"], info["special_ids"], seed):
        req = eng.make_request(prompt, params)
        req.output_kind = "final_only"  # as LLM.generate makes them
        eng.submit(req)
    while eng.timing.decode_steps == 0:  # prefill (chunked) until every request decodes
        eng.step()
    if len(eng.scheduler.running) != batch:
        raise RuntimeError(f"host profile: {len(eng.scheduler.running)} requests running, expected {batch}")
    eng.timing.reset()
    cold = torch.zeros(cold_mb << 20, dtype=torch.uint8) if cold_mb > 0 else None  # on the host: its caches
    for _ in range(steps):
        if cold is not None:
            cold.add_(1)  # every byte read and written: the host's caches hold this, not the engine's state
        eng.step()
    t = eng.timing
    if t.decode_steps != t.steps or t.steps != steps or len(eng.scheduler.running) != batch:
        raise RuntimeError(f"host profile: {t.steps} steps, {t.decode_steps} of them pure decode; expected {steps}")
    per = 1e3 / t.steps
    res = HostResult(batch, context, t.steps, t.schedule_s * per, t.prepare_s * per, t.postprocess_s * per,
                     (t.schedule_s + t.prepare_s + t.postprocess_s) * per, t.forward_s * per, cold_mb)
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from infinite.runtime.engine import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    info = read_model_info(model_dir)
    longest = args.prompt_lens[1] if args.prompt_lens else args.prompt_len
    need = longest + args.max_tokens
    if info["max_position_embeddings"] and need > info["max_position_embeddings"]:
        raise ValueError(f"longest prompt + --max-tokens = {need} is over the model's context "
                         f"length {info['max_position_embeddings']}")
    biggest = max(args.batch_sizes)
    blocks = biggest * (-(-need // args.block_size) + 1)  # every request's whole sequence fits: no preemption
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()
    inf, llm = infinite_runner(model_dir, args.dtype, args.block_size, blocks, device, biggest)
    hf = transformers_runner(model_dir, _DTYPES[args.dtype], info["pad_token_id"], device)
    try:
        rows = []
        prompt_tokens: list[int] = []
        for b in args.batch_sizes:
            if args.prompt_lens:
                lo, hi = args.prompt_lens
                prompts = make_mixed_prompts(b, lo, hi, info["vocab_size"], info["special_ids"], args.seed + b)
            else:
                prompts = make_prompts(b, args.prompt_len, info["vocab_size"], info["special_ids"], args.seed + b)
            prompt_tokens.append(sum(len(p) for p in prompts))
            rows.append(bench_batch(inf, hf, prompts, args.max_tokens, args.repeats))
    finally:
        llm.shutdown()
    host = []
    host_clock = args.host_clock if args.host_clock != "auto" else ("thread" if device == "cpu" else "wall")
    if args.host:
        cases = ([(args.host_batch, args.host_batch_context, 0)] if args.host_batch > 0 else []) + \
                [(1, c, 0) for c in args.host_contexts] + \
                ([(1, min(args.host_contexts), args.host_cold_mb)] if args.host_cold_mb > 0 else [])
        for b, c, mb in cases:
            host.append(host_profile(model_dir, args.dtype, args.block_size, device, b, c, args.host_steps, args.seed,
                                     mb, host_clock))
    return {
        "bench": "offline",
        "config": {"model": model_dir, "batch_sizes": args.batch_sizes, "prompt_len": args.prompt_len,
                   "prompt_lens": list(args.prompt_lens) if args.prompt_lens else None,
                   "max_tokens": args.max_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
                   "dtype": args.dtype, "block_size": args.block_size, "num_kv_blocks": blocks, "seed": args.seed,
                   "device": device},
        "results": [{**asdict(r), "prompt_tokens": n} for r, n in zip(rows, prompt_tokens)],
        "host": [asdict(h) for h in host],
        "host_clock": host_clock if args.host else None,
        "load_avg_before": list(load_before),
        "load_avg_after": list(os.getloadavg()),
    }


def table(result: dict[str, Any]) -> str:
    c = result["config"]
    lens = c.get("prompt_lens")
    prompt = f"prompts uniform {lens[0]}..{lens[1]}" if lens else f"prompt {c['prompt_len']}"
    title = (f"offline throughput, generated tokens/s | {Path(c['model']).name} {c['dtype']} | "
             f"{prompt} + {c['max_tokens']} new tokens, greedy, EOS ignored | "
             f"{c['threads']} thread(s), median of {c['repeats']} | load {result['load_avg_before'][0]:.2f}"
             f"->{result['load_avg_after'][0]:.2f}")
    cols = ["batch", "Infinite tok/s", "transformers tok/s", "ratio", "target", "met", "greedy agree"]
    rows = [[r["batch_size"], r["infinite"]["tokens_per_s"], r["transformers"]["tokens_per_s"],
             f"{r['ratio']:.2f}x", None if r["target_ratio"] is None else f">={r['target_ratio']:g}x",
             r["meets_target"], f"{100 * r['greedy_agreement']:.0f}%"] for r in result["results"]]
    out = format_table(title, cols, rows)
    if result.get("host"):
        cols = ["batch", "context", "caches", "steps", "schedule ms", "prepare ms", "postprocess ms", "host ms",
                "forward ms"]
        rows = [[h["batch"], h["context"], f"{h['cold_mb']} MB touched" if h.get("cold_mb") else "as left",
                 h["steps"], h["schedule_ms"], h["prepare_ms"], h["postprocess_ms"], h["host_ms"], h["forward_ms"]]
                for h in result["host"]]
        clock = {"thread": "per-thread CPU time", "wall": "wall time"}.get(result.get("host_clock"), "wall time")
        out += "\n\n" + format_table(f"host time per decode step (everything but the forward), engine step timers, "
                                       f"{clock}", cols, rows)
        single = sorted((h for h in result["host"] if h["batch"] == 1 and not h.get("cold_mb")),
                        key=lambda h: h["context"])
        cold = [h for h in result["host"] if h.get("cold_mb")]
        if len(single) >= 2:
            lo, hi = single[0], single[-1]
            out += (f"\nhost ms at {hi['context']} / {lo['context']} tokens: {hi['host_ms'] / lo['host_ms']:.2f}x"
                    + (f"; against {lo['context']} tokens with cold caches: {hi['host_ms'] / cold[0]['host_ms']:.2f}x"
                       if cold else ""))
    return out


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    result = run(args)
    print(table(result), flush=True)
    if args.out:
        path = write_json(args.out, result)
        print(f"wrote {path}")
    return 0
