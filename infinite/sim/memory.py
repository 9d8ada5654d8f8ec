"""Block accounting of a simulated cluster.

Counts only, no block ids: each instance has a pool (total, free, lent,
borrowed, its own demand) and each request a ``Layout``. Who may lend how
much is only ever asked of the policy (``lendable``), per instance, and
cached here so that a borrow in a 1024-instance cluster looks at a handful
of creditors instead of all of them (the candidates passed to
``borrow_plan`` are exactly those it could pick, so its answer is the same).
Migrations hold memory on both ends while they run.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

from infinite.cluster.policy import LendingPolicy, Peer
from infinite.sim.layout import Layout

__all__ = ["Pool", "ClusterMemory"]


@dataclass
class Pool:
    rank: int
    total: int
    free: int
    lent: int = 0  # blocks of other instances' requests held here
    borrowed: int = 0  # blocks of this instance's requests held elsewhere
    demand: int = 0  # blocks its queued requests need (the planner's waiting_blocks, routing's key)
    own: int = 0  # free blocks it keeps for itself: its queue and its running requests' growth

    @property
    def used(self) -> int:
        return self.total - self.free


class ClusterMemory:
    """Pools, layouts, and each instance's lendable blocks (the policy's answer) kept current."""

    def __init__(self, totals: list[int], block_size: int, policy: LendingPolicy,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.block_size = block_size
        self.policy = policy
        self.pools = [Pool(r, t, t) for r, t in enumerate(totals)]
        self.layouts: dict[str, Layout] = {}
        self._lendable = [0] * len(totals)
        self._order: list[tuple[int, int]] = []  # (-lendable, rank) of instances that may lend now
        self.total_lendable = 0
        self.on_change = on_change  # called with a rank whose lendable rose (the engine's watchers)
        self.dirty: set[int] = set()  # instances whose pool or demand changed (the engine's routing index)
        self.borrowed_blocks = 0  # on-demand borrows, for the report
        self.borrows = 0
        self.group_blocks = 0  # blocks prefill groups' members kept for the requests they prefilled
        self.released_to: set[int] = set()  # instances that got blocks back since the engine last looked
        self.moving: dict[int, tuple[int, int, int, int]] = {}  # move id -> (src, dst, home, blocks held at dst)
        self._move_ids = 0
        for r in range(len(totals)):
            self.refresh(r)

    # ---- the policy's view of one instance --------------------------------------------------------
    def peer(self, rank: int) -> Peer:
        """The instance as the gManager's on-demand borrowing sees it: ``reserved`` is its own
        demand (``LendingPolicy.own_demand``, as of its last scheduling point: its heartbeat)."""
        p = self.pools[rank]
        return Peer(rank, p.total, p.free, p.lent, p.borrowed, reserved=p.own)

    def refresh(self, rank: int) -> None:
        """Recompute what ``rank`` may lend after its pool or its demand changed."""
        self.dirty.add(rank)
        new = self.policy.lendable(self.peer(rank)) if self.policy.enabled else 0
        old = self._lendable[rank]
        if new == old:
            return
        if old > 0:
            del self._order[bisect.bisect_left(self._order, (-old, rank))]
        if new > 0:
            bisect.insort(self._order, (-new, rank))
        self._lendable[rank] = new
        self.total_lendable += new - old
        if self.on_change is not None and new > old:
            self.on_change(rank)

    def lendable(self, rank: int) -> int:
        return self._lendable[rank]

    def borrowable(self, rank: int) -> int:
        """Blocks the rest of the cluster may lend ``rank`` now (0 when it is a creditor)."""
        if not self.policy.may_borrow(self.pools[rank].lent):
            return 0
        return self.total_lendable - self._lendable[rank]

    def candidates(self, debtor: int, n: int, held: dict[int, int]) -> list[Peer]:
        """The peers ``borrow_plan`` could take ``n`` blocks from: creditors already holding the
        request, then the most lendable until they cover ``n`` (its order; the rest it never reaches)."""
        out = [self.peer(r) for r in held if r != debtor and self._lendable[r] > 0]
        got = sum(self._lendable[p.rank] for p in out)
        for neg, r in self._order:
            if got >= n:
                break
            if r == debtor or r in held:
                continue
            out.append(self.peer(r))
            got -= neg
        return out

    # ---- blocks of one request ---------------------------------------------------------------------
    def layout(self, rid: str, home: int) -> Layout:
        lay = self.layouts.get(rid)
        if lay is None:
            lay = self.layouts[rid] = Layout(home)
        return lay

    def take_local(self, rid: str, home: int, n: int) -> None:
        p = self.pools[home]
        if n > p.free:
            raise MemoryError(f"instance {home}: {n} blocks wanted, {p.free} free")
        p.free -= n
        self.layout(rid, home).append(home, n)
        self.refresh(home)

    def free_tail(self, rid: str, home: int, n: int) -> None:
        """Undo take_local (a growth that failed to borrow the rest)."""
        lay = self.layouts[rid]
        if n <= 0:
            return
        if not lay.runs or lay.runs[-1][0] != home or lay.runs[-1][1] < n:
            raise RuntimeError("free_tail only undoes the newest local blocks")
        lay.runs[-1][1] -= n
        if not lay.runs[-1][1]:
            lay.runs.pop()
        lay.held[home] -= n
        self.pools[home].free += n
        if not lay.total:
            del self.layouts[rid]
        self.refresh(home)

    def reserve(self, rank: int, n: int) -> None:
        """Set aside ``n`` free blocks for growth an instance has already decided on (a predicted run)."""
        p = self.pools[rank]
        if n > p.free:
            raise MemoryError(f"instance {rank}: {n} blocks to reserve, {p.free} free")
        p.free -= n
        self.refresh(rank)

    def unreserve(self, rank: int, n: int) -> None:
        self.pools[rank].free += n
        self.refresh(rank)

    def assign_reserved(self, rid: str, home: int, n: int) -> None:
        """Hand ``n`` reserved home blocks to a request (the pool already counts them used)."""
        self.layout(rid, home).append(home, n)

    def borrow(self, rid: str, home: int, plan: list[tuple[int, int]], at: int | None = None) -> None:
        """Blocks reserved on creditors join the request's table at block position ``at`` (None:
        after its newest), as the runtime's append_remote."""
        lay = self.layout(rid, home)
        for c, n in plan:
            self._lend(c, home, n)
            lay.insert(at, c, n)
            if at is not None:
                at += n
            self.borrowed_blocks += n
        self.borrows += 1
        self.refresh(home)

    def place(self, rid: str, home: int, runs: list[tuple[int, int]]) -> None:
        """A prefill group's layout: the request's blocks, oldest first, on the members that compute
        them (``sp_layout.SegmentLayout.runs``); the members' blocks are lent to the home."""
        if rid in self.layouts:
            raise RuntimeError(f"request {rid} already holds blocks")
        lay = self.layout(rid, home)
        for inst, n in runs:
            if inst == home:
                p = self.pools[home]
                if n > p.free:
                    raise MemoryError(f"instance {home}: {n} blocks wanted, {p.free} free")
                p.free -= n
            else:
                self._lend(inst, home, n)
                self.group_blocks += n
            lay.append(inst, n)
        self.refresh(home)

    def push_out(self, rid: str, home: int, plan: list[tuple[int, int]]) -> None:
        """Local-first growth: the request's oldest home blocks move to blocks reserved on the
        creditors (copied at once), freeing home blocks for its tail."""
        lay = self.layouts[rid]
        for c, n in plan:
            self._lend(c, home, n)
            lay.move_oldest(n, home, c)
            self.pools[home].free += n
            self.borrowed_blocks += n
        self.borrows += 1
        self.refresh(home)

    def _lend(self, creditor: int, debtor: int, n: int) -> None:
        cp = self.pools[creditor]
        if n > cp.free:
            raise MemoryError(f"creditor {creditor}: {n} blocks wanted, {cp.free} free")
        cp.free -= n
        cp.lent += n
        self.pools[debtor].borrowed += n
        self.refresh(creditor)

    # ---- migrations -----------------------------------------------------------------------------------
    def start_move(self, src: int, dst: int, home: int, n: int) -> int:
        """Hold the destination's blocks while a copy runs: a push reserves on the creditor (its
        try_move_kvcache), a pull (blocks come home) takes free blocks of the home."""
        p = self.pools[dst]
        if n > p.free:
            raise MemoryError(f"instance {dst}: {n} blocks to receive, {p.free} free")
        p.free -= n
        if dst != home:
            p.lent += n
        self._move_ids += 1
        self.moving[self._move_ids] = (src, dst, home, n)
        self.refresh(dst)
        return self._move_ids

    def cancel_move(self, mid: int) -> None:
        """The request let go of its blocks while they travelled: free what the copy held."""
        _, dst, home, n = self.moving.pop(mid)
        p = self.pools[dst]
        p.free += n
        if dst != home:
            p.lent -= n
        self.refresh(dst)
        self.released_to.add(dst)

    def finish_move(self, mid: int, rid: str) -> None:
        """The copy arrived: the request's ``n`` oldest blocks on the source now live on the destination."""
        src, dst, home, n = self.moving.pop(mid)
        self.layouts[rid].move_oldest(n, src, dst)
        sp = self.pools[src]
        sp.free += n
        if src != home:  # blocks came home: the creditor's loan ends
            sp.lent -= n
            self.pools[home].borrowed -= n
        else:
            self.pools[home].borrowed += n
        self.refresh(src)
        self.refresh(home)
        self.released_to.add(src)

    def release(self, rid: str) -> list[int]:
        """Give back every block of the request; returns the instances that got blocks back."""
        lay = self.layouts.pop(rid, None)
        if lay is None:
            return []
        for inst, n in lay.held.items():
            p = self.pools[inst]
            p.free += n
            if inst != lay.home:
                p.lent -= n
                self.pools[lay.home].borrowed -= n
        lay.epoch += 1
        ranks = [i for i, n in lay.held.items() if n > 0]
        for r in set(ranks) | {lay.home}:
            self.refresh(r)
        self.released_to.update(ranks)
        return ranks

    def check(self) -> None:
        """Every block is free, held by one request, and lent/borrowed counts agree (tests, debugging)."""
        used = [0] * len(self.pools)
        lent = [0] * len(self.pools)
        borrowed = [0] * len(self.pools)
        for _, dst, home, n in self.moving.values():
            used[dst] += n
            lent[dst] += n * (dst != home)
        for lay in self.layouts.values():
            if sum(n for _, n in lay.runs) != lay.total:
                raise AssertionError(f"layout runs and counts disagree: {lay}")
            for inst, n in lay.held.items():
                used[inst] += n
                if inst != lay.home:
                    lent[inst] += n
                    borrowed[lay.home] += n
        for p in self.pools:
            if p.free < 0 or p.total - p.free < used[p.rank]:
                raise AssertionError(f"pool {p.rank}: free {p.free}, requests hold {used[p.rank]} of {p.total}")
            if p.lent != lent[p.rank] or p.borrowed != borrowed[p.rank]:
                raise AssertionError(f"pool {p.rank}: lent/borrowed {p.lent}/{p.borrowed}, "
                                     f"layouts say {lent[p.rank]}/{borrowed[p.rank]}")
