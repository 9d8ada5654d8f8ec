"""The ``BlockAllocator`` the project's ``Scheduler`` runs on in the simulator.

It makes the runtime's ``ClusterAllocator`` decisions by calling the same
functions (``infinite.cluster.decisions``): whether a growth may ask for a
loan at all (``growth_loan``: not when the gManager lends only for capacity
and the request fits its home's pool, nor for a new request when the last
heartbeat said such a loan would not pay), which loans to ask for
(``loan_asks``: local-first — when a running request needs a block and the
pool is full, its oldest full home blocks move out to the borrowed ones,
copied at once: the step pays the copy, and the freed home blocks take its
tail; a new request's borrowed blocks take the oldest of its new positions),
the backoff after a refusal (``LoanBackoff``), and, on the gManager's side,
the no-regret check (``grant_loan`` with ``placement.loan_gain``). Only the
memory is simulated: blocks are counts (``infinite.sim.memory``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from infinite.cluster.decisions import LoanAsk, LoanBackoff, growth_loan, loan_asks
from infinite.kv.rmanager import blocks_for
from infinite.runtime.allocator import BlockAllocator
from infinite.runtime.request import Request, Status
from infinite.sim.memory import ClusterMemory

__all__ = ["SimAllocator", "CHUNK_BLOCKS", "Hints", "LoanCheck"]

CHUNK_BLOCKS = 4  # ClusterAllocator.chunk_blocks: local-first growth moves this many blocks beyond the need

# The gManager's answer (infinite.sim.planning, decisions.grant_loan): (debtor, [(creditor, blocks)],
# admits a new request, new remote calls, blocks the request will hold) -> is the loan made?
LoanCheck = Callable[[int, list[tuple[int, int]], bool, int, int], bool]


@dataclass(frozen=True)
class Hints:
    """What a debtor knows from its last heartbeat reply (the runtime's ``HeartbeatReply``)."""

    lends_for_throughput: bool  # the gManager's cost model is trusted
    loans_pay: bool  # a loan admitting a request of this instance's mean size pays


class SimAllocator(BlockAllocator):
    def __init__(self, mem: ClusterMemory, rank: int, capacity: int, loan_pays: LoanCheck | None = None,
                 push_seconds: Callable[[int, int], float] | None = None, hint: Callable[[int], Hints] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.mem = mem
        self.rank = rank
        self.capacity = capacity
        self.loan_pays = loan_pays  # None: every loan the policy allows is made
        self.hint = hint  # the last heartbeat's reply (None: the gManager lends for anything)
        self.clock = clock or (lambda: 0.0)
        self.backoff = LoanBackoff()  # no loan requests for a moment after a refusal
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
        running = req.status is Status.RUNNING
        hint = self.hint(home) if self.hint is not None else Hints(True, True)
        rest = growth_loan(need, free, held_n, mem.pools[home].total, running=running, lending=mem.policy.enabled,
                           lends_for_throughput=hint.lends_for_throughput, loans_pay=hint.loans_pay)
        if rest is None:
            return False
        if rest == 0:
            self._local(rid, need)
            return True
        full = req.num_computed_tokens // mem.block_size
        movable = min(lay.full_on(home, full), rest + CHUNK_BLOCKS) if lay is not None else 0
        push_out, asks = loan_asks(rest, movable)
        plan = self._ask(rid, asks, held_n + need, running)
        if not plan:
            return False
        if push_out:  # local-first: the oldest full home blocks go out, the tail stays home
            mem.push_out(rid, home, plan)
            if self.push_seconds is not None:
                self.push_s = max([self.push_s] + [self.push_seconds(c, n) for c, n in plan])
            self._local(rid, need)
            return True
        # too few full home blocks (a new request): borrowed blocks take the oldest new positions
        if free:
            self._local(rid, free)
        mem.borrow(rid, home, plan, at=held_n)
        return True

    def _ask(self, rid: str, asks: tuple[LoanAsk, ...], request_blocks: int, running: bool
             ) -> list[tuple[int, int]]:
        """Each loan in turn until one is granted (ClusterAllocator._ask); a refusal starts the backoff."""
        for ask in asks:
            now = self.clock()
            if not self.backoff.allows(now, ask):
                continue
            plan = self._plan(rid, ask.blocks, request_blocks, running)
            self.backoff.answered(now, bool(plan))
            if plan:
                return plan
        return []

    def _plan(self, rid: str, n: int, request_blocks: int, running: bool) -> list[tuple[int, int]]:
        """The gManager's borrow: the policy's plan over the creditors, all or nothing, made only if
        the gManager grants it (``loan_pays``: decisions.grant_loan); then reserved on them."""
        mem = self.mem
        if mem.borrowable(self.rank) < n:
            return []
        lay = mem.layouts.get(rid)
        held = dict(lay.held) if lay is not None else {}
        plan = mem.policy.borrow_plan(mem.peer(self.rank), n, mem.candidates(self.rank, n, held), held)
        if not plan:
            return []
        if self.loan_pays is not None:
            new_calls = sum(1 for c, _ in plan if held.get(c, 0) == 0)
            if not self.loan_pays(self.rank, plan, not running, new_calls, request_blocks):
                self.loans_refused += 1
                return []
        self.borrowed_in_step = True
        return plan
