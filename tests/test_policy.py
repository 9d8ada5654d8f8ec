"""LendingPolicy: the one place that says who may lend how much to whom."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite.cluster.policy import LendingPolicy, Peer

POLICY = LendingPolicy(max_lend_fraction=0.75, max_remote_fraction=0.5)


def peer(rank, total=100, free=100, lent=0, borrowed=0, reserved=0):
    return Peer(rank, total, free, lent, borrowed, reserved)


def test_lendable_is_free_beyond_the_reserve_within_the_cap():
    assert POLICY.lend_cap(100) == 75 and POLICY.lend_cap(9) == 6  # floor, everywhere
    assert POLICY.lendable(peer(1)) == 75
    assert POLICY.lendable(peer(1, free=40)) == 40
    assert POLICY.lendable(peer(1, free=60, lent=30)) == 45
    assert POLICY.lendable(peer(1, free=60, reserved=50)) == 10
    assert POLICY.lendable(peer(1, borrowed=1)) == 0  # a debtor lends nothing
    assert LendingPolicy(enabled=False).lendable(peer(1)) == 0


def test_borrow_plan_is_all_or_nothing_and_prefers_creditors_holding_the_request():
    peers = [peer(0, free=10), peer(1, free=30), peer(2, free=50), peer(3, free=20)]
    debtor = peers[0]
    assert POLICY.borrow_plan(debtor, 60, peers) == [(2, 50), (1, 10)]
    assert POLICY.borrow_plan(debtor, 60, peers, held={3: 4}) == [(3, 20), (2, 40)]
    assert POLICY.borrow_plan(debtor, 101, peers) == []  # 50 + 30 + 20 lendable: not enough
    assert POLICY.borrow_plan(peer(0, lent=5), 1, peers) == []  # a creditor does not borrow
    assert POLICY.borrow_plan(debtor, 0, peers) == []


def test_request_capacity_is_home_pool_plus_what_others_may_lend():
    assert POLICY.request_capacity(12, [12]) == 12 + 9
    assert POLICY.request_capacity(9, [9, 9]) == 9 + 6 + 6
    assert LendingPolicy(enabled=False).request_capacity(12, [12, 12]) == 12


def test_movable_keeps_the_newest_block_home_and_the_remote_share_capped():
    assert POLICY.movable(local_blocks=100, total_blocks=100) == 50
    assert POLICY.movable(local_blocks=60, total_blocks=100) == 10
    assert POLICY.movable(local_blocks=1, total_blocks=1) == 0
    assert LendingPolicy(max_remote_fraction=1.0).movable(5, 5) == 4


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="max_lend_fraction"):
        LendingPolicy(max_lend_fraction=1.5)
    with pytest.raises(ValueError, match="max_remote_fraction"):
        LendingPolicy(max_remote_fraction=-0.1)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_borrow_sequences_never_make_an_instance_both_debtor_and_creditor(data):
    """Drive the policy as the gManager does: random debtors borrow, random loans come back.
    Keep the ledger independently and check the roles after every step."""
    n = data.draw(st.integers(2, 5))
    total = [data.draw(st.integers(4, 60)) for _ in range(n)]
    free = list(total)
    ledger: dict[tuple[int, int], int] = {}  # (debtor, creditor) -> blocks
    for _ in range(data.draw(st.integers(1, 30))):
        lent = [sum(v for (d, c), v in ledger.items() if c == i) for i in range(n)]
        borrowed = [sum(v for (d, c), v in ledger.items() if d == i) for i in range(n)]
        peers = [Peer(i, total[i], free[i], lent[i], borrowed[i]) for i in range(n)]
        if ledger and data.draw(st.booleans()):
            (d, c), v = sorted(ledger.items())[data.draw(st.integers(0, len(ledger) - 1))]
            back = data.draw(st.integers(1, v))
            ledger[(d, c)] = v - back
            if not ledger[(d, c)]:
                del ledger[(d, c)]
            free[c] += back
            continue
        d = data.draw(st.integers(0, n - 1))
        want = data.draw(st.integers(1, 40))
        got = POLICY.borrow_plan(peers[d], want, peers)
        assert got == [] or sum(k for _, k in got) == want
        for c, k in got:
            assert c != d and 0 < k <= POLICY.lendable(peers[c])
            free[c] -= k
            ledger[(d, c)] = ledger.get((d, c), 0) + k
        debtors = {d for d, _ in ledger}
        creditors = {c for _, c in ledger}
        assert not debtors & creditors, ledger
        for i in range(n):
            assert 0 <= free[i] <= total[i]
            assert sum(v for (_, c), v in ledger.items() if c == i) <= POLICY.lend_cap(total[i])


def test_queue_demand_stops_at_the_first_request_the_pool_cannot_hold():
    pol = LendingPolicy()
    assert pol.queue_demand([10, 20, 30], 100) == 60
    assert pol.queue_demand([10, 500, 30], 100) == 10  # FCFS: nothing behind the big one starts first
    assert pol.queue_demand([500, 10], 100) == 0  # it must borrow anyway; keeping blocks for it starves others
    assert pol.queue_demand([60, 60, 60], 100) == 100  # more than the pool changes nothing
    assert pol.queue_demand([], 100) == 0


def test_instances_whose_heads_all_need_to_borrow_still_lend_to_each_other():
    """Every instance's queue head is larger than its pool: with the whole queue kept as its own
    demand nobody would lend and nothing would ever be admitted; counting only what the pool can
    hold, the first borrower gets the cluster's memory."""
    pol = LendingPolicy()
    heads = [[5000, 20], [4000, 30], [6000]]  # blocks each queued request needs, per instance
    peers = [Peer(r, 1000, 1000, 0, 0, reserved=pol.own_demand(pol.queue_demand(q, 1000), [], 16))
             for r, q in enumerate(heads)]
    plan = pol.borrow_plan(peers[1], 1800, peers)  # the two others may lend 950 each
    assert sum(n for _, n in plan) == 1800
    whole = [Peer(r, 1000, 1000, 0, 0, reserved=pol.own_demand(sum(q), [], 16)) for r, q in enumerate(heads)]
    assert pol.borrow_plan(whole[1], 1800, whole) == []  # keeping the whole queue: no one lends
