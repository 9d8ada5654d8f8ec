"""The lending decisions both the runtime and the simulator call (infinite/cluster/decisions.py)."""

from __future__ import annotations

import pytest

from infinite.cluster.cost_model import Calibration, CostModel, StepSample
from infinite.cluster.decisions import (REFUSAL_BACKOFF_S, LoanAsk, LoanBackoff, grant_loan, growth_loan,
                                        loan_asks, loans_pay, planning_config)
from infinite.cluster.placement import PlacementConfig
from infinite.cluster.policy import LendingPolicy, Peer


def grow(need=4, free=1, held=10, pool=20, running=True, lending=True, lft=True, pays=True):
    return growth_loan(need, free, held, pool, running=running, lending=lending, lends_for_throughput=lft,
                       loans_pay=pays)


def test_growth_asks_for_a_loan_only_when_the_gmanager_could_grant_it():
    assert grow(need=1, free=1) == 0  # the pool suffices
    assert grow() == 3  # short by 3, and loans for throughput are on
    assert grow(lending=False) is None
    # fits the home's pool: only when the gManager lends for throughput (else it would refuse)
    assert grow(lft=False) is None
    # a new request that fits, when the last heartbeat said a loan for it would not pay
    assert grow(running=False, pays=False) is None
    assert grow(running=True, pays=False) == 3  # a running one keeps growing rather than be preempted
    # no home pool can hold it: capacity, asked whatever the throughput says
    assert grow(held=18, lft=False, pays=False, running=False) == 3


def test_loan_asks_local_first_or_oldest_new_positions():
    assert loan_asks(3, 7) == (True, (LoanAsk(7, False), LoanAsk(3, True)))  # a chunk, then just the need
    assert loan_asks(3, 3) == (True, (LoanAsk(3, True),))
    assert loan_asks(3, 2) == (False, (LoanAsk(3, False),))  # too few full home blocks: new positions
    assert loan_asks(0, 5) == (False, ())


def test_a_refusal_keeps_a_debtor_quiet_for_a_heartbeat_except_for_a_last_try():
    b = LoanBackoff()
    first, last = LoanAsk(4, False), LoanAsk(4, True)
    assert b.allows(0.0, first)
    b.answered(0.0, granted=False)
    assert not b.allows(0.05, first) and b.allows(0.05, last)
    assert b.allows(REFUSAL_BACKOFF_S, first)
    b.answered(1.0, granted=True)
    assert b.allows(1.0, first)


def test_grant_loan_is_capacity_or_a_calibrated_gain():
    asked = []

    def gain() -> float:
        asked.append(1)
        return 5.0

    assert grant_loan(30, 20, calibrated=False, gain=gain, min_gain=1.0) and not asked  # no pool holds it
    assert not grant_loan(10, 20, calibrated=False, gain=gain, min_gain=1.0) and not asked  # no lending on a guess
    assert grant_loan(10, 20, calibrated=True, gain=gain, min_gain=1.0) and len(asked) == 1
    assert not grant_loan(10, 20, calibrated=True, gain=gain, min_gain=10.0)


def test_loans_pay_asks_the_gain_of_a_mean_size_request():
    policy = LendingPolicy()
    me = Peer(0, 100, 10, 0, 0)  # 90 used by 3 running: 30 blocks each
    peers = [Peer(1, 100, 80, 0, 0), Peer(2, 100, 50, 0, 0)]
    seen = []

    def gain(plan):
        seen.append(plan)
        return 2.0

    assert loans_pay(policy, me, 3, lambda n: peers, True, gain, 1.0)
    assert seen == [[(1, 30)]]  # the policy's plan: the most lendable creditor first
    assert not loans_pay(policy, me, 3, lambda n: peers, False, gain, 1.0)  # uncalibrated
    assert not loans_pay(policy, me, 3, lambda n: peers, True, gain, 3.0)
    assert not loans_pay(LendingPolicy(enabled=False), me, 3, lambda n: peers, True, gain, 1.0)


def test_uncalibrated_planning_makes_no_move_for_throughput():
    cfg = PlacementConfig()
    assert planning_config(cfg, True) is cfg
    assert planning_config(cfg, False).min_gain == float("inf")


def test_calibration_keeps_remote_samples_while_local_ones_stream_in():
    """The window of remote steps is its own: thousands of local steps after them do not push them out,
    so the model stays calibrated (one shared window forgot them and lending for throughput stopped)."""
    cal = Calibration()
    prior = CostModel()
    local = [StepSample(1 + i % 8, 1000 * (1 + i % 5), 0.01 + 0.001 * (i % 8)) for i in range(64)]
    cal.extend(local)
    cost = cal.refit(prior, now=0.0)
    assert not cal.calibrated and cost != prior  # fitted, but the remote path was never measured
    cal.extend(StepSample(2, 4000, 0.02, remote_calls=1) for _ in range(8))
    assert cal.refit(cost, now=1.0) is cost  # not due yet (REFIT_S)
    cal.refit(cost, now=10.0)
    assert cal.calibrated
    for k in range(20):
        cal.extend(local * 10)
        cal.refit(cost, now=20.0 + 10 * k)
        assert cal.calibrated
    assert len(cal.remote) == 8 and len(cal.local) == cal.local.maxlen
    eager = Calibration()
    eager.extend(local)
    eager.refit(prior, now=0.0, eager=True)
    assert eager.calibrated


@pytest.mark.parametrize("lends_for_throughput", [False, True])
def test_the_simulated_debtor_asks_exactly_when_the_runtime_would(lends_for_throughput):
    """The drift the shared decisions removed: a simulated debtor whose request fits its pool asked
    for a loan the gManager would refuse (it lends only for capacity until calibrated), was refused
    and backed off, which delayed its loans for requests no pool can hold."""
    from infinite.runtime.request import Request, Status
    from infinite.sampling.params import SamplingParams
    from infinite.sim.allocator import Hints, SimAllocator
    from infinite.sim.memory import ClusterMemory

    mem = ClusterMemory([8, 64], 16, LendingPolicy())
    asked = []

    def gm(debtor, plan, admits, new_calls, request_blocks):
        asked.append(request_blocks)
        return request_blocks > 8  # the gManager lends for capacity only

    alloc = SimAllocator(mem, 0, 8 + 60, gm, hint=lambda r: Hints(lends_for_throughput, False),
                         clock=lambda: 0.0)

    def running(rid: str, blocks: int) -> Request:
        req = Request(rid, list(range(16 * blocks)), SamplingParams(max_tokens=8), max_tokens=8)
        req.status = Status.RUNNING
        assert alloc.grow(req, 16 * blocks)
        return req

    running("other", 4)
    fits = running("fits", 4)  # the home's pool (8 blocks) is full
    grew = alloc.grow(fits, 16 * 4 + 1)  # one block more: 5 of 8, it fits the pool in time
    assert asked == ([5] if lends_for_throughput else [])  # asked only when a loan could be granted
    assert not grew  # (and the gManager, lending for capacity only, refused it)
    big = Request("big", list(range(16 * 20)), SamplingParams(max_tokens=8), max_tokens=8)
    granted = alloc.grow(big, 16 * 20)  # no home pool holds it: a capacity loan
    if lends_for_throughput:  # refused a moment ago: quiet for a heartbeat, as the runtime's allocator
        assert asked == [5] and not granted
    else:  # never asked in vain, so never backing off: the capacity loan is made at once
        assert asked == [20] and granted and mem.layouts["big"].total == 20
