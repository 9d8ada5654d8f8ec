"""Which parts of a step's attention run where: the per-creditor MicroAttention calls.

For every creditor holding blocks of some requests in a (micro-)batch, one
RemotePart names the query rows it needs, what it must learn about those
requests' blocks, and the new tokens whose K/V land in its blocks (a remote
tail block). Only queries and partial outputs cross the wire, never KV blocks.

The blocks go as diffs (``RemoteWire``): a creditor keeps the rows it was told
about (cluster/lent_rows.py), and each step tells it, per request, only the
entries it does not hold yet, read from the persistent batch's remote groups
(runtime/input_batch.py), which the rManager's diffs keep. A step then costs
O(rows x creditors + new tokens), however long the contexts.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field

import torch

from infinite.attention import aggregate_into
from infinite.cluster import messages as M
from infinite.kv.rmanager import blocks_for
from infinite.runtime.input_batch import InputBatch


def handle_of(request_id: str) -> int:
    """A request's stable handle on the wire: 63 bits of a hash of its id, the same in every process
    (a creditor finds the rows of a request whose blocks are released by it)."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class RemotePart:
    creditor: int
    rows: torch.Tensor  # [Tc] int64: query rows (in the step's q) of requests with blocks there
    meta: M.AttentionMeta  # those requests' rows on the creditor, as diffs
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


@dataclass
class _Builder:
    """One creditor's part of a micro-batch, as it is filled row by row."""

    rows: list[int] = field(default_factory=list)
    handles: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    bases: list[int] = field(default_factory=list)
    q_lens: list[int] = field(default_factory=list)
    q_starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    logical: list[int] = field(default_factory=list)
    wrows: list[int] = field(default_factory=list)
    wslots: list[int] = field(default_factory=list)

    def part(self, creditor: int) -> RemotePart:
        meta = M.AttentionMeta(self.handles, self.epochs, self.bases, self.q_lens, self.q_starts, self.counts,
                               self.blocks, self.logical)
        a, w = len(self.rows), len(self.wrows)
        flat = torch.tensor(self.rows + self.wrows + self.wslots, dtype=torch.int64)  # one tensor, three views
        return RemotePart(creditor, flat[:a], meta, flat[a:a + w], flat[a + w:])


class RemoteWire:
    """The debtor's side of the diffs: what each creditor was told about its rows.

    The bookkeeping sits on the persistent batch's remote groups (``RemoteGroup.sent*``); a
    generation per creditor voids all of it at once: ``reset`` after a step that failed, when the
    creditor may or may not have applied the step's diffs, so the next step sends whole rows."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.gen: dict[int, int] = {}

    def reset(self, creditors: list[int]) -> None:
        for c in creditors:
            self.gen[c] = self.gen.get(c, 0) + 1

    def parts(self, ib: InputBatch, rows: list[int], q_lens: list[int], q_starts: list[int]) -> list[RemotePart]:
        """Split a micro-batch's attention by creditor. ``rows`` are its InputBatch rows in step order,
        ``q_starts[i]`` row i's first new position. Marks what it describes as sent."""
        bs = ib.block_size
        per: dict[int, _Builder] = {}
        off = 0
        for row, n, start in zip(rows, q_lens, q_starts):
            groups = ib.remote_groups(row) if n else None
            if groups:
                self._row(ib, row, n, start, off, groups, per, bs)
            off += n
        return [per[c].part(c) for c in sorted(per)]

    def _row(self, ib: InputBatch, row: int, n: int, start: int, off: int, groups, per: dict[int, _Builder],
             bs: int) -> None:
        end = start + n
        nb = blocks_for(end, bs)  # blocks the step's queries can see
        handle = handle_of(ib.requests[row].request_id)
        for c, g in groups.items():
            vis = bisect.bisect_left(g.logical, nb)  # the group's entries among them
            if vis == 0:
                continue
            gen = self.gen.get(c, 0)
            base = g.sent if g.sent_gen == gen and g.sent <= vis else 0  # a new epoch is a new group
            b = per.get(c)
            if b is None:
                b = per[c] = _Builder()
            b.rows.extend(range(off, off + n))
            b.handles.append(handle)
            b.epochs.append(g.epoch)
            b.bases.append(base)
            b.q_lens.append(n)
            b.q_starts.append(start)
            b.counts.append(vis - base)
            b.blocks.extend(g.blocks[base:vis])
            b.logical.extend(g.logical[base:vis])
            g.sent, g.sent_gen = vis, gen
        # New tokens whose block is remote: one table lookup per block the step writes.
        table = ib.refs(row)
        p = start
        while p < end:
            i = p // bs
            hi = min(end, (i + 1) * bs)
            ref = table[i]
            if ref.instance != self.rank:
                b = per[ref.instance]  # the block is visible to the step, so its creditor has a part
                b.wrows.extend(range(off + p - start, off + hi - start))
                first = ref.block * bs + p % bs
                b.wslots.extend(range(first, first + hi - p))
            p = hi

    @staticmethod
    def attach_drops(parts: list[RemotePart], dropped: list[tuple[int, str]], ib: InputBatch) -> None:
        """Tell creditors which handles they may forget (the request's group there is gone), on the
        first part of the step that goes to each. A handle whose request has a group there again is
        not dropped (its rows are replaced whole anyway); drops for creditors the step does not call
        are left to the release of the request's blocks there (the creditor forgets the rows then)."""
        first: dict[int, RemotePart] = {}
        for p in parts:
            first.setdefault(p.creditor, p)
        for c, rid in dropped:
            p = first.get(c)
            if p is None:
                continue
            row = ib.row_of.get(rid)
            if row is not None and c in ib.remote_groups(row):
                continue
            p.meta.drop.append(handle_of(rid))


def merge_parts(
    local: tuple[torch.Tensor, torch.Tensor],  # (out [T,nh,d], lse [T,nh]): merged into, in place
    parts: list[RemotePart],
    results: list[tuple[torch.Tensor, torch.Tensor]],  # per part: (out [Tc,nh,d], lse [Tc,nh])
) -> torch.Tensor:
    """AggregationAttention of the local part with every creditor's part -> out [T,nh,d]: each part
    merges into its own rows of the local result, so no full-size tensor is made per creditor."""
    out, lse = local
    for part, (o, l) in zip(parts, results):
        aggregate_into(out, lse, part.rows, o, l)
    return out
