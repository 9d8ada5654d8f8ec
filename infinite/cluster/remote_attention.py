"""Which parts of a step's attention run where: the per-creditor MicroAttention calls.

Pure functions over block tables: for every creditor holding blocks of some
requests in a (micro-)batch, one RemotePart names the query rows it needs,
its own block ids with their logical positions, and the new tokens whose K/V
land in its blocks (a remote tail block). Only queries and partial outputs
cross the wire, never KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinite.attention import MAMetadata, aggregate
from infinite.cluster import messages as M
from infinite.kv.rmanager import RBlock, blocks_for


@dataclass
class RemotePart:
    creditor: int
    rows: torch.Tensor  # [Tc] int64: query rows (in the step's q) of requests with blocks there
    meta: M.AttentionMeta  # the creditor's blocks of those requests
    write_rows: torch.Tensor  # [Wc] int64: new tokens whose K/V go into the creditor's blocks
    write_slots: torch.Tensor  # [Wc] int64: their slots in the creditor's pool

    def call(self, key: M.StepKey, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
             ) -> tuple[M.AttentionCall, M.AttentionTensors]:
        """What one layer sends. The block metadata goes with layer 0 only (the creditor keeps it
        under ``key`` for the step's later layers); the new tokens' K/V only when they land there."""
        t = M.AttentionTensors(q.index_select(0, self.rows))
        if self.write_rows.numel():
            t.k, t.v, t.slots = k.index_select(0, self.write_rows), v.index_select(0, self.write_rows), self.write_slots
        return M.AttentionCall(key, layer, self.meta if layer == 0 else None), t

    def to(self, device: torch.device) -> RemotePart:
        return RemotePart(self.creditor, self.rows.to(device), self.meta, self.write_rows.to(device),
                          self.write_slots.to(device))


def meta_of(m: M.AttentionMeta, device: torch.device | str = "cpu") -> MAMetadata:
    return MAMetadata.build(m.q_lens, m.q_starts, m.blocks, m.logical, device=device)


def remote_parts(
    q_lens: list[int],
    q_starts: list[int],
    tables: list[list[RBlock]],
    rank: int,
    block_size: int,
) -> list[RemotePart]:
    """Split a batch's attention by creditor. q_starts[r] is request r's first new position."""
    per: dict[int, dict] = {}
    off = 0
    for n, start, table in zip(q_lens, q_starts, tables):
        end = start + n
        nb = blocks_for(end, block_size)
        here: dict[int, tuple[list[int], list[int]]] = {}
        for i, ref in enumerate(table[:nb]):
            if ref.instance != rank:
                ids, logical = here.setdefault(ref.instance, ([], []))
                ids.append(ref.block)
                logical.append(i)
        for c, (ids, logical) in here.items():
            d = per.setdefault(c, {"rows": [], "q_lens": [], "q_starts": [], "blocks": [], "logical": [],
                                   "wrows": [], "wslots": []})
            d["rows"].extend(range(off, off + n))
            d["q_lens"].append(n)
            d["q_starts"].append(start)
            d["blocks"].append(ids)
            d["logical"].append(logical)
        for j, p in enumerate(range(start, end)):
            ref = table[p // block_size]
            if ref.instance != rank:
                d = per[ref.instance]
                d["wrows"].append(off + j)
                d["wslots"].append(ref.block * block_size + p % block_size)
        off += n
    parts = []
    for c in sorted(per):
        d = per[c]
        parts.append(RemotePart(
            creditor=c,
            rows=torch.tensor(d["rows"], dtype=torch.int64),
            meta=M.AttentionMeta(d["q_lens"], d["q_starts"], d["blocks"], d["logical"]),
            write_rows=torch.tensor(d["wrows"], dtype=torch.int64),
            write_slots=torch.tensor(d["wslots"], dtype=torch.int64),
        ))
    return parts


def merge_parts(
    local: tuple[torch.Tensor, torch.Tensor],  # (out [T,nh,d], lse [T,nh])
    parts: list[RemotePart],
    results: list[tuple[torch.Tensor, torch.Tensor]],  # per part: (out [Tc,nh,d], lse [Tc,nh])
) -> torch.Tensor:
    """AggregationAttention over the local part and every creditor's part -> out [T,nh,d]."""
    out0, lse0 = local
    partials = [local]
    for part, (o, l) in zip(parts, results):
        fo = torch.zeros_like(out0)
        fl = torch.full_like(lse0, float("-inf"))
        fo.index_copy_(0, part.rows, o.to(out0.dtype))
        fl.index_copy_(0, part.rows, l)
        partials.append((fo, fl))
    out, _ = aggregate(partials)
    return out
