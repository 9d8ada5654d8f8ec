"""Paged prefill MicroAttention: a varlen chunk of queries per request, causal by position.

Grid ``(rows, ceil(max_q_len / BLOCK_Q), nkv)``. Grid row ``i`` is metadata
row ``rows[i]`` (the prefill rows of a mixed batch) or row ``i``. A program
takes ``BLOCK_Q`` query tokens of one request and the ``G = nh // nkv`` query
heads that share KV head ``kvh``, flattened into ``BLOCK_M = BLOCK_Q * BLOCK_G``
rows (row ``m`` is token ``m // BLOCK_G``, head ``kvh * G + m % BLOCK_G``), so
each K/V tile read serves the whole query group. Query tiles run latest first:
they see the most keys, and starting them first evens out the tail of the grid.

Causal early exit. ``MAMetadata`` guarantees that a row's ``block_idx`` is
strictly ascending (list order is position order), so the keys a program's rows
can see are a prefix of the row's list: the blocks whose first position is
``<= qp_max`` (the program's last query position). For a whole local request
(``block_idx == 0..nb-1``, recognised by its last entry being ``nb - 1``) that
prefix is ``qp_max // B + 1`` blocks; for a partial block list (a remote part)
a binary search over the row finds it. The loop stops there. It also runs in
two stages: the keys every row of the program sees (a prefix again, up to
``qp_min``) take an unmasked loop; only the tiles after that pay for masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton._jit import dot_dtype, dot_precision, kernel, next_pow2
from infinite.attention.triton.tiles import PrefillTile, tile_for

_LOG2E = 1.4426950408889634


@kernel
def _prefill_kernel(
    Q, K, V, BT, BI, NB, CU, QPOS, ROWS, O, LSE,
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
    HAS_ROWS: tl.constexpr,  # grid row i is metadata row ROWS[i]
):
    i = tl.program_id(0).to(tl.int64)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)  # latest (heaviest) query tiles first
    kvh = tl.program_id(2)
    if HAS_ROWS:
        r = tl.load(ROWS + i).to(tl.int64)
    else:
        r = i

    q_start = tl.load(CU + r).to(tl.int64)
    q_len = tl.load(CU + r + 1).to(tl.int64) - q_start
    if q_tile * BLOCK_Q < q_len:
        nb = tl.load(NB + r).to(tl.int64)

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
        qp_min = tl.min(tl.where(row_ok, qp, 2**62), 0)

        # How many of the row's blocks some query sees (n_vis) and every query sees whole (n_full).
        bi_row = BI + r * stride_bir
        last = tl.load(bi_row + tl.maximum(nb - 1, 0), mask=nb > 0, other=-1).to(tl.int64)
        if last == nb - 1:  # block_idx == 0..nb-1: the whole request
            n_vis = tl.maximum(tl.minimum(nb, qp_max // PAGE + 1), 0)
            n_full = tl.maximum(tl.minimum(nb, (qp_min + 1) // PAGE), 0)
        else:  # a partial block list: binary searches over the ascending logical ids
            lo = nb * 0
            hi = nb
            while lo < hi:
                mid = (lo + hi) // 2
                go = tl.load(bi_row + mid).to(tl.int64) * PAGE <= qp_max
                lo = tl.where(go, mid + 1, lo)
                hi = tl.where(go, hi, mid)
            n_vis = lo
            lo = nb * 0
            hi = n_vis
            while lo < hi:
                mid = (lo + hi) // 2
                go = tl.load(bi_row + mid).to(tl.int64) * PAGE + (PAGE - 1) <= qp_min
                lo = tl.where(go, mid + 1, lo)
                hi = tl.where(go, hi, mid)
            n_full = lo
        full_end = n_full * PAGE // BLOCK_N * BLOCK_N  # whole key tiles every row sees
        vis_end = n_vis * PAGE

        q = tl.load(
            Q + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_ok[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        q = q.to(DOT_DTYPE)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bt_row = BT + r * stride_btr
        for stage in tl.static_range(2):
            # Stage 0: keys [0, full_end), visible to every row: no masks. Stage 1: the rest, masked.
            if stage == 0:
                k_lo = full_end * 0
                k_hi = full_end
            else:
                k_lo = full_end
                k_hi = vis_end
            for j0 in range(k_lo, k_hi, BLOCK_N):
                j = j0 + offs_n  # [BLOCK_N] key index in list order
                page = j // PAGE
                off = j % PAGE
                if stage == 0:
                    phys = tl.load(bt_row + page).to(tl.int64)
                    kt = tl.load(
                        K + phys[None, :] * stride_kn + off[None, :] * stride_kb + kvh * stride_kh
                        + offs_d[:, None] * stride_kd,
                        mask=d_mask[:, None],
                        other=0.0,
                    )  # [BLOCK_D, BLOCK_N]
                    s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
                    v = tl.load(
                        V + phys[:, None] * stride_vn + off[:, None] * stride_vb + kvh * stride_vh
                        + offs_d[None, :] * stride_vd,
                        mask=d_mask[None, :],
                        other=0.0,
                    )  # [BLOCK_N, BLOCK_D]
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[:, None])
                else:
                    in_range = j < k_hi
                    phys = tl.load(bt_row + page, mask=in_range, other=0).to(tl.int64)
                    lidx = tl.load(bi_row + page, mask=in_range, other=0).to(tl.int64)
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
                    s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
                    s = tl.where(visible, s, float("-inf"))
                    v = tl.load(
                        V + phys[:, None] * stride_vn + off[:, None] * stride_vb + kvh * stride_vh
                        + offs_d[None, :] * stride_vd,
                        mask=needed[:, None] & d_mask[None, :],
                        other=0.0,
                    )  # [BLOCK_N, BLOCK_D]
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
                    alpha = tl.exp2(m_i - m_safe)
                    p = tl.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT_DTYPE), v.to(DOT_DTYPE),
                                                    input_precision=PRECISION)
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


def prefill_blocks(group: int, tile: PrefillTile) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_G): query tokens per program and the padded query group; rows = their product."""
    block_g = next_pow2(group)
    return max(1, tile.block_m // block_g), block_g


def prefill_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
    *,
    rows: torch.Tensor | None = None,  # [Rp] int32 metadata rows to run; None: all
    max_q_len: int | None = None,  # the longest q_len among them (default meta.max_q_len)
    out: torch.Tensor | None = None,  # [T, nh, d] q.dtype destination (mixed batches share one)
    lse: torch.Tensor | None = None,  # [T, nh] float32 destination
    tile: PrefillTile | None = None,  # override the device's tile (the autotuner)
) -> tuple[torch.Tensor, torch.Tensor]:
    """MA for any varlen rows -> (out [T,nh,d] q.dtype, lse [T,nh] f32); only the rows' tokens are written."""
    t, nh, d = q.shape
    _, page, nkv, _ = k_cache.shape
    n_rows = meta.num_requests if rows is None else rows.shape[0]
    max_q = meta.max_q_len if max_q_len is None else max_q_len
    g = nh // nkv
    if tile is None:
        tile = tile_for("prefill", q.device, d, q.dtype)
    block_q, block_g = prefill_blocks(g, tile)
    if out is None:
        out = torch.empty(t, nh, d, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if n_rows == 0 or t == 0 or max_q == 0:
        return out, lse
    _prefill_kernel.on(q.device)[(n_rows, triton.cdiv(max_q, block_q), nkv)](
        q, k_cache, v_cache, meta.block_tables, meta.block_idx, meta.num_blocks, meta.cu_q, meta.q_pos,
        meta.num_blocks if rows is None else rows, out, lse,
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        meta.block_tables.stride(0), meta.block_idx.stride(0),
        *out.stride(), *lse.stride(),
        G=g, PAGE=page, HEAD_D=d,
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_M=block_q * block_g, BLOCK_N=tile.block_n,
        BLOCK_D=max(16, next_pow2(d)),
        PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype, q.device),
        HAS_ROWS=rows is not None,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out, lse
