"""The lending decisions of the gManager and of a debtor's allocator, as pure functions.

The runtime (``GManager``, ``ClusterAllocator``) and the cluster simulator
(``infinite.sim.planning``, ``infinite.sim.allocator``) both call these, so a
rule changed here changes in both: when they were copies they drifted (the
simulator asked for loans the gManager would refuse, was refused and backed
off, which also delayed its loans for requests no pool can hold). The
callers do the I/O (a borrow round trip, a reservation, a block copy) or
simulate it; nothing here reads a clock or a lock.

* ``growth_loan`` / ``loan_asks``: how a request grows when its home's pool
  is short — whether to ask for a loan at all, and which loans to ask for
  (local-first: the oldest full home blocks move out, or the borrowed blocks
  take the oldest new positions);
* ``LoanBackoff``: after a refusal, ask nothing for a heartbeat;
* ``grant_loan``: the gManager's no-regret check of an on-demand loan;
* ``loans_pay``: the heartbeat's word to a debtor on whether a loan would pay;
* ``loan_gain_near``: ``placement.loan_gain`` on the instances a loan involves;
* ``planning_config``: what the periodic placement may do before the cost
  model is calibrated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from infinite.cluster.cost_model import CostModel
from infinite.cluster.placement import ClusterSnapshot, InstanceState, PlacementConfig, RequestState, loan_gain
from infinite.cluster.policy import LendingPolicy, Peer

__all__ = ["REFUSAL_BACKOFF_S", "LoanAsk", "LoanBackoff", "growth_loan", "loan_asks", "grant_loan", "loans_pay",
           "loan_gain_near", "planning_config"]

REFUSAL_BACKOFF_S = 0.1  # about one heartbeat: what the gManager knows changes no faster


# ---- a debtor's allocator -------------------------------------------------------------------------


def growth_loan(need: int, free: int, held: int, pool_blocks: int, *, running: bool, lending: bool,
                lends_for_throughput: bool, loans_pay: bool) -> int | None:
    """Blocks a request must borrow to grow by ``need`` blocks when its home's pool has ``free``:
    0 when the pool suffices, None when it may not ask for a loan (it waits, or the scheduler
    preempts). A request that fits its home's pool (``held + need <= pool_blocks``) asks only
    when the gManager lends for throughput (its answer would be no), and a new one only when the
    last heartbeat said such a loan pays (``loans_pay``); a request no pool can hold always asks
    (capacity, not throughput)."""
    if need <= free:
        return 0
    if not lending:
        return None
    fits = held + need <= pool_blocks
    if fits and not lends_for_throughput:
        return None
    if fits and not running and not loans_pay:
        return None  # a new request that fits in time, and admitting it by a loan would not pay
    return need - free


@dataclass(frozen=True)
class LoanAsk:
    blocks: int
    ignore_backoff: bool  # the last try of a growth: asked even during a backoff


def loan_asks(rest: int, movable: int) -> tuple[bool, tuple[LoanAsk, ...]]:
    """(push_out, loans to ask for in order until one is granted) for a growth short of ``rest``
    blocks whose request has ``movable`` full home blocks that may move out (looked for up to
    ``rest + chunk``: the copy then happens once per chunk of tokens, not once per block).

    push_out: local-first — the loan takes the oldest full home blocks (copied out) and the
    freed home blocks take the new tail; ask for ``movable``, and for ``rest`` if that is
    refused. Otherwise (a new request, say) the borrowed blocks take the oldest of the new
    positions, so that they fill, and ship their K/V, once."""
    if rest <= 0:
        return False, ()
    if movable >= rest:
        first = (LoanAsk(movable, False),) if movable > rest else ()
        return True, first + (LoanAsk(rest, True),)
    return False, (LoanAsk(rest, False),)


@dataclass
class LoanBackoff:
    """After a refusal a debtor asks nothing for REFUSAL_BACKOFF_S: a full pool asks on every step,
    and the answer would be the same until the next heartbeat."""

    quiet_until: float = -math.inf

    def allows(self, now: float, ask: LoanAsk) -> bool:
        return ask.ignore_backoff or now >= self.quiet_until

    def answered(self, now: float, granted: bool) -> None:
        if not granted:
            self.quiet_until = now + REFUSAL_BACKOFF_S


# ---- the gManager -----------------------------------------------------------------------------------


def grant_loan(request_blocks: int, home_pool: int, calibrated: bool, gain: Callable[[], float],
               min_gain: float) -> bool:
    """No regret: a loan for a request that can never fit its home's pool is made (demand nothing
    else can admit); any other only when the cost model, calibrated on measured remote steps,
    predicts that the cluster gains more than ``min_gain`` tokens/s (``gain`` is asked only then)."""
    if request_blocks > home_pool:
        return True
    return calibrated and gain() > min_gain


def loans_pay(policy: LendingPolicy, me: Peer, num_running: int, candidates: Callable[[int], Sequence[Peer]],
              calibrated: bool, gain: Callable[[list[tuple[int, int]]], float], min_gain: float) -> bool:
    """Whether a loan admitting one more request of the debtor's mean size would pay now: the
    heartbeat reply tells the debtor, so that it does not ask (a blocking round trip) when not.
    ``candidates(n)``: the peers that could lend ``n`` blocks (all of them will do)."""
    if not calibrated or not policy.enabled:
        return False
    size = max(1, (me.total - me.free) // max(1, num_running))
    plan = policy.borrow_plan(me, size, candidates(size))
    return bool(plan) and gain(plan) > min_gain


def loan_gain_near(state: Callable[[int], InstanceState], debtor: int, loans: list[tuple[int, int]],
                   remote_requests: Iterable[RequestState], block_size: int, cost: CostModel, *, admits: bool,
                   new_calls: int) -> float:
    """``placement.loan_gain`` on the instances the loan involves — the debtor, its creditors,
    and wherever the debtor's requests with remote blocks (``remote_requests``) hold some — not
    on the whole cluster: what the gain reads is theirs, and a snapshot of every instance and
    request per question made the gManager's planning round O(N·(N+R)). A view whose heartbeats
    disagree for a moment (blocks counted on a creditor before the debtor's beat shows them) is
    judged without the requests, as the full snapshot is."""
    reqs = tuple(remote_requests)
    ranks = {debtor, *(c for c, _ in loans), *(i for q in reqs for i in q.blocks)}
    try:
        snap = ClusterSnapshot(tuple(state(r) for r in sorted(ranks)), reqs, block_size)
    except ValueError:
        snap = ClusterSnapshot(tuple(state(r) for r in sorted({debtor, *(c for c, _ in loans)})), (), block_size)
    return loan_gain(snap, cost, debtor, loans, admits=admits, new_calls=new_calls)


def planning_config(pcfg: PlacementConfig, calibrated: bool) -> PlacementConfig:
    """Uncalibrated, the periodic placement makes only the moves that do not hang on the cost
    model (evacuating a leaving instance)."""
    return pcfg if calibrated else replace(pcfg, min_gain=float("inf"))
