"""Torch reference path of MicroAttention, AggregationAttention and the KV write.

This is the path CPU ranks run, and the reference the Triton kernels are tested
against. Softmax math is done in float32 whatever the storage dtype.

Speed notes (CPU, where this path is the engine's hot loop):

* K/V blocks are gathered with one ``index_select`` per call into
  [R, S, nkv, d] (a buffer reused by every layer of the step) and never
  permuted: ``_scaled_dot_product_flash_attention_for_cpu`` (which returns
  the LSE) reads the [nkv, S, d] views in place, so no second copy is made.
* Everything derived from the metadata alone (flat block ids, the additive
  visibility mask, per-request offsets) is computed once per step and reused
  by every layer (``_plan``), keyed by the metadata tensors' versions.
* Prefill rows run the same flash kernel on query tiles, so the mask and the
  working set stay bounded (``_MASK_ELEMS``) however long the prompt, and
  a tile reads only the keys up to its last query's position.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from infinite.attention.metadata import MAMetadata

# Largest additive-mask tile of a prefill call, in elements (float32: 16 MiB; a 16K-token
# prefill then peaks at about 150 MB of working memory besides its inputs).
_MASK_ELEMS = 1 << 22
_NEG_INF = float("-inf")
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_DEVICES = ("cpu",)  # where ATen's LSE-returning flash kernel runs; elsewhere the math below


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with its log-sum-exp: q [..., Lq, d], k/v [..., S, d], additive mask broadcast to
    [..., Lq, S] -> (out [..., Lq, d], lse [..., Lq]) in float32.

    On CPU, ATen's flash kernel (it returns the LSE and reads strided K/V in place); elsewhere (this
    path on a GPU is the reference the Triton kernels are checked against) the same math spelled
    out. A query that sees no key comes out with lse -inf here and 0 from flash: callers mask it."""
    if q.device.type in _FLASH_DEVICES:
        return _flash_cpu(q, k, v, attn_mask=attn_mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + attn_mask  # [..., Lq, S]
    lse = torch.logsumexp(scores, dim=-1)  # [..., Lq]
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(scores - safe.unsqueeze(-1)), v)
    return out, lse


def write_kv(
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * B + offset
) -> None:
    """Slots < 0 (tokens whose KV lives elsewhere, padding rows) are skipped."""
    nkv, d = k_cache.shape[2], k_cache.shape[3]
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:  # a sync on a GPU: this is the reference path
        keep = (slot_mapping >= 0).nonzero().flatten()
        k, v, slot_mapping = k.index_select(0, keep), v.index_select(0, keep), slot_mapping.index_select(0, keep)
    k_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, nkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


# ---- per-step plan: what every layer would otherwise recompute from the metadata ----------------


@dataclass
class _DecodePlan:
    rows: torch.Tensor | None  # [Rd] int64 rows of meta with one query (None: all rows, in order)
    tok: torch.Tensor | None  # [Rd] int64 their query index in q (None: 0..Rd-1)
    flat: torch.Tensor  # [Rd * M] int64 physical block ids, row-major
    bias: torch.Tensor  # [Rd, 1, M * B] float32: 0 where visible, -inf elsewhere (padding too)
    empty: torch.Tensor  # [Rd] bool: the row sees no key in this pool
    any_empty: bool

    def gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [Rd * M, B, nkv, d] of the rows' blocks, in the cache dtype (views of the workspace)."""
        shape = (self.flat.shape[0], *k_cache.shape[1:])
        kb, vb = _workspace(k_cache.dtype, k_cache.device, shape)
        return (torch.index_select(k_cache, 0, self.flat, out=kb),
                torch.index_select(v_cache, 0, self.flat, out=vb))


# Gather targets reused by every layer and every step: a fresh multi-MB tensor per layer costs page
# faults on top of the copy (about 1.6x the copy's time on CPU), and one per step costs an munmap of
# all of it when the step ends (ms at a few hundred MB). One pair per thread, so concurrent calls
# (cluster executors) never share one; grown geometrically, never shrunk.
_WORKSPACES = threading.local()


def _workspace(dtype: torch.dtype, device: torch.device, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    numel = math.prod(shape)
    spaces = getattr(_WORKSPACES, "by_key", None)
    if spaces is None:
        spaces = _WORKSPACES.by_key = {}
    key = (dtype, device)
    kv = spaces.get(key)
    if kv is None or kv[0].numel() < numel:
        size = max(numel, 2 * kv[0].numel() if kv is not None else 0)
        with torch.inference_mode(False):  # normal tensors: written in and out of inference mode alike
            kv = spaces[key] = (torch.empty(size, dtype=dtype, device=device),
                                torch.empty(size, dtype=dtype, device=device))
    return kv[0][:numel].view(shape), kv[1][:numel].view(shape)


@dataclass
class _PrefillRow:
    start: int  # first query index in q
    end: int
    blocks: torch.Tensor  # [nb] int64 physical ids
    kpos: torch.Tensor  # [nb * B] int64 position of each gathered key
    ascending: bool  # kpos sorted: a query tile then reads only the keys up to its last position


@dataclass
class _Plan:
    key: tuple
    decode: _DecodePlan | None
    prefill: list[_PrefillRow]


def _versions(meta: MAMetadata) -> tuple:
    ts = (meta.cu_q, meta.q_pos, meta.block_tables, meta.block_idx, meta.num_blocks)
    return tuple((id(t), None if t.is_inference() else t._version) for t in ts)


def _decode_plan(
    q_pos: torch.Tensor,  # [Rd]
    block_tables: torch.Tensor,  # [Rd, M]
    block_idx: torch.Tensor,  # [Rd, M]
    num_blocks: torch.Tensor,  # [Rd]
    bsz: int,
    rows: torch.Tensor | None,
    tok: torch.Tensor | None,
) -> _DecodePlan:
    r, m = block_tables.shape
    dev = block_tables.device
    kpos = block_idx.long().unsqueeze(-1) * bsz + torch.arange(bsz, device=dev)  # [Rd, M, B]
    real = torch.arange(m, device=dev).unsqueeze(0) < num_blocks.unsqueeze(1)  # [Rd, M]
    visible = (kpos <= q_pos.view(r, 1, 1)) & real.unsqueeze(-1)  # [Rd, M, B]
    bias = torch.zeros(r, 1, m * bsz, dtype=torch.float32, device=dev)
    bias.masked_fill_(~visible.view(r, 1, m * bsz), _NEG_INF)
    empty = ~visible.view(r, -1).any(-1)  # [Rd]
    return _DecodePlan(rows, tok, block_tables.reshape(-1).long(), bias, empty, bool(empty.any()))


def _plan(meta: MAMetadata, bsz: int) -> _Plan:
    """Derived tensors of ``meta`` for block size ``bsz``, built once and cached on the metadata object."""
    key = (bsz, _versions(meta))
    cached = meta.__dict__.get("_torch_ops_plan")
    if cached is not None and cached.key == key:
        return cached
    if meta.max_q_len <= 1 and meta.q_pos.shape[0] == meta.num_requests:  # one query per row
        plan = _Plan(key, _decode_plan(meta.q_pos, meta.block_tables, meta.block_idx, meta.num_blocks,
                                       bsz, None, None), [])
    else:
        cu = meta.cu_q.tolist()
        q_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        if meta.decode_rows is not None:  # chosen by MAMetadata.build on the host
            rows = meta.decode_rows.long()
        else:
            rows = torch.tensor([i for i, n in enumerate(q_lens) if n == 1], dtype=torch.int64,
                                device=meta.q_pos.device)
        decode = None
        if rows.shape[0]:  # decode requests in a mixed batch go through the batched path
            tok = meta.cu_q.long()[rows]
            decode = _decode_plan(meta.q_pos[tok], meta.block_tables[rows], meta.block_idx[rows],
                                  meta.num_blocks[rows], bsz, rows, tok)
        nbs = meta.num_blocks.tolist()
        offs = torch.arange(bsz, device=meta.q_pos.device)
        prefill = []
        for i, n in enumerate(q_lens):
            if n <= 1:
                continue
            nb = nbs[i]
            kpos = (meta.block_idx[i, :nb].long().unsqueeze(-1) * bsz + offs).reshape(-1)  # [nb * B]
            asc = nb <= 1 or bool((kpos[1:] > kpos[:-1]).all())
            prefill.append(_PrefillRow(cu[i], cu[i + 1], meta.block_tables[i, :nb].long(), kpos, asc))
        plan = _Plan(key, decode, prefill)
    meta.__dict__["_torch_ops_plan"] = plan
    return plan


# ---- the two kernels --------------------------------------------------------------------------------


def _decode_rows(
    q: torch.Tensor,  # [Rd, nh, d], one query per row
    plan: _DecodePlan,
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Rd, nh, d] float32, lse [Rd, nh] float32); -inf / 0 for a row that sees no key.

    The g query heads of a KV group are the g "queries" of one flash-attention
    row, so GQA needs no K/V repeat; K/V are read through strided views of
    the gathered blocks.
    """
    r, nh, d = q.shape
    nkv = k_cache.shape[2]
    s = plan.bias.shape[-1]
    kb, vb = plan.gather(k_cache, v_cache)
    k = kb.view(r, s, nkv, d).float().transpose(1, 2)  # [Rd, nkv, S, d]
    v = vb.view(r, s, nkv, d).float().transpose(1, 2)
    qg = q.float().reshape(r, nkv, nh // nkv, d)  # [Rd, nkv, g, d]
    o, l = _attend(qg, k, v, plan.bias.view(r, 1, 1, s), scale)
    out, lse = o.reshape(r, nh, d), l.reshape(r, nh)
    if plan.any_empty:  # flash reports lse 0 for a row that sees no key
        lse = lse.masked_fill(plan.empty.unsqueeze(1), _NEG_INF)
        out = out.masked_fill(plan.empty.view(r, 1, 1), 0.0)
    return out, lse


def _prefill_row(
    q: torch.Tensor,  # [n, nh, d]
    q_pos: torch.Tensor,  # [n]
    row: _PrefillRow,
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention over the request's gathered blocks, tiled over queries to bound the mask."""
    n, nh, d = q.shape
    nkv = k_cache.shape[2]
    g = nh // nkv
    s = row.kpos.shape[0]
    if s == 0:  # none of this request's blocks are in this pool
        return (torch.zeros(n, nh, d, dtype=torch.float32, device=q.device),
                torch.full((n, nh), _NEG_INF, dtype=torch.float32, device=q.device))
    k = k_cache.index_select(0, row.blocks).view(1, s, nkv, d).float().permute(0, 2, 1, 3)  # [1, nkv, S, d]
    v = v_cache.index_select(0, row.blocks).view(1, s, nkv, d).float().permute(0, 2, 1, 3)
    k, v = k.expand(g, nkv, s, d), v.expand(g, nkv, s, d)  # the g query heads of a group share K/V
    qg = q.float().view(n, nkv, g, d).permute(2, 1, 0, 3)  # [g, nkv, n, d]
    out = torch.empty(n, nkv, g, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(n, nkv, g, dtype=torch.float32, device=q.device)
    tile = max(1, min(n, _MASK_ELEMS // max(s, 1)))
    for a in range(0, n, tile):
        b = min(n, a + tile)
        qp = q_pos[a:b]
        ks = s
        if row.ascending:  # causal prefill: keys past the tile's last query are masked anyway, skip them
            ks = int(torch.searchsorted(row.kpos, qp.max(), right=True))
        if ks == 0:
            out[a:b] = 0.0
            lse[a:b] = _NEG_INF
            continue
        visible = row.kpos[:ks].unsqueeze(0) <= qp.unsqueeze(1)  # [c, ks]
        bias = torch.zeros(b - a, ks, dtype=torch.float32, device=q.device).masked_fill_(~visible, _NEG_INF)
        o, l = _attend(qg[:, :, a:b], k[:, :, :ks], v[:, :, :ks], bias.view(1, 1, b - a, ks), scale)
        out[a:b] = o.permute(2, 1, 0, 3)  # [c, nkv, g, d]
        lse[a:b] = l.permute(2, 1, 0)
        empty = ~visible.any(-1)  # flash reports lse 0 for a query that sees no key
        if bool(empty.any()):
            out[a:b][empty] = 0.0
            lse[a:b][empty] = _NEG_INF
    return out.view(n, nh, d), lse.view(n, nh)


def micro_attention(
    q: torch.Tensor,  # [T, nh, d]
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    meta: MAMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries over the blocks in ``meta``: (out [T,nh,d] in q.dtype, lse [T,nh] f32)."""
    t, nh, d = q.shape
    plan = _plan(meta, k_cache.shape[1])
    dec = plan.decode
    if dec is not None and dec.rows is None:  # pure decode batch
        out, lse = _decode_rows(q, dec, k_cache, v_cache, scale)
        return out.to(q.dtype), lse
    out = torch.empty(t, nh, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(t, nh, dtype=torch.float32, device=q.device)
    if dec is not None:
        o, l = _decode_rows(q[dec.tok], dec, k_cache, v_cache, scale)
        out[dec.tok] = o
        lse[dec.tok] = l
    for row in plan.prefill:
        s, e = row.start, row.end
        o, l = _prefill_row(q[s:e], meta.q_pos[s:e], row, k_cache, v_cache, scale)
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


def aggregate_into(
    out: torch.Tensor,  # [T, nh, d]: merged into, in place
    lse: torch.Tensor,  # [T, nh] float32: merged into, in place
    rows: torch.Tensor,  # [Tc] int64: the rows the other part covers
    part_out: torch.Tensor,  # [Tc, nh, d]
    part_lse: torch.Tensor,  # [Tc, nh]
) -> None:
    """AggregationAttention of a partial result that covers only some rows into another, in place:
    the formula of ``aggregate`` on those rows alone (a creditor's part of a step covers only the
    requests with blocks there), in float32. Plain tensor ops: the same on every device."""
    l0 = lse.index_select(0, rows)  # [Tc, nh]
    l1 = part_lse.float()
    m = torch.maximum(l0, l1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both parts empty: weights 0, not NaN
    w0, w1 = torch.exp(l0 - m), torch.exp(l1 - m)
    s = w0 + w1
    merged = (out.index_select(0, rows).float() * w0.unsqueeze(-1) + part_out.float() * w1.unsqueeze(-1)) \
        / s.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    out.index_copy_(0, rows, merged.to(out.dtype))
    lse.index_copy_(0, rows, m + torch.log(s))
