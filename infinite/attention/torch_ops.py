"""Torch reference path of MicroAttention, AggregationAttention and the KV write.

This is the path CPU ranks run, and the reference the Triton kernels are tested
against. Softmax math is done in float32 whatever the storage dtype.
"""

from __future__ import annotations

import torch

from infinite.attention.metadata import MAMetadata


def write_kv(
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * B + offset
) -> None:
    nkv, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _softmax_lse(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [..., n, S] (masked with -inf), v [..., S, d] -> (out [..., n, d], lse [..., n])."""
    lse = torch.logsumexp(scores, dim=-1)  # [..., n]
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - finite.unsqueeze(-1))  # masked keys and empty rows -> 0
    return torch.matmul(p, v), lse


def _decode_rows(
    q: torch.Tensor,  # [Rd, nh, d], one query per row
    q_pos: torch.Tensor,  # [Rd]
    block_tables: torch.Tensor,  # [Rd, M]
    block_idx: torch.Tensor,  # [Rd, M]
    num_blocks: torch.Tensor,  # [Rd]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r, nh, d = q.shape
    _, bsz, nkv, _ = k_cache.shape
    g = nh // nkv
    m = block_tables.shape[1]
    bt = block_tables.long()
    k = k_cache[bt].reshape(r, m * bsz, nkv, d).permute(0, 2, 3, 1).float()  # [R, nkv, d, S]
    v = v_cache[bt].reshape(r, m * bsz, nkv, d).permute(0, 2, 1, 3).float()  # [R, nkv, S, d]
    offs = torch.arange(bsz, device=q.device)
    kpos = (block_idx.long().unsqueeze(-1) * bsz + offs).reshape(r, m * bsz)  # [R, S]
    real = (torch.arange(m, device=q.device).unsqueeze(0) < num_blocks.unsqueeze(1))  # [R, M]
    visible = real.repeat_interleave(bsz, dim=1) & (kpos <= q_pos.unsqueeze(1))  # [R, S]
    qg = q.float().view(r, nkv, g, d)
    scores = torch.matmul(qg, k) * scale  # [R, nkv, g, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out, lse = _softmax_lse(scores, v)  # [R, nkv, g, d], [R, nkv, g]
    return out.reshape(r, nh, d), lse.reshape(r, nh)


def _prefill_row(
    q: torch.Tensor,  # [n, nh, d]
    q_pos: torch.Tensor,  # [n]
    blocks: torch.Tensor,  # [nb] physical ids
    logical: torch.Tensor,  # [nb]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, nh, d = q.shape
    _, bsz, nkv, _ = k_cache.shape
    g = nh // nkv
    nb = blocks.shape[0]
    bl = blocks.long()
    k = k_cache[bl].reshape(nb * bsz, nkv, d).permute(1, 2, 0).float()  # [nkv, d, S]
    v = v_cache[bl].reshape(nb * bsz, nkv, d).permute(1, 0, 2).float()  # [nkv, S, d]
    kpos = (logical.long().unsqueeze(-1) * bsz + torch.arange(bsz, device=q.device)).reshape(-1)  # [S]
    visible = kpos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [n, S]
    qg = q.float().view(n, nkv, g, d).permute(1, 2, 0, 3)  # [nkv, g, n, d]
    scores = torch.matmul(qg, k.unsqueeze(1)) * scale  # [nkv, g, n, S]
    scores = scores.masked_fill(~visible, float("-inf"))
    out, lse = _softmax_lse(scores, v.unsqueeze(1))  # [nkv, g, n, d], [nkv, g, n]
    return out.permute(2, 0, 1, 3).reshape(n, nh, d), lse.permute(2, 0, 1).reshape(n, nh)


def micro_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries over the blocks in ``meta``: (out [T,nh,d] in q.dtype, lse [T,nh] f32)."""
    t, nh, d = q.shape
    if meta.max_q_len <= 1:
        out, lse = _decode_rows(
            q, meta.q_pos, meta.block_tables, meta.block_idx, meta.num_blocks, k_cache, v_cache, scale
        )
        return out.to(q.dtype), lse
    out = torch.empty(t, nh, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    cu = meta.cu_q.tolist()
    q_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    # Rows with one query (decode requests in a mixed batch) go through the batched path.
    single = [i for i, n in enumerate(q_lens) if n == 1]
    if single:
        rows = torch.tensor(single, device=q.device)
        tok = meta.cu_q.long()[rows]
        o, l = _decode_rows(
            q[tok], meta.q_pos[tok], meta.block_tables[rows], meta.block_idx[rows],
            meta.num_blocks[rows], k_cache, v_cache, scale,
        )
        out[tok] = o
        lse[tok] = l
    nbs = meta.num_blocks.tolist()
    for i, n in enumerate(q_lens):
        if n <= 1:
            continue
        s, e, nb = cu[i], cu[i + 1], nbs[i]
        o, l = _prefill_row(
            q[s:e], meta.q_pos[s:e], meta.block_tables[i, :nb], meta.block_idx[i, :nb],
            k_cache, v_cache, scale,
        )
        out[s:e] = o
        lse[s:e] = l
    return out.to(q.dtype), lse


def aggregate(
    parts: list[tuple[torch.Tensor, torch.Tensor]],  # [(out [T,nh,d], lse [T,nh])]
) -> tuple[torch.Tensor, torch.Tensor]:
    """AggregationAttention: o = sum_j exp(lse_j - lse) o_j, lse = logsumexp_j lse_j."""
    if not parts:
        raise ValueError("aggregate needs at least one partial result")
    if len(parts) == 1:
        return parts[0]
    lses = torch.stack([l.float() for _, l in parts])  # [P, T, nh]
    lse = torch.logsumexp(lses, dim=0)  # [T, nh]
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - finite)  # [P, T, nh]; -inf parts -> 0
    outs = torch.stack([o.float() for o, _ in parts])  # [P, T, nh, d]
    out = (w.unsqueeze(-1) * outs).sum(0)
    return out.to(parts[0][0].dtype), lse
