"""Sequence-parallel prefill, one member's view: which tokens of its segment a round computes,
where their K/V go in its pool, and what its blocks hold for a query of another member.

Pure: from a ``SegmentLayout`` (``sp_layout``) and the member's block ids, no tensors but the
metadata built at the edge (``rows_meta``). The runtime's member (``sp_member``) and its tests
use it; the layout is the one the gManager chose, carried as ``messages.GroupLayout``.

The group computes positions ``[0, prompt_len - 1)``: the prompt's last token is computed by
the home's own engine once the request is in its scheduler (its block is the home's:
``sp_layout`` puts the home's stripe last), so the first output token is sampled, and its
logprobs taken, by the same code as any request's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from infinite.attention import MAMetadata
from infinite.cluster import messages as M
from infinite.cluster.sp_layout import SegmentLayout, Stripe
from infinite.kv.rmanager import blocks_for

__all__ = ["MemberBlocks", "RoundChunk", "layout_message", "layout_from_message", "rows_meta", "check_group"]


def check_group(layout: SegmentLayout, prompt_len: int, block_size: int, serving) -> None:
    """ValueError unless ``layout`` lays out this prompt over serving instances, in this block size."""
    if layout.prompt_len != prompt_len or layout.block_size != block_size:
        raise ValueError(f"the prefill group's layout is for {layout.prompt_len} tokens in blocks of "
                         f"{layout.block_size}; the prompt has {prompt_len} tokens, the blocks hold {block_size}")
    if layout.size < 2 or not set(layout.members) <= set(serving):
        raise ValueError(f"a prefill group needs 2 or more serving instances, got {list(layout.members)} "
                         f"(serving: {sorted(serving)})")


def layout_message(layout: SegmentLayout) -> M.GroupLayout:
    return M.GroupLayout(layout.prompt_len, layout.block_size, list(layout.members), list(layout.stripe_blocks),
                         [[s.member, s.start, s.end, s.offset, s.row, s.round] for s in layout.stripes])


def layout_from_message(msg: M.GroupLayout) -> SegmentLayout:
    return SegmentLayout(msg.prompt_len, msg.block_size, tuple(msg.members), tuple(msg.stripe_blocks),
                         tuple(Stripe(*s) for s in msg.stripes))


@dataclass(frozen=True)
class RoundChunk:
    """A member's stripes of one round, clipped to the group's positions: one row per stripe."""

    q_starts: tuple[int, ...]  # first position of each row
    q_lens: tuple[int, ...]
    slots: tuple[int, ...]  # [T] the pool slot of each position, rows concatenated
    seg_end: int  # segment offset after the chunk: the member's written count once it is done

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    def positions(self) -> list[int]:
        return [p for a, n in zip(self.q_starts, self.q_lens) for p in range(a, a + n)]


@dataclass(frozen=True)
class MemberBlocks:
    """Member ``index`` of a layout with its blocks (ids in its pool, in its segment's order)."""

    layout: SegmentLayout
    index: int
    blocks: tuple[int, ...]
    logical: tuple[int, ...] = field(init=False)  # each block's index in the request

    def __post_init__(self) -> None:
        bs, i = self.layout.block_size, self.index
        logical = [s.start // bs + b for s in self.layout.stripes if s.member == i
                   for b in range(blocks_for(s.end - s.start, bs))]
        if len(logical) != len(self.blocks):
            raise ValueError(f"member {i} keeps {len(logical)} blocks of the layout, got {len(self.blocks)} block ids")
        object.__setattr__(self, "logical", tuple(logical))

    @property
    def limit(self) -> int:
        """Positions the group computes: all but the prompt's last."""
        return self.layout.prompt_len - 1

    def chunk(self, k: int) -> RoundChunk:
        """Round ``k``'s chunk of this member (empty when it has no stripe there)."""
        lay, bs = self.layout, self.layout.block_size
        starts, lens, slots = [], [], []
        seg_end = 0
        for x in lay.round_stripes(k):
            s = lay.stripes[x]
            if s.member != self.index:
                continue
            end = min(s.end, self.limit)
            seg_end = s.offset + (end - s.start)
            if end <= s.start:
                continue
            starts.append(s.start)
            lens.append(end - s.start)
            for p in range(s.start, end):
                o = s.offset + p - s.start  # stripes start on block boundaries: offset // bs is the block
                slots.append(self.blocks[o // bs] * bs + p % bs)
        return RoundChunk(tuple(starts), tuple(lens), tuple(slots), seg_end if starts else 0)

    def needed(self, holder: int, max_pos: int) -> int:
        """Tokens of ``holder``'s segment a query at ``max_pos`` (and those before it) reads: the
        holder's written count it must wait for."""
        return self.layout.keys_before(max_pos)[holder]

    def rows_meta(self, q_starts: list[int] | tuple[int, ...], q_lens: list[int] | tuple[int, ...],
                  device: torch.device | str = "cpu") -> MAMetadata:
        """This member's blocks for query rows at ``q_starts`` (its own or another member's): per
        row, the blocks that begin at or before the row's last query (later ones are not needed
        and may not be written yet); the causal rule masks the rest."""
        return rows_meta(self.blocks, self.logical, self.layout.block_size, q_starts, q_lens, device)


def rows_meta(blocks: tuple[int, ...], logical: tuple[int, ...], block_size: int,
              q_starts: list[int] | tuple[int, ...], q_lens: list[int] | tuple[int, ...],
              device: torch.device | str = "cpu") -> MAMetadata:
    tables, idx = [], []
    for a, n in zip(q_starts, q_lens):
        upto = bisect.bisect_right(logical, (a + n - 1) // block_size)
        tables.append(list(blocks[:upto]))
        idx.append(list(logical[:upto]))
    return MAMetadata.build(list(q_lens), list(q_starts), tables, idx, device)
