"""Sequence-parallel prefill: which member of a group computes (and keeps) each token of a prompt.

A long prompt's prefill can run on a group of ``g`` instances at once
(``members[0]`` is the request's home): each computes its *segment* of the
prompt through every layer, and each segment's KV stays in the pool of the
member that computed it, so after prefill the request's KV is already
spread and decode runs at the home with remote MicroAttention. This module
is the pure layout: where every token goes, and what a member's chunk of
its segment attends to. No I/O; the gManager, the runtime and the simulator
share it.

**Zig-zag striped rows, block-aligned.** The prompt is cut into *rows*; a
row is one *stripe* per member, side by side: ``stripe_blocks[i]`` blocks of
member ``i`` (equal stripes give equal segments; a member with less memory
to spare gets a narrower stripe, so a smaller segment and less work).

* Why not equal contiguous cuts: under the causal mask the token at
  position ``p`` attends to ``p + 1`` keys, so the member holding the last
  of ``g`` contiguous cuts does ``2g - 1`` times the attention work of the
  first, and the group waits for it.
* Why rows: a member computes its segment as chunks of its own steps, so
  that it keeps serving its own batch. All members advance through the
  prompt together, a pair of rows per step (a *round*); a row's queries need
  only the KV of earlier rows and of the row's earlier stripes (computed
  earlier in the same round, at the same layer, by the members before it). A whole-prompt zig-zag (ring attention's two chunks
  per member), cut into steps the same way, would make every member but the
  first wait for the members before it to finish their whole chunks.
* Why narrower rows deeper in the prompt (``shrink``): a stripe's queries
  attend to every earlier key, so at a fixed width a round's step grows with
  the position, and the members' own requests wait that long for their next
  token; the policy narrows rows so that every round costs about as much.
* Why zig-zag: the member first in a row has fewer keys before its stripe
  than the member last in it; the member order reverses every row, so over
  each pair of rows every member's attention work is the same (to within
  block's worth, ``tests/test_sp_layout.py``). A last, partial row is cut
  into two half rows of opposite orders (with the last full row, if it would
  be unpaired), so a prompt shorter than a row is balanced too.
* Why block-aligned: a block lives in one pool (its KV stays where it was
  computed), so stripes start on block boundaries. The last rows are split
  evenly in blocks, and the home's stripe comes last: the prompt's
  last (possibly partial) block is the home's, so decode appends where the
  prompt ended, at home (local-first), with no write to a remote block.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from infinite.kv.rmanager import blocks_for

__all__ = ["Stripe", "ChunkWork", "SegmentLayout", "striped_layout"]


@dataclass(frozen=True)
class Stripe:
    """Positions ``[start, end)`` of the prompt, computed and kept by member ``member`` (an index
    into the layout's members); ``offset`` is where they begin in that member's segment."""

    member: int
    start: int
    end: int
    offset: int
    row: int
    round: int  # rows come in zig-zag pairs, and a pair is one round: every member's work in it is even


@dataclass(frozen=True)
class ChunkWork:
    """What a chunk of one member's segment attends to, per member index (the chunk's own member
    included): ``pairs[j]`` (query, key) pairs against keys member ``j`` holds, ``keys[j]`` the
    keys on member ``j`` that its last query sees (the KV read there)."""

    queries: int
    pairs: tuple[float, ...]
    keys: tuple[int, ...]

    @property
    def total_pairs(self) -> float:
        return sum(self.pairs)


@dataclass(frozen=True)
class SegmentLayout:
    prompt_len: int
    block_size: int
    members: tuple[int, ...]  # instance ranks; members[0] is the request's home
    stripe_blocks: tuple[int, ...]  # per member: blocks of its stripe in a full row
    stripes: tuple[Stripe, ...]  # in position order
    _starts: list[int] = field(init=False, repr=False, compare=False)
    _row_first: list[int] = field(init=False, repr=False, compare=False)  # first stripe of each row
    _row_before: list[tuple[int, ...]] = field(init=False, repr=False, compare=False)  # per member, before each row
    _mine: list[list[int]] = field(init=False, repr=False, compare=False)  # per member: its stripe indices
    _mine_off: list[list[int]] = field(init=False, repr=False, compare=False)  # per member: their segment offsets
    _by_round: list[dict[int, list[int]]] = field(init=False, repr=False, compare=False)  # per member: round -> stripes
    _blocks: list[int] = field(init=False, repr=False, compare=False)  # per member: blocks it keeps
    _round_first: list[int] = field(init=False, repr=False, compare=False)  # first stripe of each round

    def __post_init__(self) -> None:
        g = len(self.members)
        acc = [0] * g
        row_first: list[int] = []
        row_before: list[tuple[int, ...]] = []
        mine: list[list[int]] = [[] for _ in range(g)]
        by_round: list[dict[int, list[int]]] = [{} for _ in range(g)]
        blocks = [0] * g
        round_first: list[int] = []
        for i, s in enumerate(self.stripes):
            while len(round_first) <= s.round:
                round_first.append(i)
            while len(row_first) <= s.row:
                row_first.append(i)
                row_before.append(tuple(acc))
            acc[s.member] += s.end - s.start
            mine[s.member].append(i)
            by_round[s.member].setdefault(s.round, []).append(i)
            blocks[s.member] += blocks_for(s.end - s.start, self.block_size)
        row_before.append(tuple(acc))
        object.__setattr__(self, "_starts", [s.start for s in self.stripes])
        object.__setattr__(self, "_row_first", row_first)
        object.__setattr__(self, "_row_before", row_before)
        object.__setattr__(self, "_mine", mine)
        object.__setattr__(self, "_mine_off", [[self.stripes[i].offset for i in ix] for ix in mine])
        object.__setattr__(self, "_by_round", by_round)
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "_round_first", round_first + [len(self.stripes)])

    def _before(self, s: int) -> list[int]:
        """Tokens per member before stripe ``s``."""
        st = self.stripes[s]
        out = list(self._row_before[st.row])
        for x in range(self._row_first[st.row], s):
            o = self.stripes[x]
            out[o.member] += o.end - o.start
        return out

    # ---- shape ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def rows(self) -> int:
        return self.stripes[-1].row + 1 if self.stripes else 0

    @property
    def rounds(self) -> int:
        return self.stripes[-1].round + 1 if self.stripes else 0

    def segment_len(self, i: int) -> int:
        """Prompt tokens member ``i`` computes."""
        return self._row_before[-1][i]

    def segment_blocks(self, i: int) -> int:
        """Blocks member ``i`` keeps (its stripes are block-aligned; only the last may be partial)."""
        return self._blocks[i]

    def runs(self) -> list[tuple[int, int]]:
        """The request's block table as (instance rank, blocks) runs, oldest first."""
        out: list[list[int]] = []
        for s in self.stripes:
            rank, n = self.members[s.member], blocks_for(s.end - s.start, self.block_size)
            if out and out[-1][0] == rank:
                out[-1][1] += n
            else:
                out.append([rank, n])
        return [(r, n) for r, n in out]

    def round_chunk(self, i: int, k: int) -> tuple[int, int]:
        """Segment offsets ``[start, end)`` of member ``i``'s stripes in round ``k`` (consecutive in
        its segment; empty if it has none)."""
        xs = self._by_round[i].get(k)
        if not xs:
            return 0, 0
        first, last = self.stripes[xs[0]], self.stripes[xs[-1]]
        return first.offset, last.offset + last.end - last.start

    def round_stripes(self, k: int) -> range:
        """Indices of round ``k``'s stripes, in position order."""
        return range(self._round_first[k], self._round_first[k + 1])

    def round_before(self, k: int) -> tuple[int, ...]:
        """Tokens each member holds before round ``k``."""
        return self._row_before[self.stripes[self._round_first[k]].row]

    # ---- attention accounting ------------------------------------------------------------------
    def keys_before(self, pos: int) -> tuple[int, ...]:
        """Prompt positions below ``pos`` held by each member."""
        s = bisect.bisect_right(self._starts, pos) - 1
        if s < 0:
            return (0,) * self.size
        st = self.stripes[s]
        row = self._before(s)
        row[st.member] += min(pos, st.end) - st.start
        return tuple(row)

    def chunk(self, i: int, start: int, end: int) -> ChunkWork:
        """Queries ``[start, end)`` of member ``i``'s segment: the (query, key) pairs they make with
        the keys each member holds (causal: a query sees every earlier position and itself)."""
        if not 0 <= start <= end <= self.segment_len(i):
            raise ValueError(f"chunk [{start}, {end}) outside member {i}'s segment of {self.segment_len(i)} tokens")
        g = self.size
        pairs = [0.0] * g
        keys = [0] * g
        if start == end:
            return ChunkWork(0, tuple(pairs), tuple(keys))
        offs, ix = self._mine_off[i], self._mine[i]
        k = bisect.bisect_right(offs, start) - 1
        last = 0
        while k < len(ix) and offs[k] < end:
            s = self.stripes[ix[k]]
            a = max(start, offs[k]) - offs[k] + s.start  # absolute positions [a, b) of this piece
            b = min(end, offs[k] + s.end - s.start) - offs[k] + s.start
            n = b - a
            before = self._before(ix[k])
            for j in range(g):
                pairs[j] += n * before[j]
            pairs[i] += n * (a - s.start) + n * (n + 1) / 2  # own earlier tokens of the stripe, then causal
            last = b
            k += 1
        keys = list(self.keys_before(last))
        return ChunkWork(end - start, tuple(pairs), tuple(keys))


def striped_layout(prompt_len: int, members: tuple[int, ...] | list[int], block_size: int,
                   stripe_blocks: int | Sequence[int], shrink: Callable[[int], float] | None = None) -> SegmentLayout:
    """The zig-zag striped layout of a prompt over ``members`` (``members[0]`` the home), with
    ``stripe_blocks`` blocks per member and row (one count for all, or one per member); see the
    module docstring. ``shrink(position)``: the share of those widths a pair of rows starting at
    that prompt position takes (rows deep in a long prompt attend to many keys: narrower stripes
    keep a round's step as long as an early one). Every member gets at least one block."""
    members = tuple(members)
    g = len(members)
    if g < 1 or len(set(members)) != g:
        raise ValueError(f"a group needs distinct members, got {members}")
    widths = (stripe_blocks,) * g if isinstance(stripe_blocks, int) else tuple(stripe_blocks)
    if len(widths) != g:
        raise ValueError(f"{len(widths)} stripe widths for {g} members")
    if prompt_len < 1 or block_size < 1 or min(widths) < 1:
        raise ValueError(f"prompt_len, block_size and stripe_blocks must be >= 1, got {prompt_len}, {block_size}, "
                         f"{stripe_blocks}")
    nb = blocks_for(prompt_len, block_size)
    if nb < g:
        raise ValueError(f"a {prompt_len}-token prompt has {nb} blocks: too few for {g} members")
    sizes: list[list[int]] = []  # blocks per member index, row by row: zig-zag pairs of equal rows
    done = 0
    while True:
        f = 1.0 if shrink is None else min(1.0, max(0.0, shrink(done * block_size)))
        row = [max(1, int(w * f)) for w in widths]
        if nb - done < 2 * sum(row):
            break
        sizes += [row, list(row)]
        done += 2 * sum(row)
    # What is left (less than a pair of rows) is cut in two half rows, a zig-zag pair of their own,
    # when each can give every member a block: one split would be contiguous cuts.
    rem = nb - done
    halves = [rem // 2, rem - rem // 2] if rem >= 2 * g else ([rem] if rem else [])
    for h in halves:
        sizes.append(_split(h, widths))
    if sizes[-1][0] == 0:  # the home ends the prompt: decode appends at home
        k = max(range(g), key=lambda m: sizes[-1][m])
        sizes[-1][k] -= 1
        sizes[-1][0] += 1
    if any(sum(row[m] for row in sizes) == 0 for m in range(g)):
        raise ValueError(f"a {prompt_len}-token prompt leaves a member of {members} (stripes {widths}) no block")
    rows: list[list[tuple[int, int]]] = []  # (member index, blocks) in the row's order
    n = len(sizes)
    for r, row in enumerate(sizes):  # orders alternate, the last row reversed so that the home ends it
        order = list(range(g - 1, -1, -1)) if (n - 1 - r) % 2 == 0 else list(range(g))
        rows.append([(m, row[m]) for m in order])
    stripes, pos, offs = [], 0, [0] * g
    for r, row in enumerate(rows):
        for m, nblk in row:
            if nblk == 0:
                continue
            end = min(prompt_len, pos + nblk * block_size)
            stripes.append(Stripe(m, pos, end, offs[m], r, r // 2))
            offs[m] += end - pos
            pos = end
    return SegmentLayout(prompt_len, block_size, members, widths, tuple(stripes))


def _split(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` blocks in proportion to ``weights`` (largest remainders; ties to the later members,
    which come last in the final row)."""
    w = sum(weights)
    exact = [total * x / w for x in weights]
    out = [int(e) for e in exact]
    for m in sorted(range(len(weights)), key=lambda m: (out[m] - exact[m], -m))[: total - sum(out)]:
        out[m] += 1
    return out
