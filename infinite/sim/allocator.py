"""The ``BlockAllocator`` the project's ``Scheduler`` runs on in the simulator.

It follows the runtime's ``ClusterAllocator``: blocks come from the home's
pool first; what the pool lacks is borrowed on demand through
``LendingPolicy.borrow_plan`` (all or nothing), and only when the calibrated
cost model says the loan pays (``placement.loan_gain``, the gManager's no-regret
check), unless the request can never fit its home's pool. Local-first: when a
running request needs a block and the pool is full, its oldest full home
blocks move out to the borrowed ones (copied at once: the step pays the
copy) and the freed home blocks take its tail; a new request's borrowed
blocks take the oldest of its new positions.
"""

from __future__ import annotations

from collections.abc import Callable

from infinite.cluster.allocator import REFUSAL_BACKOFF_S
from infinite.kv.rmanager import blocks_for
from infinite.runtime.allocator import BlockAllocator
from infinite.runtime.request import Request, Status
from infinite.sim.memory import ClusterMemory

__all__ = ["SimAllocator", "CHUNK_BLOCKS"]

CHUNK_BLOCKS = 4  # ClusterAllocator.chunk_blocks: local-first growth moves this many blocks beyond the need

# (debtor, [(creditor, blocks)], admits a new request, new remote calls) -> does the loan pay?
LoanCheck = Callable[[int, list[tuple[int, int]], bool, int], bool]


class SimAllocator(BlockAllocator):
    def __init__(self, mem: ClusterMemory, rank: int, capacity: int, loan_pays: LoanCheck | None = None,
                 push_seconds: Callable[[int, int], float] | None = None, hint: Callable[[int], bool] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.mem = mem
        self.rank = rank
        self.capacity = capacity
        self.loan_pays = loan_pays  # None: every loan the policy allows is made
        self.hint = hint  # the heartbeat's "a loan would pay" (None: always ask)
        self.clock = clock or (lambda: 0.0)
        self.quiet_until = -1.0  # no loan requests before this time (after a refusal)
        self.push_seconds = push_seconds  # (creditor, blocks) -> seconds a synchronous copy takes
        self.reserve = 0  # home blocks set aside for a predicted run, used before the free pool
        self.borrowed_in_step = False  # a borrow pays a control-plane round trip in this step
        self.push_s = 0.0  # copies local-first growth made in this step (the step waits for them)
        self.loans_refused = 0

    @property
    def block_size(self) -> int:  # no rManager here: counts only
        return self.mem.block_size

    def capacity_blocks(self) -> int:
        return self.capacity

    def capacity_reason(self) -> str:
        return f"its home's pool plus what the others may lend: {self.capacity} blocks (simulated)"

    def free_blocks(self) -> int:
        mem = self.mem
        return mem.pools[self.rank].free + self.reserve + (mem.borrowable(self.rank) if mem.policy.enabled else 0)

    def release(self, req: Request) -> None:
        self.mem.release(req.request_id)

    def _local(self, rid: str, n: int) -> None:
        mine = min(n, self.reserve)
        self.reserve -= mine
        if mine:
            self.mem.assign_reserved(rid, self.rank, mine)
        if n > mine:
            self.mem.take_local(rid, self.rank, n - mine)

    def grow(self, req: Request, num_tokens: int) -> bool:
        mem, rid, home = self.mem, req.request_id, self.rank
        lay = mem.layouts.get(rid)
        held_n = lay.total if lay is not None else 0
        need = blocks_for(num_tokens, mem.block_size) - held_n
        if need <= 0:
            return True
        free = mem.pools[home].free + self.reserve
        if need <= free:
            self._local(rid, need)
            return True
        if not mem.policy.enabled:
            return False
        rest = need - free
        running = req.status is Status.RUNNING
        if not running and held_n + need <= mem.pools[home].total and self.hint is not None and not self.hint(home):
            return False  # a new request that fits this pool in time, and admitting it by a loan would not pay
        full = req.num_computed_tokens // mem.block_size
        movable = min(lay.full_on(home, full), rest + CHUNK_BLOCKS) if lay is not None else 0
        if movable >= rest:  # local-first: the oldest full home blocks go out, the tail stays home
            plan = self._borrow(rid, movable, held_n + need, running) if movable > rest else []
            plan = plan or self._borrow(rid, rest, held_n + need, running, retry=True)  # fewer may still fit
            if not plan:
                return False
            mem.push_out(rid, home, plan)
            if self.push_seconds is not None:
                self.push_s = max([self.push_s] + [self.push_seconds(c, n) for c, n in plan])
            self._local(rid, need)
            return True
        # too few full home blocks (a new request): borrowed blocks take the oldest new positions
        plan = self._borrow(rid, rest, held_n + need, running)
        if not plan:
            return False
        if free:
            self._local(rid, free)
        mem.borrow(rid, home, plan, at=held_n)
        return True

    def _borrow(self, rid: str, n: int, request_blocks: int, running: bool, retry: bool = False
                ) -> list[tuple[int, int]]:
        """The gManager's borrow: the policy's plan over the creditors, all or nothing, made only if
        the loan pays (or the request can never fit its home's pool); then reserved on them. After a
        refusal the allocator asks nothing for REFUSAL_BACKOFF_S (ClusterAllocator._borrow)."""
        now = self.clock()
        if now < self.quiet_until and not retry:
            return []
        plan = self._plan(rid, n, request_blocks, running)
        if not plan:
            self.quiet_until = now + REFUSAL_BACKOFF_S
        return plan

    def _plan(self, rid: str, n: int, request_blocks: int, running: bool) -> list[tuple[int, int]]:
        mem = self.mem
        if mem.borrowable(self.rank) < n:
            return []
        lay = mem.layouts.get(rid)
        held = dict(lay.held) if lay is not None else {}
        plan = mem.policy.borrow_plan(mem.peer(self.rank), n, mem.candidates(self.rank, n, held), held)
        if not plan:
            return []
        if request_blocks <= mem.pools[self.rank].total and self.loan_pays is not None:
            new_calls = sum(1 for c, _ in plan if held.get(c, 0) == 0)
            if not self.loan_pays(self.rank, plan, not running, new_calls):
                self.loans_refused += 1
                return []
        self.borrowed_in_step = True
        return plan
