"""Block accounting of a simulated cluster, and the scheduler's allocator over it.

Counts only, no block ids: each instance has a pool (total, free, lent,
borrowed) and each request a layout, the ordered list of (instance, blocks)
runs from its oldest block to its newest, as the runtime's rBlock table.
``SimAllocator`` is the ``BlockAllocator`` the project's ``Scheduler`` runs
on: it takes blocks from the home's pool first and borrows the rest on
demand through ``LendingPolicy.borrow_plan``, all or nothing, as the
gManager does for the runtime's ``ClusterAllocator``. Who may lend how much
is only ever asked of the policy (``lendable``), per instance, and cached
here so that a borrow in a 1024-instance cluster looks at a handful of
creditors instead of all of them (the candidates passed to ``borrow_plan``
are exactly those it could pick, so its answer is the same).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from infinite.cluster.policy import LendingPolicy, Peer
from infinite.kv.rmanager import blocks_for
from infinite.runtime.allocator import BlockAllocator
from infinite.runtime.request import Request

__all__ = ["Pool", "Layout", "ClusterMemory", "SimAllocator"]


@dataclass
class Pool:
    rank: int
    total: int
    free: int
    lent: int = 0  # blocks of other instances' requests held here
    borrowed: int = 0  # blocks of this instance's requests held elsewhere
    demand: int = 0  # blocks its queued requests need (the planner's waiting_blocks, routing's key)

    @property
    def used(self) -> int:
        return self.total - self.free


@dataclass
class Layout:
    """Where a request's blocks are: runs of (instance, count), oldest first."""

    home: int
    runs: list[list[int]] = field(default_factory=list)
    held: dict[int, int] = field(default_factory=dict)
    epoch: int = 0  # bumped when the request gives back all its blocks (a move in flight is then void)

    @property
    def total(self) -> int:
        return sum(self.held.values())

    remote_n: int = 0  # blocks on other instances

    def append(self, inst: int, n: int) -> None:
        if n <= 0:
            return
        if self.runs and self.runs[-1][0] == inst:
            self.runs[-1][1] += n
        else:
            self.runs.append([inst, n])
        self.held[inst] = self.held.get(inst, 0) + n
        if inst != self.home:
            self.remote_n += n

    def remote(self) -> dict[int, int]:
        return {i: n for i, n in self.held.items() if i != self.home and n > 0}

    def move_oldest_local(self, n: int, dst: int) -> None:
        """The request's ``n`` oldest home blocks now live on ``dst`` (a migration finished)."""
        if self.held.get(self.home, 0) < n:
            raise ValueError(f"cannot move {n} home blocks, the request has {self.held.get(self.home, 0)}")
        out: list[list[int]] = []
        left = n
        for inst, cnt in self.runs:
            if inst == self.home and left > 0:
                take = min(cnt, left)
                left -= take
                out.append([dst, take])
                if cnt > take:
                    out.append([inst, cnt - take])
            else:
                out.append([inst, cnt])
        merged: list[list[int]] = []
        for inst, cnt in out:
            if merged and merged[-1][0] == inst:
                merged[-1][1] += cnt
            else:
                merged.append([inst, cnt])
        self.runs = merged
        self.held[self.home] -= n
        self.held[dst] = self.held.get(dst, 0) + n
        self.remote_n += n

    def tokens_at(self, start: int, end: int, block_size: int) -> dict[int, int]:
        """How many of the token positions [start, end) fall in blocks on each instance."""
        out: dict[int, int] = {}
        pos = 0
        for inst, cnt in self.runs:
            lo, hi = pos, pos + cnt * block_size
            a, b = max(lo, start), min(hi, end)
            if b > a:
                out[inst] = out.get(inst, 0) + b - a
            pos = hi
            if pos >= end:
                break
        return out


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
        self.released_to: set[int] = set()  # instances that got blocks back since the engine last looked
        self.moving: dict[int, tuple[int, int]] = {}  # move id -> (creditor, blocks reserved there)
        self._move_ids = 0
        for r in range(len(totals)):
            self.refresh(r)

    # ---- the policy's view of one instance --------------------------------------------------------
    def peer(self, rank: int) -> Peer:
        """The instance as the gManager's on-demand borrowing sees it. Its ``reserved`` is what was
        routed there since its last heartbeat; the simulator's view is never stale, so that is 0 (the
        queue's demand is in the planner's snapshot, not in the borrow path, as in the runtime)."""
        p = self.pools[rank]
        return Peer(rank, p.total, p.free, p.lent, p.borrowed, reserved=0)

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

    def borrow(self, rid: str, home: int, plan: list[tuple[int, int]]) -> None:
        lay = self.layout(rid, home)
        for c, n in plan:
            cp = self.pools[c]
            if n > cp.free:
                raise MemoryError(f"creditor {c}: {n} blocks wanted, {cp.free} free")
            cp.free -= n
            cp.lent += n
            self.pools[home].borrowed += n
            lay.append(c, n)
            self.borrowed_blocks += n
            self.refresh(c)
        self.borrows += 1
        self.refresh(home)

    # ---- migrations -----------------------------------------------------------------------------------
    def start_move(self, dst: int, n: int) -> int:
        """Reserve ``n`` blocks on ``dst`` for a migration (the creditor's ``try_move_kvcache``)."""
        p = self.pools[dst]
        if n > p.free:
            raise MemoryError(f"creditor {dst}: {n} blocks to receive, {p.free} free")
        p.free -= n
        p.lent += n
        self._move_ids += 1
        self.moving[self._move_ids] = (dst, n)
        self.refresh(dst)
        return self._move_ids

    def cancel_move(self, mid: int) -> int:
        """The request let go of its blocks while they travelled: free the creditor's reservation."""
        dst, n = self.moving.pop(mid)
        p = self.pools[dst]
        p.free += n
        p.lent -= n
        self.refresh(dst)
        self.released_to.add(dst)
        return dst

    def finish_move(self, mid: int, rid: str) -> None:
        """The copy arrived: the request's ``n`` oldest home blocks now live on the creditor."""
        dst, n = self.moving.pop(mid)
        lay = self.layouts[rid]
        lay.move_oldest_local(n, dst)
        home = self.pools[lay.home]
        home.free += n
        home.borrowed += n
        self.refresh(lay.home)
        self.released_to.add(lay.home)

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
        for dst, n in self.moving.values():
            used[dst] += n
            lent[dst] += n
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


class SimAllocator(BlockAllocator):
    """The scheduler's blocks for one simulated instance: its pool first, then borrowed on demand."""

    def __init__(self, mem: ClusterMemory, rank: int, capacity: int) -> None:
        self.mem = mem
        self.rank = rank
        self.capacity = capacity
        self.reserve = 0  # home blocks set aside for a predicted run, used before the free pool
        self.borrowed_in_step = False  # a borrow pays a control-plane round trip in this step

    @property
    def block_size(self) -> int:  # no rManager here: counts only
        return self.mem.block_size

    def grow(self, req: Request, num_tokens: int) -> bool:
        mem, rid = self.mem, req.request_id
        lay = mem.layouts.get(rid)
        need = blocks_for(num_tokens, mem.block_size) - (lay.total if lay is not None else 0)
        if need <= 0:
            return True
        local = min(need, mem.pools[self.rank].free + self.reserve)
        rest = need - local
        plan: list[tuple[int, int]] = []
        if rest:
            if not mem.policy.enabled:
                return False
            held = lay.held if lay is not None else {}
            if mem.borrowable(self.rank) < rest:
                return False
            plan = mem.policy.borrow_plan(mem.peer(self.rank), rest, mem.candidates(self.rank, rest, held), held)
            if not plan:
                return False
        if local:
            mine = min(local, self.reserve)
            self.reserve -= mine
            if mine:
                mem.assign_reserved(rid, self.rank, mine)
            if local > mine:
                mem.take_local(rid, self.rank, local - mine)
        if plan:
            mem.borrow(rid, self.rank, plan)
            self.borrowed_in_step = True
        return True

    def release(self, req: Request) -> None:
        self.mem.release(req.request_id)

    def free_blocks(self) -> int:
        mem = self.mem
        return mem.pools[self.rank].free + self.reserve + (mem.borrowable(self.rank) if mem.policy.enabled else 0)

    def capacity_blocks(self) -> int:
        return self.capacity
