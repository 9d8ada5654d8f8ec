"""`python -m infinite.bench kernels`: the attention and elementwise kernels against their limits.

Four tables (and one JSON with all of them, ``--out``):

* **decode**: per (context, batch), the paged decode MicroAttention (the
  split-KV kernel; its split count in ``S``), its bandwidth (K/V bytes read /
  time) and its share of the measured copy bandwidth (a 1 GiB device copy,
  read + write), and ``scaled_dot_product_attention`` on the same data laid out
  unpaged, with the ratio MA time / SDPA time (the target is <= 1.1 from 32K
  context up) and the largest difference between the two outputs;
* **prefill**: one causal prompt (16K and 64K tokens) through the prefill
  kernel against SDPA (flash backend where it applies) on the same data,
  unpaged, with the achieved TFLOP/s of each (causal: 2 * 2 * nh * d * S(S+1)/2);
* **correctness**: small cases of every kernel path (decode with one and
  several splits, a mixed batch, a remote part's partial block list, a whole
  prompt, the fused ops) against the float64 reference, max relative error;
* **ops**: the fused RMSNorm, residual-add + RMSNorm and RoPE + KV write
  against the unfused torch sequences the model ran before them, eager (host
  launch cost included) and inside CUDA graphs (GPU time only).

Timing (``infinite/bench/timing.py``): calls shorter than 100 us are timed
inside a CUDA graph (column ``timed``: graph), longer ones eagerly between CUDA
events (events); the ops table shows both for every row. Cases that do not fit
the per-case K/V budget (``--max-kv-gib``) or free memory are listed as
skipped. Defaults finish in about 3 minutes on one H200; ``--quick`` is a
smaller grid for under 90 s. On CPU every table runs the torch path at small
sizes (the header says so); ``--autotune`` first tunes the decode and prefill
tiles for this GPU and caches them (see ``infinite/attention/triton/autotune.py``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from infinite.attention import micro_attention, torch_ops, uses_triton
from infinite.attention.metadata import MAMetadata
from infinite.attention.reference import attention_f64, max_rel_err
from infinite.bench.common import format_table, write_json
from infinite.bench.timing import time_call
from infinite.model import ops

GPU_CONTEXTS = [1024, 4096, 16384, 32768, 131072, 1048576]
GPU_BATCHES = [1, 8, 32, 128, 256]
QUICK_CONTEXTS = [1024, 32768, 262144]
QUICK_BATCHES = [1, 32, 256]
CPU_CONTEXTS = [1024, 4096]
CPU_BATCHES = [1, 4]
GPU_PREFILL = [16384, 65536]
QUICK_PREFILL = [16384]
CPU_PREFILL = [512]
GPU_OP_TOKENS = [1, 256, 4096]
QUICK_OP_TOKENS = [1, 256]
CPU_OP_TOKENS = [1, 64]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class DecodeRow:
    context: int
    batch: int
    kv_bytes: int
    splits: int  # split-KV count the kernel ran with
    ma_us: float
    ma_GBps: float
    pct_of_copy: float
    sdpa_us: float | None  # None: the unpaged copy did not fit
    ma_over_sdpa: float | None  # MA time / SDPA time (<= 1.1 is the target from 32K up)
    max_diff_vs_sdpa: float | None  # max |MA - SDPA| / max |SDPA|
    timed: str  # graph | events | cpu


@dataclass
class PrefillRow:
    tokens: int
    ma_ms: float
    ma_TFLOPs: float
    sdpa_ms: float | None
    sdpa_TFLOPs: float | None
    sdpa_backend: str
    ma_over_sdpa: float | None
    timed: str


@dataclass
class CorrectnessRow:
    case: str
    dtype: str
    err_out: float  # max relative error against float64
    err_lse: float | None
    tolerance: float
    ok: bool


@dataclass
class OpsRow:
    op: str
    tokens: int
    fused_eager_us: float
    unfused_eager_us: float
    fused_graph_us: float | None
    unfused_graph_us: float | None
    eager_speedup: float
    graph_speedup: float | None


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m infinite.bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", help="decode context lengths (default: 1K..1M on GPU)")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default: 1..256 on GPU)")
    p.add_argument("--prefill", type=int, nargs="*", help="causal prompt lengths (default: 16K 64K on GPU)")
    p.add_argument("--op-tokens", type=int, nargs="*", help="tokens per fused-op call (default: 1 256 4096)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (under 90 s on an H200)")
    p.add_argument("--autotune", action="store_true", help="tune and cache this GPU's tiles first")
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096, help="hidden size of the fused-op rows")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--max-kv-gib", type=float, default=None,
                   help="skip decode cases with more K/V than this (default 32 on GPU, 8 with --quick)")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="share of free GPU memory a case may use")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    if args.head_dim % 2:
        p.error("--head-dim must be even (RoPE rotates halves)")
    return args


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical memory ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = time_call(lambda: dst.copy_(src), device).seconds
    del src, dst
    return 2 * nbytes / sec


def paged_case(batch: int, context: int, args, dtype: torch.dtype, device: torch.device, q_len: int = 1):
    """A paged cache holding `batch` requests of `context` tokens in shuffled blocks; the metadata of
    their last `q_len` positions (decode: 1); q. Built from tensors: 1M-token tables stay cheap."""
    bsz, nkv, d = args.block_size, args.kv_heads, args.head_dim
    per_req = -(-context // bsz)
    total = batch * per_req
    k_cache = torch.randn(total, bsz, nkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(total, bsz, nkv, d, dtype=dtype, device=device)
    tables = torch.randperm(total, device=device).to(torch.int32).view(batch, per_req)  # [R, M]
    i32 = dict(dtype=torch.int32, device=device)
    meta = MAMetadata(
        cu_q=torch.arange(0, (batch + 1) * q_len, q_len, **i32),
        q_pos=torch.arange(context - q_len, context, device=device).repeat(batch),
        block_tables=tables,
        block_idx=torch.arange(per_req, **i32).expand(batch, per_req).contiguous(),
        num_blocks=torch.full((batch,), per_req, **i32),
        max_q_len=q_len,
    )
    q = torch.randn(batch * q_len, args.heads, d, dtype=dtype, device=device)
    return q, k_cache, v_cache, meta


def unpaged(cache: torch.Tensor, meta: MAMetadata, context: int) -> torch.Tensor:
    """[R, nkv, context, d] copy of the paged cache in request order (what SDPA reads)."""
    r, m = meta.block_tables.shape
    _, bsz, nkv, d = cache.shape
    dense = cache[meta.block_tables.long()].view(r, m * bsz, nkv, d)[:, :context]
    return dense.transpose(1, 2).contiguous()


def _splits(meta: MAMetadata, args, device: torch.device, dtype: torch.dtype) -> int:
    """The split count the decode kernel picks for this metadata (1 on the torch path)."""
    if device.type != "cuda":
        return 1
    from infinite.attention.triton.decode import default_num_splits
    from infinite.attention.triton.tiles import tile_for

    block_n = tile_for("decode", device, args.head_dim, dtype).block_n
    return default_num_splits(meta, meta.num_requests, args.kv_heads, args.block_size, block_n, device)


def _free_bytes(device: torch.device, args) -> float:
    return torch.cuda.mem_get_info(device)[0] * args.mem_fraction if device.type == "cuda" else 4 << 30


def run_decode(args, device: torch.device, dtype: torch.dtype, copy_bw: float, contexts, batches, max_kv: float
               ) -> tuple[list[DecodeRow], list[dict]]:
    elem = torch.tensor([], dtype=dtype).element_size()
    scale = args.head_dim ** -0.5
    rows, skipped = [], []
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * elem
            if kv_bytes > max_kv or kv_bytes * 1.05 > _free_bytes(device, args):
                skipped.append({"table": "decode", "context": context, "batch": batch, "kv_bytes": kv_bytes,
                                "why": "over --max-kv-gib" if kv_bytes > max_kv else "does not fit"})
                continue
            q, k_cache, v_cache, meta = paged_case(batch, context, args, dtype, device)
            ma = time_call(lambda: micro_attention(q, k_cache, v_cache, meta, scale), device)
            out = micro_attention(q, k_cache, v_cache, meta, scale)[0]
            sdpa = diff = None
            if kv_bytes * 1.05 <= _free_bytes(device, args):
                k, v = unpaged(k_cache, meta, context), unpaged(v_cache, meta, context)
                q4 = q.unsqueeze(2)  # [R, nh, 1, d]
                call = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)  # noqa: E731
                sdpa = time_call(call, device, method=ma.method).seconds
                ref = call().squeeze(2)
                diff = max_rel_err(out, ref)
                del k, v, ref
            del q, k_cache, v_cache, out
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bw = kv_bytes / ma.seconds
            rows.append(DecodeRow(context, batch, kv_bytes, _splits(meta, args, device, dtype), ma.seconds * 1e6,
                                  bw / 1e9, 100 * bw / copy_bw, None if sdpa is None else sdpa * 1e6,
                                  None if sdpa is None else ma.seconds / sdpa, diff, ma.method))
    return rows, skipped


def _sdpa_prefill(q4, k, v, scale, device) -> tuple[object, str]:
    """The causal SDPA call to compare with: the flash backend when it takes these inputs."""
    call = lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=scale)  # noqa: E731
    if device.type != "cuda" or q4.dtype == torch.float32:
        return call, "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return call()

    return flash, "flash"


def run_prefill(args, device: torch.device, dtype: torch.dtype, lengths) -> tuple[list[PrefillRow], list[dict]]:
    scale = args.head_dim ** -0.5
    elem = torch.tensor([], dtype=dtype).element_size()
    g = args.heads // args.kv_heads
    rows, skipped = [], []
    for s in lengths:
        # q, the paged K/V, SDPA's unpaged q/K/V (K/V repeated to every query head), both outputs.
        need = s * args.head_dim * elem * (3 * args.heads + 2 * args.kv_heads + 2 * args.heads)
        if need * 1.2 > _free_bytes(device, args):
            skipped.append({"table": "prefill", "tokens": s, "bytes": need, "why": "does not fit"})
            continue
        q, k_cache, v_cache, meta = paged_case(1, s, args, dtype, device, q_len=s)
        ma = time_call(lambda: micro_attention(q, k_cache, v_cache, meta, scale), device)
        q4 = q.view(1, s, args.heads, args.head_dim).transpose(1, 2)  # [1, nh, S, d]
        k = unpaged(k_cache, meta, s).repeat_interleave(g, 1)  # [1, nh, S, d]
        v = unpaged(v_cache, meta, s).repeat_interleave(g, 1)
        call, backend = _sdpa_prefill(q4, k, v, scale, device)
        try:
            sdpa = time_call(call, device, method=ma.method).seconds
        except RuntimeError as e:  # the flash backend refused these inputs
            sdpa, backend = None, f"failed: {str(e).splitlines()[0][:60]}"
        flops = 4 * args.heads * args.head_dim * s * (s + 1) / 2
        rows.append(PrefillRow(s, ma.seconds * 1e3, flops / ma.seconds / 1e12,
                               None if sdpa is None else sdpa * 1e3, None if sdpa is None else flops / sdpa / 1e12,
                               backend, None if sdpa is None else ma.seconds / sdpa, ma.method))
        del q, k_cache, v_cache, meta, q4, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, skipped


def run_correctness(args, device: torch.device, dtype: torch.dtype) -> list[CorrectnessRow]:
    """Small cases of every path against float64: decode S=1 / S=7, a mixed batch, a partial part, a prompt."""
    gen = torch.Generator(device=device).manual_seed(0)
    bsz, nkv, nh, d = args.block_size, args.kv_heads, args.heads, args.head_dim
    n_blocks = 256
    k_cache = torch.randn(n_blocks, bsz, nkv, d, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(n_blocks, bsz, nkv, d, generator=gen, device=device).to(dtype)
    perm = torch.randperm(n_blocks, generator=gen, device=device).tolist()

    def take(n):
        out, perm[:] = perm[:n], perm[n:]
        return out

    a, b, c = take(3), take(20), take(60)  # requests of 37, 300 and 950 tokens
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    scale = d ** -0.5
    cases = [
        ("decode, 1 split", ([1, 1, 1], [36, 299, 949], [a, b, c], None), 1),
        ("decode, 7 splits per row", ([1, 1, 1], [36, 299, 949], [a, b, c], None), 7),
        ("mixed: 2 decode + 2 prefill rows", ([1, 40, 1, 129], [36, 200, 949, 120], [a, b, c, b], None), 3),
        ("remote part (blocks 20..59 only)", ([64], [886], [c[20:]], [list(range(20, 60))]), None),
        ("whole prompt, 950 tokens", ([950], [0], [c], None), None),
    ]
    rows = []
    for name, lists, splits in cases:
        meta = MAMetadata.build(*lists, device=device)
        meta.num_splits = splits
        q = torch.randn(meta.q_pos.shape[0], nh, d, generator=gen, device=device).to(dtype)
        out, lse = micro_attention(q, k_cache, v_cache, meta, scale)
        ref_out, ref_lse = attention_f64(q, k_cache, v_cache, meta, scale)
        seen = torch.isfinite(ref_lse)
        e_out = max_rel_err(out[seen], ref_out[seen])
        e_lse = max_rel_err(lse[seen], ref_lse[seen])
        ok = bool(torch.equal(torch.isfinite(lse), seen)) and e_out <= tol and e_lse <= tol
        rows.append(CorrectnessRow(name, str(dtype).removeprefix("torch."), e_out, e_lse, tol, ok))
    rows += _ops_correctness(args, device, dtype, gen, tol)
    return rows


def _ops_inputs(args, device, dtype, tokens, gen):
    nh, nkv, d, hid = args.heads, args.kv_heads, args.head_dim, args.hidden
    x = torch.randn(tokens, hid, generator=gen, device=device).to(dtype)
    res = torch.randn(tokens, hid, generator=gen, device=device).to(dtype)
    w = (torch.rand(hid, generator=gen, device=device) + 0.5).to(dtype)
    qkv = torch.randn(tokens, (nh + 2 * nkv) * d, generator=gen, device=device).to(dtype)
    p = 8192
    freqs = torch.arange(p, device=device, dtype=torch.float32)[:, None] * (
        1e4 ** (-torch.arange(0, d, 2, device=device) / d))[None, :]
    cos, sin = freqs.cos(), freqs.sin()  # [P, d/2]
    pos = torch.randint(0, p, (tokens,), generator=gen, device=device)
    n_blocks = -(-tokens // args.block_size) + 1
    slots = torch.randperm(n_blocks * args.block_size, generator=gen, device=device)[:tokens]
    kc = torch.zeros(n_blocks, args.block_size, nkv, d, dtype=dtype, device=device)
    return x, res, w, qkv, cos, sin, pos, slots, kc, torch.zeros_like(kc)


def _ops_correctness(args, device, dtype, gen, tol) -> list[CorrectnessRow]:
    x, res, w, qkv, cos, sin, pos, slots, kc, vc = _ops_inputs(args, device, dtype, 33, gen)
    eps = 1e-5
    dt = str(dtype).removeprefix("torch.")

    def norm64(v):
        vd = v.double()
        return vd * torch.rsqrt(vd.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    rows = [CorrectnessRow("rms_norm", dt, max_rel_err(ops.rms_norm(x, w, eps), norm64(x)), None, tol, False)]
    normed, h = ops.add_rms_norm(x, res, w, eps)
    rows.append(CorrectnessRow("add_rms_norm", dt, max(max_rel_err(h, x.double() + res.double()),
                                                      max_rel_err(normed, norm64(h))), None, tol, False))
    q, k, v = ops.rope_qkv_write(qkv, cos, sin, pos, args.heads, args.kv_heads, (kc, vc, slots))
    q64, k64, v64 = ops.rope_qkv_torch(qkv.double(), cos.double(), sin.double(), pos, args.heads, args.kv_heads)
    cache_k = kc.view(-1, args.kv_heads, args.head_dim)[slots]
    err = max(max_rel_err(q, q64), max_rel_err(k, k64), max_rel_err(v, v64), max_rel_err(cache_k, k64))
    rows.append(CorrectnessRow("rope_qkv_write", dt, err, None, tol, False))
    for r in rows:
        r.ok = r.err_out <= tol
    return rows


def run_ops(args, device: torch.device, dtype: torch.dtype, token_counts) -> list[OpsRow]:
    """Fused ops (the dispatch: Triton on GPU) against the unfused torch sequences of the model."""
    gen = torch.Generator(device=device).manual_seed(1)
    eps = 1e-5
    nh, nkv, d = args.heads, args.kv_heads, args.head_dim
    rows = []
    for t in token_counts:
        x, res, w, qkv, cos, sin, pos, slots, kc, vc = _ops_inputs(args, device, dtype, t, gen)

        def rope_unfused():
            q, k, v = ops.rope_qkv_torch(qkv, cos, sin, pos, nh, nkv)
            torch_ops.write_kv(kc, vc, k, v, slots)

        pairs = [
            ("rms_norm", lambda: ops.rms_norm(x, w, eps), lambda: ops.rms_norm_torch(x, w, eps)),
            ("add_rms_norm", lambda: ops.add_rms_norm(x, res, w, eps), lambda: ops.add_rms_norm_torch(x, res, w, eps)),
            ("rope_qkv_write", lambda: ops.rope_qkv_write(qkv, cos, sin, pos, nh, nkv, (kc, vc, slots)),
             rope_unfused),
        ]
        for name, fused, unfused in pairs:
            fe = time_call(fused, device, method="events" if device.type == "cuda" else None).seconds
            ue = time_call(unfused, device, method="events" if device.type == "cuda" else None).seconds
            fg = ug = None
            if device.type == "cuda":
                try:
                    fg = time_call(fused, device, method="graph").seconds
                    ug = time_call(unfused, device, method="graph").seconds
                except RuntimeError:  # a forced torch backend syncs inside rope_qkv_write: not capturable
                    fg = ug = None
            rows.append(OpsRow(name, t, fe * 1e6, ue * 1e6, None if fg is None else fg * 1e6,
                               None if ug is None else ug * 1e6, ue / fe, None if fg is None else ug / fg))
    return rows


def run(args: argparse.Namespace) -> dict:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = _DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    probe = torch.empty(0, device=device)
    if gpu:
        backend = f"{'Triton' if uses_triton(probe) else 'torch'} kernels on {torch.cuda.get_device_name(device)}"
    else:
        backend = "CPU: the torch path at small sizes (no GPU; Triton kernels not timed)"
    if gpu:
        grid = (QUICK_CONTEXTS, QUICK_BATCHES, QUICK_PREFILL, QUICK_OP_TOKENS) if args.quick else (
            GPU_CONTEXTS, GPU_BATCHES, GPU_PREFILL, GPU_OP_TOKENS)
    else:
        grid = (CPU_CONTEXTS, CPU_BATCHES, CPU_PREFILL, CPU_OP_TOKENS)
    given = (args.contexts, args.batches, args.prefill, args.op_tokens)
    contexts, batches, prefill, op_tokens = (g if g is not None else d for g, d in zip(given, grid))
    max_kv = (args.max_kv_gib if args.max_kv_gib is not None else (8 if args.quick else 32)) * 2**30
    t0 = time.perf_counter()
    tuned = _autotune(args, device, dtype) if args.autotune else []
    copy_bw = copy_bandwidth(device, (1 << 30) if gpu else (1 << 26))
    correctness = run_correctness(args, device, dtype)
    decode, skipped = run_decode(args, device, dtype, copy_bw, contexts, batches, max_kv)
    pre, skipped_pre = run_prefill(args, device, dtype, prefill)
    op_rows = run_ops(args, device, dtype, op_tokens)
    return {
        "bench": "kernels",
        "backend": backend,
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "config": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "block_size": args.block_size, "hidden": args.hidden, "quick": args.quick,
                   "contexts": contexts, "batches": batches, "prefill": prefill, "op_tokens": op_tokens,
                   "max_kv_bytes": max_kv},
        "copy_GBps": copy_bw / 1e9,
        "autotune": tuned,
        "correctness": [asdict(r) for r in correctness],
        "decode": [asdict(r) for r in decode],
        "prefill": [asdict(r) for r in pre],
        "ops": [asdict(r) for r in op_rows],
        "skipped": skipped + skipped_pre,
        "seconds": time.perf_counter() - t0,
    }


def _autotune(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Tune decode (8 x 32K context) and prefill (one 8K prompt) tiles at the bench's shape; cache them."""
    if device.type != "cuda":
        return []
    from infinite.attention.triton import autotune

    shape = (args.heads, args.kv_heads, args.head_dim, args.block_size, dtype, device)
    problems = [("decode", autotune.decode_problem(8, 32768, *shape)), ("prefill", autotune.prefill_problem(8192, *shape))]
    out = []
    for kind, problem in problems:
        res = autotune.autotune(kind, *problem)
        out.append({"kind": kind, "key": res.key, "device": res.device, "table": asdict(res.table),
                    "winner": asdict(res.winner), "speedup_over_table": res.speedup,
                    "rejected": len(res.rejected), "timed": len(res.seconds)})
    return out


def format_tables(result: dict) -> str:
    cfg = result["config"]
    head = (f"{result['backend']} | {result['dtype']} nh={cfg['heads']} nkv={cfg['kv_heads']} d={cfg['head_dim']} "
            f"B={cfg['block_size']} | copy bandwidth {result['copy_GBps']:.1f} GB/s")
    parts = []
    for t in result["autotune"]:
        parts.append(f"# autotuned {t['kind']} tile for {t['device']}: {t['winner']} "
                     f"({t['speedup_over_table']:.2f}x the table's {t['table']}; {t['timed']} timed, "
                     f"{t['rejected']} rejected)")
    parts.append(format_table(f"correctness against float64 | {head}",
                              ["case", "dtype", "err out", "err lse", "tol", "ok"],
                              [[r["case"], r["dtype"], r["err_out"], r["err_lse"], r["tolerance"], r["ok"]]
                               for r in result["correctness"]]))
    parts.append(format_table(
        "decode MicroAttention (MA/SDPA: time ratio, <= 1.1 is the target from 32K up)",
        ["context", "batch", "KV MiB", "S", "MA us", "GB/s", "%copy", "SDPA us", "MA/SDPA", "max diff", "timed"],
        [[r["context"], r["batch"], r["kv_bytes"] / 2**20, r["splits"], r["ma_us"], r["ma_GBps"], r["pct_of_copy"],
          r["sdpa_us"], r["ma_over_sdpa"], r["max_diff_vs_sdpa"], r["timed"]] for r in result["decode"]]))
    parts.append(format_table(
        "causal prefill, one prompt",
        ["tokens", "MA ms", "MA TFLOP/s", "SDPA ms", "SDPA TFLOP/s", "SDPA backend", "MA/SDPA", "timed"],
        [[r["tokens"], r["ma_ms"], r["ma_TFLOPs"], r["sdpa_ms"], r["sdpa_TFLOPs"], r["sdpa_backend"],
          r["ma_over_sdpa"], r["timed"]] for r in result["prefill"]]))
    parts.append(format_table(
        f"fused ops vs the unfused torch sequence (H={cfg['hidden']}; eager: back-to-back launches, graph: GPU time)",
        ["op", "tokens", "fused eager us", "unfused eager us", "x eager", "fused graph us", "unfused graph us",
         "x graph"],
        [[r["op"], r["tokens"], r["fused_eager_us"], r["unfused_eager_us"], r["eager_speedup"], r["fused_graph_us"],
          r["unfused_graph_us"], r["graph_speedup"]] for r in result["ops"]]))
    for s in result["skipped"]:
        parts.append(f"skipped: {s}")
    parts.append(f"# {result['seconds']:.1f} s")
    return "\n\n".join(parts)


def main(argv: list[str]) -> int:
    args = _parse(argv)
    torch.manual_seed(0)
    result = run(args)
    print(format_tables(result), flush=True)
    if args.out:
        write_json(args.out, result)
    return 0
