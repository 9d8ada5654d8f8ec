"""Where cached prefixes are, and where a request should go because of them. Pure, no I/O.

Each instance's heartbeat carries the *anchors* its prefix cache gained and lost
(``infinite.kv.prefix``: 64-bit keys of the names of blocks at chain depths 1, 2,
4, then every 8 blocks), never block lists. ``PrefixIndex`` keeps them per
instance; for a prompt's anchor chain it tells how deep a prefix each instance
holds, to within a stride (a holder that evicted some blocks since its last beat
holds less: the hint is confirmed with the full block names at the holder).

``choose_home`` is the router's cache-aware rule, after SGLang's router: a
request goes where its prefix is deepest, unless that instance is *busy*: its
free memory (after its queue) cannot hold the part of the request it has not
cached, or its load is over the least loaded instance's by both an absolute and
a relative margin; then the request goes where the load-only router sends it
and carries a hint naming the holder, whose cached blocks its new home uses in
place (lent by reference, served by remote MicroAttention) instead of
recomputing them. ``copy_pays`` says
when the home should copy such a prefix into its own pool instead (a short prefix
read by a long generation).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from infinite.kv.prefix import deepest_held

__all__ = ["PrefixIndex", "PrefixRouting", "Routed", "choose_home", "copy_pays"]


class PrefixIndex:
    """Anchor key -> instances whose prefix cache holds it (as of their last heartbeat)."""

    def __init__(self) -> None:
        self.holders: dict[int, set[int]] = {}
        self._by_rank: dict[int, set[int]] = {}

    def apply(self, rank: int, added: Iterable[int], removed: Iterable[int], everything: bool = False) -> None:
        """One heartbeat's diff; ``everything``: ``added`` is all the rank holds (a lost beat)."""
        if everything:
            self.drop(rank)
        mine = self._by_rank.setdefault(rank, set())
        for key in removed:
            if key in mine:
                mine.discard(key)
                ranks = self.holders[key]
                ranks.discard(rank)
                if not ranks:
                    del self.holders[key]
        for key in added:
            if key not in mine:
                mine.add(key)
                self.holders.setdefault(key, set()).add(rank)

    def drop(self, rank: int) -> None:
        """The rank is gone (or resends everything): forget what it held."""
        for key in self._by_rank.pop(rank, ()):
            ranks = self.holders.get(key)
            if ranks is not None:
                ranks.discard(rank)
                if not ranks:
                    del self.holders[key]

    def num_anchors(self, rank: int) -> int:
        return len(self._by_rank.get(rank, ()))

    def depths(self, chain: Sequence[tuple[int, int]], ranks: Iterable[int]) -> dict[int, int]:
        """Blocks of the chain's prefix each of ``ranks`` holds (0: none): O(chain + ranks)."""
        return {r: deepest_held(chain, self._by_rank.get(r, frozenset())) for r in ranks}


@dataclass(frozen=True)
class PrefixRouting:
    """The router's knobs. A holder is busy when its load (requests running, waiting, and routed
    since its last beat) is over the least loaded instance's by more than ``busy_margin`` AND over
    ``busy_ratio`` times it: a cached prefix saves one prefill, a queue delays every request."""

    busy_margin: float = 4.0
    busy_ratio: float = 2.0
    min_blocks: int = 1  # a shallower prefix does not steer routing

    def __post_init__(self) -> None:
        if self.busy_margin < 0 or self.busy_ratio < 1 or self.min_blocks < 1:
            raise ValueError(f"PrefixRouting: need busy_margin >= 0, busy_ratio >= 1, min_blocks >= 1; got {self}")


@dataclass(frozen=True)
class Routed:
    """A request's home, and when the deepest cached prefix is elsewhere, where it is."""

    home: int
    holder: int = -1
    holder_blocks: int = 0


def choose_home(default: int, loads: Mapping[int, float], depths: Mapping[int, int],
                cfg: PrefixRouting = PrefixRouting(), room: Mapping[int, int] | None = None,
                need: int = 0) -> Routed:
    """``default``: the home the load-only router picks; ``loads``: the instances that can hold the
    request; ``depths``: blocks of its prefix each holds; ``room``: each one's free blocks after its
    queue, and ``need``: the request's blocks (None / 0: memory not weighed). The deepest holder
    (least loaded among equals) unless it is busy; then ``default`` (the least loaded instance when
    that is the busy holder), with a hint when the holder has more of the prefix."""
    if default not in loads:
        raise ValueError(f"the default home {default} is not among the candidates {sorted(loads)}")
    held = [r for r in loads if depths.get(r, 0) >= cfg.min_blocks]
    if not held:
        return Routed(default)
    best = max(held, key=lambda r: (depths[r], -loads[r], r == default, -r))
    low = min(loads.values())
    crowded = loads[best] - low > cfg.busy_margin and loads[best] > cfg.busy_ratio * low
    full = room is not None and room.get(best, 0) < need - depths[best]
    if not (crowded or full):
        return Routed(best)
    others = [r for r in loads if r != best]
    if not others:
        return Routed(best)
    home = default if default != best else min(others, key=lambda r: (loads[r], r))
    if depths[best] > depths.get(home, 0):
        return Routed(home, best, depths[best])
    return Routed(home)


def copy_pays(blocks: int, steps: int, num_layers: int, call_s: float, copy_s_per_block: float) -> bool:
    """Whether a home should copy a prefix lent to it in place into its own pool: in place, each of
    the request's ``steps`` steps pays one more remote MicroAttention call per layer (``call_s``:
    the exposed wait of one, measured); a copy pays ``copy_s_per_block`` per block once (measured
    from this instance's migrations). Either unmeasured (0): stay in place, the design's default
    (no regret: a copy whose cost is unknown may cost more than it saves)."""
    if blocks <= 0 or steps <= 0 or call_s <= 0 or copy_s_per_block <= 0:
        return False
    return steps * num_layers * call_s > blocks * copy_s_per_block
