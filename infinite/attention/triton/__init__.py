"""Triton path of MicroAttention / AggregationAttention / KV write, drop-in for ``torch_ops``.

Same signatures and semantics as ``infinite.attention.torch_ops``. On CUDA
tensors the kernels are compiled; on CPU tensors they run under the Triton
interpreter (see ``_jit.Kernel``), which is how CI tests them.
"""

from __future__ import annotations

import torch

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton.aggregate import aggregate, aggregate_stacked
from infinite.attention.triton.cache_write import write_kv
from infinite.attention.triton.decode import decode_attention
from infinite.attention.triton.prefill import prefill_attention


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: MAMetadata) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [T,nh,d] and k/v caches [N,B,nkv,d], got {tuple(q.shape)}, "
            f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    nh, d = q.shape[1], q.shape[2]
    nkv = k_cache.shape[2]
    if k_cache.shape[3] != d or nh % nkv != 0:
        raise ValueError(f"q heads {nh} x dim {d} do not fit cache heads {nkv} x dim {k_cache.shape[3]}")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if meta.q_pos.shape[0] != q.shape[0] or meta.cu_q.shape[0] != meta.num_requests + 1:
        raise ValueError("meta does not describe q: q_pos must be [T] and cu_q [R+1]")
    for name in ("cu_q", "q_pos", "block_tables", "block_idx", "num_blocks"):
        t = getattr(meta, name)
        if t.device != q.device:
            raise ValueError(f"meta.{name} is on {t.device}, q on {q.device}")
        if t.dim() and t.stride(-1) != 1:
            raise ValueError(f"meta.{name} must have a contiguous last dimension (the kernels index it as such)")


def micro_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries over the blocks in ``meta``: (out [T,nh,d] in q.dtype, lse [T,nh] f32).

    A pure decode batch runs the split-KV decode kernel on every row (split
    count ``meta.num_splits``, or the heuristic). A mixed batch whose metadata
    names its ``decode_rows`` runs those on the decode kernel and
    ``prefill_rows`` on the prefill kernel, both writing into one out/lse; one
    without (hand-built metadata) runs every row on the prefill kernel.
    """
    _check(q, k_cache, v_cache, meta)
    if meta.max_q_len <= 1:
        return decode_attention(q, k_cache, v_cache, meta, scale, meta.num_splits)
    if meta.decode_rows is None or meta.prefill_rows is None:
        return prefill_attention(q, k_cache, v_cache, meta, scale)
    t, nh, d = q.shape
    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if meta.decode_rows.shape[0]:
        decode_attention(q, k_cache, v_cache, meta, scale, meta.num_splits, rows=meta.decode_rows, out=out, lse=lse)
    if meta.prefill_rows.shape[0]:
        prefill_attention(q, k_cache, v_cache, meta, scale, rows=meta.prefill_rows,
                          max_q_len=meta.max_prefill_q_len, out=out, lse=lse)
    return out, lse


__all__ = [
    "write_kv",
    "micro_attention",
    "aggregate",
    "aggregate_stacked",
    "decode_attention",
    "prefill_attention",
]
