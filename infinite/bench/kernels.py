"""`python -m infinite.bench kernels`: decode MicroAttention speed against the memory limit.

Decode attention reads every K/V byte of the context once per step, so its
ceiling is the device's copy bandwidth. On a GPU this measures, per (context
length, batch size): the time of the Triton paged decode kernel, the bandwidth
it achieves (bytes of K/V read / time) as a share of the measured copy
bandwidth, and the time of ``torch.nn.functional.scaled_dot_product_attention``
on the same data laid out unpaged. Combinations that do not fit in free memory
are skipped (SDPA alone is skipped when the unpaged copy does not fit). On CPU
it runs the torch reference path at small sizes and says so in the header.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from infinite.attention.metadata import MAMetadata

GPU_CONTEXTS = [1024, 4096, 16384, 32768, 131072, 262144, 1048576]
GPU_BATCHES = [1, 8, 32, 128, 256]
CPU_CONTEXTS = [1024, 4096]
CPU_BATCHES = [1, 4]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    context: int
    batch: int
    kv_bytes: int
    ma_us: float
    ma_GBps: float
    pct_of_copy: float
    sdpa_us: float | None  # None: the unpaged copy did not fit
    speedup_vs_sdpa: float | None


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", help="context lengths (default: 1K..1M on GPU, 1K,4K on CPU)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default: 1..256 on GPU, 1,4 on CPU)")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="share of free GPU memory a case may use")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: triton.testing.do_bench (CUDA events, cache flushed) on GPU, a median on CPU."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100) * 1e-3

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return cpu_time


def copy_bandwidth(device: torch.device, timer, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical memory ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / sec


def decode_case(batch: int, context: int, args, dtype: torch.dtype, device: torch.device):
    """A paged cache holding `batch` requests of `context` tokens in shuffled blocks, plus its decode metadata."""
    bsz, nkv, d = args.block_size, args.kv_heads, args.head_dim
    per_req = -(-context // bsz)
    total = batch * per_req
    k_cache = torch.randn(total, bsz, nkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(total, bsz, nkv, d, dtype=dtype, device=device)
    tables = torch.randperm(total, device=device).to(torch.int32).view(batch, per_req)  # [R, M]
    meta = MAMetadata(
        cu_q=torch.arange(batch + 1, dtype=torch.int32, device=device),
        q_pos=torch.full((batch,), context - 1, dtype=torch.int64, device=device),
        block_tables=tables,
        block_idx=torch.arange(per_req, dtype=torch.int32, device=device).expand(batch, per_req).contiguous(),
        num_blocks=torch.full((batch,), per_req, dtype=torch.int32, device=device),
        max_q_len=1,
    )
    q = torch.randn(batch, args.heads, d, dtype=dtype, device=device)
    return q, k_cache, v_cache, meta


def unpaged(k_cache: torch.Tensor, meta: MAMetadata, context: int) -> torch.Tensor:
    """[R, nkv, context, d] copy of the paged cache in request order (what SDPA reads)."""
    r, m = meta.block_tables.shape
    _, bsz, nkv, d = k_cache.shape
    dense = k_cache[meta.block_tables.long()].view(r, m * bsz, nkv, d)[:, :context]
    return dense.transpose(1, 2).contiguous()


def run(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = _DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if gpu:
        from infinite.attention.triton import micro_attention

        backend = f"triton decode MA on {torch.cuda.get_device_name(device)}"
    else:
        from infinite.attention.torch_ops import micro_attention

        backend = "CPU: torch reference path (no GPU; Triton kernels not timed)"
    contexts = args.contexts or (GPU_CONTEXTS if gpu else CPU_CONTEXTS)
    batches = args.batches or (GPU_BATCHES if gpu else CPU_BATCHES)
    timer = _timer(device)
    copy_bw = copy_bandwidth(device, timer, (1 << 30) if gpu else (1 << 26))
    elem = torch.tensor([], dtype=dtype).element_size()
    scale = args.head_dim**-0.5
    rows: list[Row] = []
    skipped: list[dict] = []
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
            budget = torch.cuda.mem_get_info(device)[0] * args.mem_fraction if gpu else 4 << 30
            if kv_bytes * 1.05 > budget:
                skipped.append({"context": context, "batch": batch, "kv_bytes": kv_bytes, "why": "does not fit"})
                continue
            q, k_cache, v_cache, meta = decode_case(batch, context, args, dtype, device)
            ma = timer(lambda: micro_attention(q, k_cache, v_cache, meta, scale))
            sdpa = None
            free = torch.cuda.mem_get_info(device)[0] * args.mem_fraction if gpu else budget - kv_bytes
            if kv_bytes * 1.05 <= free:
                k, v = unpaged(k_cache, meta, context), unpaged(v_cache, meta, context)
                q4 = q.unsqueeze(2)  # [R, nh, 1, d]
                sdpa = timer(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
                del k, v
            del q, k_cache, v_cache, meta
            if gpu:
                torch.cuda.empty_cache()
            bw = kv_bytes / ma
            rows.append(Row(context, batch, kv_bytes, ma * 1e6, bw / 1e9, 100 * bw / copy_bw,
                            None if sdpa is None else sdpa * 1e6, None if sdpa is None else sdpa / ma))
    return {
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size,
        "copy_GBps": copy_bw / 1e9,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }


def format_table(result: dict) -> str:
    head = (f"# {result['backend']} | {result['dtype']} nh={result['heads']} nkv={result['kv_heads']} "
            f"d={result['head_dim']} B={result['block_size']} | copy bandwidth {result['copy_GBps']:.1f} GB/s")
    lines = [head, f"{'context':>9} {'batch':>5} {'KV MiB':>9} {'MA us':>10} {'GB/s':>8} {'%copy':>6} "
             f"{'SDPA us':>10} {'xSDPA':>6}"]
    for r in result["rows"]:
        sd = "-" if r["sdpa_us"] is None else f"{r['sdpa_us']:.1f}"
        sp = "-" if r["speedup_vs_sdpa"] is None else f"{r['speedup_vs_sdpa']:.2f}"
        lines.append(f"{r['context']:>9} {r['batch']:>5} {r['kv_bytes'] / 2**20:>9.1f} {r['ma_us']:>10.1f} "
                     f"{r['ma_GBps']:>8.1f} {r['pct_of_copy']:>6.1f} {sd:>10} {sp:>6}")
    for s in result["skipped"]:
        lines.append(f"{s['context']:>9} {s['batch']:>5} {s['kv_bytes'] / 2**20:>9.1f}  skipped: {s['why']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    torch.manual_seed(0)
    result = run(args)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0
