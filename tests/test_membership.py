"""The pure rules of membership and recovery: detection, transitions, health, what a loss costs."""

from __future__ import annotations

import pytest

from infinite.cluster import messages as M
from infinite.cluster import recovery
from infinite.cluster.membership import (DEAD_AFTER_S, DETECTION_BOUND_S, HEARTBEAT_S, MONITOR_S, RANK0_LOST_S,
                                         HeartbeatWatch, Membership, view_actions, view_states)
from infinite.cluster.policy import LendingPolicy
from infinite.kv.rmanager import RBlock, RManager
from infinite.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams


def test_the_detection_bound_is_a_few_seconds_and_far_above_the_beat():
    assert DETECTION_BOUND_S == DEAD_AFTER_S + MONITOR_S <= 3.0
    assert DEAD_AFTER_S >= 10 * HEARTBEAT_S  # ten missed beats at least: no flapping on a busy host
    assert RANK0_LOST_S > DETECTION_BOUND_S


def test_a_rank_is_silent_only_after_dead_after_without_a_beat():
    w = HeartbeatWatch(dead_after_s=2.0)
    t = 100.0
    w.beat(1, t)
    w.beat(2, t)
    for k in range(1, 20):  # rank 1 keeps beating, rank 2 stops
        t += 0.1
        w.beat(1, t)
        assert w.silent(t) == []
    t += 0.1
    w.beat(1, t)
    assert w.silent(t) == []  # 2.0 s exactly is not over the bound
    t += 0.1
    w.beat(1, t)
    assert w.silent(t) == [2]
    w.forget(2)
    assert w.silent(t) == []


def test_a_stalled_monitor_holds_its_own_stall_against_no_one():
    w = HeartbeatWatch(dead_after_s=2.0, stall_s=0.5)
    w.beat(1, 0.0)
    assert w.silent(0.1) == []
    # Rank 0's loop was blocked for 5 s: nobody could be watched, so nobody is declared dead.
    assert w.silent(5.1) == []
    assert w.silent(5.2) == []
    # ...but silence after the stall counts as usual.
    t = 5.2
    while not w.silent(t):
        t += 0.1
    assert 7.0 <= t <= 7.3


def test_membership_transitions_target_and_health():
    m = Membership.of(range(3))
    assert not m.all_joined()
    for r in range(3):
        assert m.join(r)
    assert not m.join(1)  # again: no change
    assert m.all_joined() and m.target == 3 and not m.degraded
    assert m.health(0)["status"] == "ok"
    e = m.epoch
    assert m.lose(2, "no heartbeat for 2.0 s", now=10.0)
    assert not m.lose(2, "again", now=11.0)
    assert m.epoch == e + 1 and m.degraded and m.serving == {0, 1}
    h = m.health(now=12.0)
    assert h["status"] == "degraded" and h["instances"] == 2 and h["target"] == 3
    assert h["lost"] == [{"rank": 2, "reason": "no heartbeat for 2.0 s", "seconds_ago": 2.0}]
    with pytest.raises(ValueError, match="never rejoins"):
        m.join(2)  # fenced: a rank declared dead never comes back under its id
    assert m.join(3)  # a new instance in its place
    assert not m.degraded and m.health(13.0)["status"] == "ok" and m.target == 3
    assert m.join(4)  # growing beyond the target raises it
    assert m.target == 4
    assert m.start_leaving(1) and m.serving == {0, 3, 4} and 1 in m.alive
    assert not m.degraded
    assert m.leave(1, "left", now=14.0)
    assert m.target == 3 and not m.degraded and m.alive == {0, 3, 4}
    assert [d.rank for d in m.lost] == [2]  # the departure is not a loss


def test_view_actions_say_what_an_instance_must_do():
    before = view_states([0, 1, 2, 3], [], [], [])
    after = view_states([0, 3], [1], [2], [])
    assert view_actions(before, after) == ([2], [1])
    later = view_states([0, 3], [], [2], [1])
    assert view_actions(after, later) == ([1], [])  # a drained rank that left holds nothing any more
    assert view_actions(later, later) == ([], [])
    assert view_actions({}, view_states([0], [], [5], [])) == ([5], [])


def test_which_requests_a_loss_touches():
    homes = {"a": 0, "b": 2, "c": 1, "d": 2}
    assert recovery.homed_on(homes, 2) == ["b", "d"]
    rm = RManager(rank=0, num_blocks=8, block_size=16)  # rank 0's requests a, c, e
    rm.allocate("a", 1)
    rm.append_remote("a", [RBlock(2, 5)])
    rm.append_remote("c", [RBlock(1, 0)])
    rm.allocate("e", 1)
    rm.append_remote("e", [RBlock(1, 4)])
    assert rm.touching(2) == ["a"]
    assert rm.touching(1) == ["c", "e"]
    rm.free_request("c")
    assert rm.touching(1) == ["e"] and rm.touching(0) == ["a", "e"]


def test_capacity_after_a_loss_decides_who_can_be_recomputed():
    policy = LendingPolicy(max_lend_fraction=0.75)
    assert recovery.capacity_blocks(policy, 12, 2) == 12 + 9 + 9
    assert recovery.capacity_blocks(policy, 12, 1) == 21
    assert recovery.capacity_blocks(policy, 12, 0) == 12
    assert recovery.fits(21, 300, 20, 16)  # 320 tokens: 20 blocks
    assert not recovery.fits(21, 300, 40, 16)  # 340 tokens: 22 blocks
    msg = recovery.no_room_message("r1", 22, 21, [2])
    assert "22" in msg and "21" in msg and "(2)" in msg


def test_resume_carries_the_generated_tokens_and_restore_rebuilds_text():
    from infinite import LLM

    llm = LLM(num_kv_blocks=32, dtype="float32")
    e = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    full = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0]
    req = e.make_request("Once upon a time", params)
    sofar = OutputAccumulator()  # what rank 0 assembled from the old home's deltas
    sofar.add(RequestOutput(req.request_id, req.prompt, req.prompt_token_ids,
                            [CompletionOutput(0, "", full.token_ids[:5], 1.5, full.logprobs[:5])], False,
                            delta_offset=0))
    msg = recovery.resume_message(req, sofar)
    assert msg.output_token_ids == full.token_ids[:5] and msg.cumulative_logprob == 1.5
    assert M.decode(M.encode(msg)) == msg  # crosses the wire
    moved = e.build_request("moved", msg.prompt_token_ids, msg.params, msg.max_tokens, msg.prompt)
    recovery.restore_progress(moved, msg)
    e.submit(moved)
    outs = []
    while e.has_unfinished_requests():
        outs += [o for o in e.step() if o.request_id == "moved"]
    first, last = outs[0].outputs[0], outs[-1].outputs[0]
    assert first.token_ids[:5] == full.token_ids[:5] and len(first.token_ids) == 6  # goes on, nothing repeated
    assert last.token_ids == full.token_ids and last.text == full.text  # greedy: as if never moved
    assert len(last.logprobs) == 12
    assert recovery.resume_message(req, None).output_token_ids == []
