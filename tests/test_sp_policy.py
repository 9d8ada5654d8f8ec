"""The prefill-group policy: what moves per layer, and who prefills a prompt (no regret)."""

import pytest

from infinite.cluster.cost_model import CostModel
from infinite.cluster.sp_layout import striped_layout
from infinite.cluster.sp_policy import (Candidate, ExchangeShape, GroupPolicy, choose_exchange, choose_group,
                                        estimate_alone, round_traffic)

MHA = ExchangeShape.of(num_heads=32, num_kv_heads=32, head_dim=128, dtype_bytes=2)  # Llama2-7B
GQA = ExchangeShape.of(num_heads=64, num_kv_heads=8, head_dim=128, dtype_bytes=2)  # Llama2-70B
COST = CostModel()
BUDGET, B = 8192, 16


def row_chunks(lay, k):
    return [lay.round_chunk(i, k) for i in range(lay.size)]


def test_both_modes_compute_every_pair_once_and_count_their_bytes():
    for lay in (striped_layout(60_000, (0, 1, 2, 3), B, 64), striped_layout(9_000, (5, 1, 2), B, (8, 3, 5)),
                striped_layout(30_000, (0, 1, 2), B, 40, lambda p: 1 / (1 + p / 5000))):
        for k in range(lay.rounds):
            chunks = row_chunks(lay, k)
            work = [lay.chunk(x, a, b) for x, (a, b) in enumerate(chunks)]  # member by member
            q = round_traffic(lay, k, MHA, "q")
            kv = round_traffic(lay, k, MHA, "kv")
            for j in range(lay.size):  # pass-Q: the holder computes; pass-KV: the asker
                assert q.pairs[j] == pytest.approx(sum(w.pairs[j] for w in work))
                assert kv.pairs[j] == pytest.approx(work[j].total_pairs)
                assert q.reads[j] == pytest.approx(sum(w.keys[j] for w in work if w.queries))
            for x, w in enumerate(work):
                assert kv.in_bytes(x) == pytest.approx(sum(n for j, n in enumerate(w.keys) if j != x) * MHA.kv_bytes)
                holders = sum(1 for j, n in enumerate(w.keys) if j != x and n > 0)  # pass-Q: queries to holders
                assert q.out_bytes(x) >= holders * w.queries * MHA.query_bytes
                assert q.sent[x].sum() - holders * w.queries * MHA.query_bytes == pytest.approx(
                    sum(work[y].queries for y in range(lay.size) if y != x and work[y].keys[x] > 0) * MHA.partial_bytes)


def test_gqa_moves_kv_in_early_rounds_and_queries_later_mha_always_queries():
    lay = striped_layout(400_000, (0, 1, 2, 3), B, 64)
    mha = [choose_exchange(lay, r, MHA).mode for r in range(lay.rounds)]
    gqa = [choose_exchange(lay, r, GQA).mode for r in range(lay.rounds)]
    # 8 KV heads of 64: a key's K/V is a fifth of a query and its partial, so while few keys come
    # before a chunk they are cheaper to move; later rounds see many keys and send the queries
    assert gqa[0] == "kv" and gqa[-1] == "q"
    # MHA: a key's K/V costs about a query and its partial: K/V only while a chunk sees few keys
    assert mha[-1] == "q" and mha.count("kv") < gqa.count("kv")
    assert GQA.kv_per_query < 0.2 < 0.9 < MHA.kv_per_query


def choose(*args, busy_share=0.0, **kw):
    """choose_group on a cluster whose other instances are idle unless said otherwise."""
    return choose_group(*args, busy_share=busy_share, **kw)


def idle(rank, room=10_000, **kw):
    return Candidate(rank, batch_size=kw.pop("batch", 0), context_tokens=kw.pop("ctx", 0),
                     step_tokens=kw.pop("step", 0), room_blocks=room, idle=kw.pop("idle", True), **kw)


def test_a_long_prompt_on_an_idle_cluster_is_grouped_and_a_short_one_is_not():
    pol = GroupPolicy()
    cands = [idle(r) for r in range(8)]
    plan = choose(200_000, cands, COST, pol, MHA, BUDGET, B)
    assert plan is not None and plan.layout.size >= 4
    assert plan.alone_s >= pol.min_speedup * plan.group_s
    assert plan.home == plan.members[0] and len(set(plan.members)) == plan.layout.size
    assert choose(20_000, cands, COST, pol, MHA, BUDGET, B) is None  # under min_prompt_tokens
    assert choose(200_000, cands, COST, GroupPolicy(enabled=False), MHA, BUDGET, B) is None


def test_no_group_without_spare_compute_room_or_the_right_roles():
    pol = GroupPolicy()
    busy = [idle(r, idle=False) for r in range(8)]
    assert choose(200_000, busy, COST, pol, MHA, BUDGET, B) is None
    small = [idle(0)] + [idle(r, room=3) for r in range(1, 8)]  # nobody can keep a segment
    assert choose(200_000, small, COST, pol, MHA, BUDGET, B) is None
    debtors = [idle(0)] + [idle(r, may_lend=False) for r in range(1, 8)]  # debtors lend nothing
    assert choose(200_000, debtors, COST, pol, MHA, BUDGET, B) is None
    lender = [idle(0, may_borrow=False)] + [idle(r) for r in range(1, 8)]
    strict = GroupPolicy(creditor_homes=False)  # lending's roles: a creditor borrows nothing
    assert choose(200_000, lender, COST, strict, MHA, BUDGET, B, home=0) is None
    plan = choose(200_000, lender, COST, strict, MHA, BUDGET, B)  # a new request: another home is chosen
    assert plan is not None and plan.home != 0
    assert choose(200_000, lender, COST, pol, MHA, BUDGET, B, home=0).home == 0  # the default allows it


def test_groups_keep_the_debts_acyclic():
    """Random groups formed with creditor homes: every debt points to an instance that owed nothing
    when it was made, so the graph of debts (home -> member) never has a cycle."""
    import random

    rng = random.Random(5)
    for _ in range(200):
        n = 6
        debts: dict[int, set[int]] = {r: set() for r in range(n)}  # borrower -> lenders
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.3:  # a group's request finishes: its debts end
                r = rng.randrange(n)
                debts[r].clear()
                continue
            cands = [Candidate(r, 0, 0, 0, 10_000, True, may_lend=not debts[r],
                               may_borrow=not any(r in d for d in debts.values())) for r in range(n)]
            plan = choose(100_000, cands, COST, GroupPolicy(max_members=rng.randint(2, 4)), MHA, BUDGET, B,
                                home=rng.randrange(n))
            if plan is not None:
                debts[plan.home] |= set(plan.members[1:])
        seen: dict[int, int] = {}

        def cyclic(r: int) -> bool:  # depth-first search for a back edge
            seen[r] = 1
            for x in debts[r]:
                if seen.get(x) == 1 or (x not in seen and cyclic(x)):
                    return True
            seen[r] = 2
            return False

        assert not any(cyclic(r) for r in range(n) if r not in seen)


def test_members_are_the_least_loaded_and_hold_their_segment():
    pol = GroupPolicy(max_members=3)
    cands = [idle(0), idle(1, batch=200, ctx=2_000_000, step=200), idle(2), idle(3, room=50), idle(4)]
    plan = choose(200_000, cands, COST, pol, MHA, BUDGET, B, home=0)
    assert plan is not None and set(plan.members) == {0, 2, 4}
    room = {c.rank: c.room_blocks for c in cands}
    assert all(plan.layout.segment_blocks(i) <= room[r] for i, r in enumerate(plan.members))


def test_the_speedup_bar_is_no_regret():
    """A group is chosen only when its estimate beats the home alone by min_speedup; raise the bar
    above what the best group can give and the home prefills alone."""
    cands = [idle(r) for r in range(4)]
    plan = choose(100_000, cands, COST, GroupPolicy(), MHA, BUDGET, B)
    assert plan is not None
    speedup = plan.alone_s / plan.group_s
    assert choose(100_000, cands, COST, GroupPolicy(min_speedup=speedup * 1.01), MHA, BUDGET, B) is None
    assert plan.alone_s == pytest.approx(estimate_alone(100_000, cands[0], COST, BUDGET))
    # a group must not waste a busy cluster's compute: members x its time within 1/min_efficiency of alone
    eff = plan.alone_s / (plan.layout.size * plan.group_s)
    tight = GroupPolicy(min_efficiency=min(1.0, eff * 1.01))
    assert choose(100_000, cands, COST, tight, MHA, BUDGET, B, busy_share=1.0) is None
    assert choose(100_000, cands, COST, tight, MHA, BUDGET, B, busy_share=0.9) is not None  # a tenth idle
    # a busy home prefills slower alone, so the group pays more
    loaded = [idle(0, batch=100, ctx=500_000, step=4000)] + cands[1:]
    assert choose(100_000, loaded, COST, GroupPolicy(), MHA, BUDGET, B, home=0).alone_s > plan.alone_s
