"""Scheduler decisions on made-up requests: budget, admission, preemption, no thrashing."""

import random

from infinite.kv import RManager
from infinite.runtime.request import Request
from infinite.runtime.allocator import LocalAllocator
from infinite.runtime.scheduler import Scheduler
from infinite.sampling.params import SamplingParams

from helpers_scheduler import run_step, run_with_aborts


def req(rid: str, n_prompt: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)


def test_chunked_prefill_respects_token_budget():
    rm = RManager(0, 100, 16)
    s = Scheduler(LocalAllocator(rm), max_num_seqs=8, max_num_batched_tokens=32)
    s.add(req("a", 70))
    s.add(req("b", 10))
    b1 = run_step(s)
    assert [r.request_id for r in b1.requests] == ["a"] and b1.num_new_tokens == [32]
    b2 = run_step(s)
    assert b2.num_new_tokens == [32]
    b3 = run_step(s)  # a finishes its prompt (6) and b is admitted in the same step
    assert [r.request_id for r in b3.requests] == ["a", "b"] and b3.num_new_tokens == [6, 10]
    b4 = run_step(s)  # both decode
    assert b4.num_new_tokens == [1, 1]


def test_max_num_seqs_limits_running():
    s = Scheduler(LocalAllocator(RManager(0, 100, 16)), max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(4):
        s.add(req(f"r{i}", 5))
    b = run_step(s)
    assert len(b.requests) == 2 and len(s.waiting) == 2


def test_admission_waits_for_whole_prompt_to_fit():
    rm = RManager(0, 4, 16)
    s = Scheduler(LocalAllocator(rm), max_num_seqs=8, max_num_batched_tokens=16)
    s.add(req("small", 20, max_tokens=40))  # 2 blocks
    s.add(req("big", 40))  # needs 3 blocks + room for its first token
    run_step(s)
    run_step(s)
    assert [r.request_id for r in s.running] == ["small"]
    assert rm.num_free == 2  # big (3 blocks) does not fit: it waits, nothing is thrashed


def test_preempts_newest_and_recomputes():
    rm = RManager(0, 6, 4)
    s = Scheduler(LocalAllocator(rm), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = req("a", 8, max_tokens=12), req("b", 8, max_tokens=12)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 3 blocks (8 tokens + room), b: 2 blocks... both admitted
    preempted = []
    for _ in range(40):
        batch = run_step(s)
        preempted += [r.request_id for r in batch.preempted]
        if not s.has_unfinished():
            break
    assert "b" in preempted and "a" not in preempted  # the newest goes first
    assert a.finished and b.finished
    assert b.metrics.num_preemptions >= 1
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert rm.num_free == 6


def test_random_workloads_finish_and_free_everything():
    rng = random.Random(7)
    for trial in range(30):
        blocks = rng.randint(6, 30)
        rm = RManager(0, blocks, 4)
        s = Scheduler(LocalAllocator(rm), max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 40))
        reqs = []
        for i in range(rng.randint(1, 10)):
            # every request must fit the pool alone (the engine rejects the others)
            p = rng.randint(1, blocks * 4 - 10)
            m = rng.randint(1, min(8, blocks * 4 - p - 1))
            reqs.append(req(f"t{trial}-{i}", p, m))
            s.add(reqs[-1])

        def check():
            assert rm.num_free + rm.num_used == blocks

        aborted = run_with_aborts(s, reqs, rng, check)
        assert not s.has_unfinished(), f"trial {trial} did not finish"
        assert rm.num_free == blocks
        for r in reqs:
            if r.request_id not in aborted:
                assert len(r.output_token_ids) == r.max_tokens
