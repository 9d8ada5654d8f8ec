"""Paged decode MicroAttention: one query per request, split-KV (flash-decoding).

Grid ``(R, nkv, S)``: one program per request, KV head and split. A program
loads the whole query group of its KV head (``G = nh // nkv`` heads, padded to
``BLOCK_G >= 16`` rows so the score product is a tensor-core ``tl.dot``), so each
KV block is read from memory once per group, not once per query head.

The keys of a request are addressed in "list order": key ``j`` is offset
``j % B`` of the block at ``block_tables[r, j // B]``; its position is
``block_idx[r, j // B] * B + j % B``. Tiles of ``BLOCK_N`` keys gather several
pages at once, so the tile size does not depend on the block size. Split ``s``
reads keys ``[s * keys_per_split, (s + 1) * keys_per_split)``; with ``S > 1``
every split writes a float32 partial (out, lse) and AggregationAttention merges
them, so a single 1M-token request still spreads over all SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton._jit import dot_dtype, dot_precision, kernel, next_pow2, num_sms
from infinite.attention.triton.aggregate import aggregate_stacked


@kernel
def _decode_kernel(
    Q, K, V, BT, BI, NB, CU, QPOS, O, LSE,
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btr, stride_bir,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lt, stride_lh,
    keys_per_split,
    G: tl.constexpr, PAGE: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)

    q_row = tl.load(CU + r).to(tl.int64)
    q_len = tl.load(CU + r + 1).to(tl.int64) - q_row
    n_keys = tl.load(NB + r).to(tl.int64) * PAGE
    # A request without a query (q_len 0) reads nothing and stores nothing.
    n_keys = tl.where(q_len > 0, n_keys, 0)
    qp = tl.load(QPOS + q_row, mask=q_len > 0, other=-1)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    d_mask = offs_d < HEAD_D
    heads = kvh * G + offs_g  # [BLOCK_G]

    q = tl.load(
        Q + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + offs_n  # [BLOCK_N] key index in list order
        in_range = j < end
        page = j // PAGE
        off = j % PAGE
        phys = tl.load(BT + r * stride_btr + page, mask=in_range, other=0).to(tl.int64)
        lidx = tl.load(BI + r * stride_bir + page, mask=in_range, other=0).to(tl.int64)
        visible = in_range & (lidx * PAGE + off <= qp)  # [BLOCK_N]
        kt = tl.load(
            K + phys[None, :] * stride_kn + off[None, :] * stride_kb + kvh * stride_kh
            + offs_d[:, None] * stride_kd,
            mask=visible[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q.to(DOT_DTYPE), kt.to(DOT_DTYPE), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + phys[:, None] * stride_vn + off[:, None] * stride_vb + kvh * stride_vh
            + offs_d[None, :] * stride_vd,
            mask=visible[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    # (Written as one comparison: the interpreter turns `bool_vector & bool_scalar` into int32.)
    row_ok = offs_g < tl.where(q_len > 0, G, 0)
    tl.store(
        O + split * stride_os + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_mask[None, :],
    )
    tl.store(LSE + split * stride_ls + q_row * stride_lt + heads * stride_lh, lse, mask=row_ok)


def block_n_for(head_dim: int) -> int:
    """Keys per tile: 64 keeps K and V tiles of d<=128 in registers with 4 warps."""
    return 64 if head_dim <= 128 else 32


def choose_num_splits(num_requests: int, nkv: int, max_keys: int, block_n: int, sms: int) -> int:
    """Enough splits that R * nkv * S covers every SM about twice; never a split without a key tile."""
    tiles = max(1, triton.cdiv(max_keys, block_n))
    target = 2 * sms
    programs = max(1, num_requests * nkv)
    return max(1, min(tiles, triton.cdiv(target, programs)))


def decode_attention(
    q: torch.Tensor,  # [T, nh, d], T == R (one query per request)
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MA for a batch with at most one query per request -> (out [T,nh,d] q.dtype, lse [T,nh] f32).

    ``num_splits`` overrides the split-KV heuristic (tests use it to force splits).
    """
    t, nh, d = q.shape
    _, page, nkv, _ = k_cache.shape
    r = meta.num_requests
    g = nh // nkv
    block_n = block_n_for(d)
    max_keys = meta.block_tables.shape[1] * page  # host-side bound: no device sync
    if num_splits is None:
        num_splits = choose_num_splits(r, nkv, max_keys, block_n, num_sms(q.device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_keys, keys_per_split))

    out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        o_dst, l_dst = out.unsqueeze(0), lse.unsqueeze(0)  # [1, T, nh, d], [1, T, nh]
    else:
        o_dst = torch.empty(num_splits, t, nh, d, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(num_splits, t, nh, dtype=torch.float32, device=q.device)
    if r > 0 and t > 0:
        _decode_kernel.on(q.device)[(r, nkv, num_splits)](
            q, k_cache, v_cache, meta.block_tables, meta.block_idx, meta.num_blocks, meta.cu_q, meta.q_pos,
            o_dst, l_dst,
            scale * 1.4426950408889634,
            *q.stride(), *k_cache.stride(), *v_cache.stride(),
            meta.block_tables.stride(0), meta.block_idx.stride(0),
            *o_dst.stride(), *l_dst.stride(),
            keys_per_split,
            G=g, PAGE=page, HEAD_D=d,
            BLOCK_G=max(16, next_pow2(g)), BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(d)),
            PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype, q.device),
        )
    if num_splits > 1:
        aggregate_stacked(o_dst, l_dst, out=out, lse=lse)
    return out, lse
