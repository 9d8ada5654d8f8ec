"""Float64 MicroAttention straight from the definition: the yardstick of the kernel tests and benches.

Slow on purpose (one dense softmax per request, in float64, no tiling): it
shares no code with either backend, so it can judge both. Visibility is the
one rule of ``MAMetadata``: a key at position ``block_idx * B + offset`` is
seen by a query at ``q_pos`` iff it is not later. A query that sees nothing
gets ``out = 0, lse = -inf``.
"""

from __future__ import annotations

import torch

from infinite.attention.metadata import MAMetadata


def attention_f64(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T,nh,d], lse [T,nh]) in float64 on q's device."""
    t, nh, d = q.shape
    bsz, nkv = k_cache.shape[1], k_cache.shape[2]
    g = nh // nkv
    out = torch.zeros(t, nh, d, dtype=torch.float64, device=q.device)
    lse = torch.full((t, nh), float("-inf"), dtype=torch.float64, device=q.device)
    cu = meta.cu_q.tolist()
    nbs = meta.num_blocks.tolist()
    offs = torch.arange(bsz, device=q.device)
    for r in range(len(nbs)):
        a, b, nb = cu[r], cu[r + 1], nbs[r]
        if a == b or nb == 0:
            continue
        bl = meta.block_tables[r, :nb].long()
        kpos = (meta.block_idx[r, :nb].long()[:, None] * bsz + offs).reshape(-1)  # [S]
        # Keys later than every query may not be written yet (garbage, even NaN): leave them out.
        needed = kpos <= meta.q_pos[a:b].max()
        kpos = kpos[needed]
        k = k_cache[bl].reshape(-1, nkv, d)[needed].double().repeat_interleave(g, 1)  # [S, nh, d]
        v = v_cache[bl].reshape(-1, nkv, d)[needed].double().repeat_interleave(g, 1)
        s = torch.einsum("qhd,shd->qhs", q[a:b].double(), k) * scale  # [n, nh, S]
        visible = kpos[None, :] <= meta.q_pos[a:b, None]  # [n, S]
        s = s.masked_fill(~visible[:, None, :], float("-inf"))
        row_lse = torch.logsumexp(s, -1)  # [n, nh]
        seen = visible.any(-1)  # [n]
        p = torch.exp(s - torch.where(seen[:, None], row_lse, 0.0)[..., None])
        out[a:b] = torch.where(seen[:, None, None], torch.einsum("qhs,shd->qhd", p, v), 0.0)
        lse[a:b] = torch.where(seen[:, None], row_lse, float("-inf"))
    return out, lse


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (0 when both are empty)."""
    if ref.numel() == 0:
        return 0.0
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()
