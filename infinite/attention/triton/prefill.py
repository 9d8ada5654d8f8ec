"""Paged prefill MicroAttention: a varlen chunk of queries per request, causal by position.

Grid ``(R, ceil(max_q_len / BLOCK_Q), nkv)``. A program takes ``BLOCK_Q`` query
tokens of one request and the ``G = nh // nkv`` query heads that share KV head
``kvh``, flattened into ``BLOCK_M = BLOCK_Q * BLOCK_G`` rows (row ``m`` is token
``m // BLOCK_G``, head ``kvh * G + m % BLOCK_G``), so each K/V tile read serves
the whole query group. It walks the request's blocks (the cached prefix and the
chunk itself, already written to the cache) in tiles of ``BLOCK_N`` keys, with
an online softmax; the visibility rule ``key_pos <= q_pos`` gives causality,
cached prefixes and partial block lists alike. Mixed batches (some requests
with one query) run here too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton._jit import dot_dtype, dot_precision, kernel, next_pow2


@kernel
def _prefill_kernel(
    Q, K, V, BT, BI, NB, CU, QPOS, O, LSE,
    scale_log2,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btr, stride_bir,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    G: tl.constexpr, PAGE: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,  # BLOCK_M = BLOCK_Q * BLOCK_G
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    r = tl.program_id(0)
    q_tile = tl.program_id(1)
    kvh = tl.program_id(2)

    q_start = tl.load(CU + r).to(tl.int64)
    q_len = tl.load(CU + r + 1).to(tl.int64) - q_start
    if q_tile * BLOCK_Q < q_len:
        n_keys = tl.load(NB + r).to(tl.int64) * PAGE

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        qi = q_tile * BLOCK_Q + offs_m // BLOCK_G  # [BLOCK_M] query index within the request
        gi = offs_m % BLOCK_G
        row_ok = (qi < q_len) & (gi < G)
        tok = q_start + qi
        heads = kvh * G + gi
        d_mask = offs_d < HEAD_D
        qp = tl.load(QPOS + tok, mask=row_ok, other=-1)  # [BLOCK_M]; -1: padding rows see nothing
        qp_max = tl.max(qp, 0)

        q = tl.load(
            Q + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j0 in range(0, n_keys, BLOCK_N):
            j = j0 + offs_n  # [BLOCK_N] key index in list order
            in_range = j < n_keys
            page = j // PAGE
            off = j % PAGE
            phys = tl.load(BT + r * stride_btr + page, mask=in_range, other=0).to(tl.int64)
            lidx = tl.load(BI + r * stride_bir + page, mask=in_range, other=0).to(tl.int64)
            kpos = tl.where(in_range, lidx * PAGE + off, 2**62)  # out of range: never visible
            visible = kpos[None, :] <= qp[:, None]  # [BLOCK_M, BLOCK_N]
            # Keys no row can see may not be written yet (garbage, even NaN): never load them.
            needed = kpos <= qp_max  # [BLOCK_N]
            kt = tl.load(
                K + phys[None, :] * stride_kn + off[None, :] * stride_kb + kvh * stride_kh
                + offs_d[:, None] * stride_kd,
                mask=needed[None, :] & d_mask[:, None],
                other=0.0,
            )  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + phys[:, None] * stride_vn + off[:, None] * stride_vb + kvh * stride_vh
                + offs_d[None, :] * stride_vd,
                mask=needed[:, None] & d_mask[None, :],
                other=0.0,
            )  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(
            O + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & d_mask[None, :],
        )
        tl.store(LSE + tok * stride_lt + heads * stride_lh, lse, mask=row_ok)


def prefill_tiles(group: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_G, BLOCK_N): 64 query rows per program (>= 16 for tl.dot), 64 or 32 keys per tile."""
    block_g = next_pow2(group)
    block_m = max(64 if head_dim <= 128 else 32, block_g)
    block_n = 64 if head_dim <= 64 else 32
    return block_m // block_g, block_g, block_n


def prefill_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MA for any varlen batch -> (out [T,nh,d] q.dtype, lse [T,nh] f32)."""
    t, nh, d = q.shape
    _, page, nkv, _ = k_cache.shape
    r = meta.num_requests
    g = nh // nkv
    block_q, block_g, block_n = prefill_tiles(g, d)
    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if r == 0 or t == 0 or meta.max_q_len == 0:
        return out, lse
    _prefill_kernel.on(q.device)[(r, triton.cdiv(meta.max_q_len, block_q), nkv)](
        q, k_cache, v_cache, meta.block_tables, meta.block_idx, meta.num_blocks, meta.cu_q, meta.q_pos,
        out, lse,
        scale * 1.4426950408889634,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        meta.block_tables.stride(0), meta.block_idx.stride(0),
        *out.stride(), *lse.stride(),
        G=g, PAGE=page, HEAD_D=d,
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_M=block_q * block_g, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
        PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype, q.device),
    )
    return out, lse
