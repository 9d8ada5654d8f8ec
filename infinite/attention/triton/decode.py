"""Paged decode MicroAttention: one query per request, split-KV (flash-decoding), graph-safe.

Grid ``(rows, nkv, S)``: one program per decode row, KV head and split. Row
``i`` of the grid is metadata row ``rows[i]`` (``rows`` given: the decode rows
of a mixed batch) or row ``i`` (a pure decode batch). A program loads the
whole query group of its KV head (``G = nh // nkv`` heads, padded to
``BLOCK_G >= 16`` rows so the score product is a tensor-core ``tl.dot``), so
each KV block is read from memory once per group, not once per query head.

The keys of a request are addressed in "list order": key ``j`` is offset
``j % B`` of the block at ``block_tables[r, j // B]``; its position is
``block_idx[r, j // B] * B + j % B``.

Graph safety: the split count ``S`` is a launch constant the caller may fix
(the CUDA-graph runner passes one per captured batch bucket; the default
heuristic reads only host-known shapes and a cached SM count). Every per-step
value comes from device memory: each row divides *its own* key count
(``num_blocks[r] * B``) over the ``S`` splits, split size rounded up to the
key tile, so a short row in a bucket sized for long ones does not walk empty
tiles; splits past its keys exit at once and the reduce skips them.

With ``S == 1`` the kernel writes the final output in q's dtype (no reduce
launch). With ``S > 1`` it writes float32 partials (out, lse in log2 units)
into the shared workspace (``workspace.py``) and ``_reduce_kernel`` merges a
row's used splits in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton import workspace
from infinite.attention.triton._jit import dot_dtype, dot_precision, kernel, next_pow2, num_sms
from infinite.attention.triton.tiles import DecodeTile, tile_for

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@kernel
def _decode_kernel(
    Q, K, V, BT, BI, NB, CU, QPOS, ROWS, O, LSE,
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    num_splits,
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_btr, stride_bir,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lt, stride_lh,
    G: tl.constexpr, PAGE: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    HAS_ROWS: tl.constexpr,  # grid row i is metadata row ROWS[i]
    DIRECT: tl.constexpr,  # S == 1: O/LSE are the final [T, nh, d] / [T, nh]; else partials [S, rows, ...]
):
    i = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    if HAS_ROWS:
        r = tl.load(ROWS + i).to(tl.int64)
    else:
        r = i

    q_row = tl.load(CU + r).to(tl.int64)
    q_len = tl.load(CU + r + 1).to(tl.int64) - q_row
    n_keys = tl.load(NB + r).to(tl.int64) * PAGE
    # A request without a query (q_len 0) reads nothing and stores nothing.
    n_keys = tl.where(q_len > 0, n_keys, 0)
    # This row's own split size (same formula in _reduce_kernel), a whole number of key tiles.
    per_split = (n_keys + num_splits - 1) // num_splits
    per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, n_keys)

    # A split past the row's keys stores nothing (the reduce never reads it), except with S == 1,
    # where the program must still write the empty result (out 0, lse -inf) of a row with a query.
    if (start < end) | DIRECT:
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
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE),
                                                input_precision=PRECISION)
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))  # log2 units
        # (Written as one comparison: the interpreter turns `bool_vector & bool_scalar` into int32.)
        row_ok = offs_g < tl.where(q_len > 0, G, 0)
        if DIRECT:
            tl.store(
                O + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out.to(O.dtype.element_ty),
                mask=row_ok[:, None] & d_mask[None, :],
            )
            tl.store(LSE + q_row * stride_lt + heads * stride_lh, lse2 * 0.6931471805599453, mask=row_ok)
        else:
            tl.store(
                O + split * stride_os + i * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out,
                mask=row_ok[:, None] & d_mask[None, :],
            )
            tl.store(LSE + split * stride_ls + i * stride_lt + heads * stride_lh, lse2, mask=row_ok)


@kernel
def _reduce_kernel(
    OP, LP, NB, CU, ROWS, O, LSE,
    num_splits, num_heads,
    stride_ps, stride_pt, stride_ph, stride_pd,
    stride_qs, stride_qt, stride_qh,
    stride_ot, stride_oh, stride_od,
    stride_lt, stride_lh,
    PAGE: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    """Merge a row's used splits: one pass with a running max (partial lse in log2 units)."""
    i = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    if HAS_ROWS:
        r = tl.load(ROWS + i).to(tl.int64)
    else:
        r = i
    q_row = tl.load(CU + r).to(tl.int64)
    q_len = tl.load(CU + r + 1).to(tl.int64) - q_row
    n_keys = tl.where(q_len > 0, tl.load(NB + r).to(tl.int64) * PAGE, 0)
    per_split = (n_keys + num_splits - 1) // num_splits
    per_split = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    used = tl.where(n_keys > 0, (n_keys + per_split - 1) // tl.maximum(per_split, 1), 0)

    offs_d = tl.arange(0, BLOCK_D)
    h_ok = heads < tl.where(q_len > 0, num_heads, 0)
    od_mask = h_ok[:, None] & (offs_d[None, :] < HEAD_D)
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(0, used):
        lp = tl.load(LP + s * stride_qs + i * stride_qt + heads * stride_qh, mask=h_ok, other=float("-inf"))
        op = tl.load(
            OP + s * stride_ps + i * stride_pt + heads[:, None] * stride_ph + offs_d[None, :] * stride_pd,
            mask=od_mask,
            other=0.0,
        )  # [BLOCK_H, BLOCK_D]
        m_new = tl.maximum(m, lp)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lp - m_safe)  # a split that saw nothing (-inf) weighs 0
        acc = acc * alpha[:, None] + w[:, None] * op
        total = total * alpha + w
        m = m_new
    empty = total == 0.0
    denom = tl.where(empty, 1.0, total)
    m_safe = tl.where(empty, 0.0, m)
    tl.store(
        O + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
        (acc / denom[:, None]).to(O.dtype.element_ty),
        mask=od_mask,
    )
    lse = tl.where(empty, float("-inf"), (m_safe + tl.log2(denom)) * 0.6931471805599453)
    tl.store(LSE + q_row * stride_lt + heads * stride_lh, lse, mask=h_ok)


def choose_num_splits(num_rows: int, nkv: int, max_keys: int, block_n: int, sms: int) -> int:
    """Enough splits that rows * nkv * S covers every SM about twice; never a split without a key tile.

    Pure function of host-known numbers (``max_keys`` is the block table's width
    times the block size, not any row's length), so a captured graph's split
    count is fixed by its bucket's shapes.
    """
    tiles = max(1, triton.cdiv(max_keys, block_n))
    target = 2 * sms
    programs = max(1, num_rows * nkv)
    return max(1, min(tiles, triton.cdiv(target, programs)))


def default_num_splits(meta: MAMetadata, num_rows: int, nkv: int, page: int, block_n: int,
                       device: torch.device) -> int:
    """The heuristic split count for ``num_rows`` decode rows of ``meta`` (no device sync)."""
    max_keys = meta.block_tables.shape[1] * page
    return choose_num_splits(num_rows, nkv, max_keys, block_n, num_sms(device))


def decode_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
    num_splits: int | None = None,
    *,
    rows: torch.Tensor | None = None,  # [Rd] int32: metadata rows to run (each with q_len <= 1); None: all
    out: torch.Tensor | None = None,  # [T, nh, d] q.dtype destination (mixed batches share one)
    lse: torch.Tensor | None = None,  # [T, nh] float32 destination
    tile: DecodeTile | None = None,  # override the device's tile (the autotuner)
) -> tuple[torch.Tensor, torch.Tensor]:
    """MA for decode rows (at most one query each) -> (out [T,nh,d] q.dtype, lse [T,nh] f32).

    ``num_splits`` fixes the split count (a CUDA-graph bucket's); None picks it
    from host-known shapes. Only the tokens of the rows run are written.
    """
    t, nh, d = q.shape
    _, page, nkv, _ = k_cache.shape
    n_rows = meta.num_requests if rows is None else rows.shape[0]
    g = nh // nkv
    if tile is None:
        tile = tile_for("decode", q.device, d, q.dtype)
    if num_splits is None:
        num_splits = default_num_splits(meta, n_rows, nkv, page, tile.block_n, q.device)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if out is None:
        out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if n_rows == 0 or t == 0:
        return out, lse
    direct = num_splits == 1
    if direct:
        o_dst, l_dst = out, lse  # strides of split 0 unused
        so, sl = (0, *out.stride()), (0, *lse.stride())
    else:
        o_dst, l_dst = workspace.decode_partials(q.device, num_splits, n_rows, nh, d)
        so, sl = o_dst.stride(), l_dst.stride()
    row_arg = meta.num_blocks if rows is None else rows  # unused pointer when all rows run
    block_d = max(16, next_pow2(d))
    _decode_kernel.on(q.device)[(n_rows, nkv, num_splits)](
        q, k_cache, v_cache, meta.block_tables, meta.block_idx, meta.num_blocks, meta.cu_q, meta.q_pos,
        row_arg, o_dst, l_dst,
        scale * _LOG2E, num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        meta.block_tables.stride(0), meta.block_idx.stride(0),
        *so, *sl,
        G=g, PAGE=page, HEAD_D=d,
        BLOCK_G=max(16, next_pow2(g)), BLOCK_N=tile.block_n, BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype, q.device),
        HAS_ROWS=rows is not None, DIRECT=direct,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    if not direct:
        # Keep a program's [BLOCK_H, BLOCK_D] accumulator at <= 4K floats.
        block_h = max(1, min(next_pow2(nh), 4096 // block_d))
        _reduce_kernel.on(q.device)[(n_rows, triton.cdiv(nh, block_h))](
            o_dst, l_dst, meta.num_blocks, meta.cu_q, row_arg, out, lse,
            num_splits, nh,
            *o_dst.stride(), *l_dst.stride(), *out.stride(), *lse.stride(),
            PAGE=page, HEAD_D=d, BLOCK_N=tile.block_n,
            BLOCK_H=block_h, BLOCK_D=block_d, HAS_ROWS=rows is not None,
            num_warps=4,
        )
    return out, lse
