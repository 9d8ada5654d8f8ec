"""AggregationAttention: fused exact merge of partial (out, lse) pairs.

``o = sum_j exp(lse_j - lse) * o_j``, ``lse = logsumexp_j lse_j``. One program
per (token, block of heads) makes two passes over the parts: the first finds
the max lse (so the exponentials cannot overflow), the second accumulates the
weighted outputs in float32. Parts with ``lse = -inf`` get weight 0; a row
where every part is ``-inf`` comes out as ``out = 0, lse = -inf``.
The decode kernel reuses it to reduce its KV splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infinite.attention.triton._jit import kernel, next_pow2


@kernel
def _aggregate_kernel(
    OP, LP, O, L,
    num_parts, num_heads,
    stride_op, stride_ot, stride_oh, stride_od,
    stride_lp, stride_lt, stride_lh,
    stride_Ot, stride_Oh, stride_Od,
    stride_Lt, stride_Lh,
    HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = heads < num_heads
    od_mask = h_mask[:, None] & (offs_d[None, :] < HEAD_D)

    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for p in range(num_parts):
        lp = tl.load(LP + p * stride_lp + t * stride_lt + heads * stride_lh, mask=h_mask, other=float("-inf"))
        m = tl.maximum(m, lp.to(tl.float32))
    m_safe = tl.where(m == float("-inf"), 0.0, m)

    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for p in range(num_parts):
        lp = tl.load(LP + p * stride_lp + t * stride_lt + heads * stride_lh, mask=h_mask, other=float("-inf"))
        w = tl.exp(lp.to(tl.float32) - m_safe)  # [BLOCK_H]; -inf part -> 0
        op = tl.load(
            OP + p * stride_op + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
            mask=od_mask,
            other=0.0,
        )  # [BLOCK_H, BLOCK_D]
        total += w
        acc += w[:, None] * op.to(tl.float32)

    empty = total == 0.0
    denom = tl.where(empty, 1.0, total)
    out = acc / denom[:, None]
    lse = tl.where(empty, float("-inf"), m_safe + tl.log(denom))
    tl.store(
        O + t * stride_Ot + heads[:, None] * stride_Oh + offs_d[None, :] * stride_Od,
        out.to(O.dtype.element_ty),
        mask=od_mask,
    )
    tl.store(L + t * stride_Lt + heads * stride_Lh, lse, mask=h_mask)


def aggregate_stacked(
    outs: torch.Tensor,  # [P, T, nh, d]
    lses: torch.Tensor,  # [P, T, nh]
    out: torch.Tensor | None = None,  # [T, nh, d] destination (any float dtype)
    lse: torch.Tensor | None = None,  # [T, nh] float32 destination
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge stacked parts into (out [T,nh,d], lse [T,nh] f32); writes into ``out``/``lse`` if given."""
    if outs.dim() != 4 or lses.dim() != 3 or outs.shape[:3] != lses.shape:
        raise ValueError(f"expected outs [P,T,nh,d] and lses [P,T,nh], got {tuple(outs.shape)} and {tuple(lses.shape)}")
    p, t, nh, d = outs.shape
    if p == 0:
        raise ValueError("aggregate needs at least one partial result")
    if out is None:
        out = torch.empty(t, nh, d, dtype=out_dtype or outs.dtype, device=outs.device)
    if lse is None:
        lse = torch.empty(t, nh, dtype=torch.float32, device=outs.device)
    if t == 0 or nh == 0:
        return out, lse
    block_d = max(16, next_pow2(d))
    # Keep a program's [BLOCK_H, BLOCK_D] accumulator at <= 4K floats.
    block_h = max(1, min(next_pow2(nh), 4096 // block_d))
    _aggregate_kernel.on(outs.device)[(t, triton.cdiv(nh, block_h))](
        outs, lses, out, lse,
        p, nh,
        *outs.stride(), *lses.stride(), *out.stride(), *lse.stride(),
        HEAD_D=d, BLOCK_H=block_h, BLOCK_D=block_d,
    )
    return out, lse


def aggregate(
    parts: list[tuple[torch.Tensor, torch.Tensor]],  # [(out [T,nh,d], lse [T,nh])]
) -> tuple[torch.Tensor, torch.Tensor]:
    """AggregationAttention over a list of parts -> (out [T,nh,d] in parts[0] dtype, lse [T,nh] f32)."""
    if not parts:
        raise ValueError("aggregate needs at least one partial result")
    if len(parts) == 1:
        return parts[0]
    shape = parts[0][0].shape
    for o, l in parts:
        if o.shape != shape or l.shape != shape[:2]:
            raise ValueError(f"all parts must be out {tuple(shape)} and lse {tuple(shape[:2])}, got {tuple(o.shape)}, {tuple(l.shape)}")
    dtypes = {o.dtype for o, _ in parts}
    stack_dtype = parts[0][0].dtype if len(dtypes) == 1 else torch.float32
    outs = torch.stack([o.to(stack_dtype) for o, _ in parts])  # [P, T, nh, d]
    lses = torch.stack([l.float() for _, l in parts])  # [P, T, nh]
    return aggregate_stacked(outs, lses, out_dtype=parts[0][0].dtype)
