"""vllm-multi-paper: vLLM's scheduling before chunked prefill, in the simulator."""

import random

import pytest

from infinite.cluster.policy import LendingPolicy
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams
from infinite.sim.allocator import SimAllocator
from infinite.sim.engine import SimConfig, simulate
from infinite.sim.gpus import gpu_spec
from infinite.sim.memory import ClusterMemory
from infinite.sim.models import model_spec
from infinite.sim.policies import deployment
from infinite.sim.traces import TraceRequest
from infinite.sim.v0_scheduler import V0Scheduler

A100, L7 = gpu_spec("a100"), model_spec("llama2-7b")
PARAMS = SamplingParams(max_tokens=None, ignore_eos=True)


def sched(blocks=200, budget=4096):
    mem = ClusterMemory([blocks], 16, LendingPolicy(enabled=False))
    return V0Scheduler(SimAllocator(mem, 0, blocks), 256, budget), mem


def req(rid, prompt, out=8):
    return Request(rid, range(prompt), PARAMS, max_tokens=out)


def step(s):
    """Schedule one step and apply it as the engine would (every computed prompt samples a token)."""
    b = s.schedule()
    for r, n in zip(b.requests, b.num_new_tokens):
        r.num_computed_tokens += n
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(0)
    return [(r.request_id, n) for r, n in zip(b.requests, b.num_new_tokens)]


def test_a_step_prefills_whole_prompts_or_decodes_and_prefills_come_first():
    s, _ = sched()
    s.add(req("a", 300))
    s.add(req("b", 500))
    assert step(s) == [("a", 300), ("b", 500)]  # whole prompts, together, within the budget
    assert step(s) == [("a", 1), ("b", 1)]
    s.add(req("c", 1000))
    assert step(s) == [("c", 1000)]  # the decodes of a and b wait for c's whole prefill
    assert step(s) == [("a", 1), ("b", 1), ("c", 1)]


def test_admission_needs_the_whole_prompt_and_the_watermark_free():
    s, mem = sched(blocks=200)
    assert s.watermark_blocks == 2
    s.add(req("a", 16 * 150))
    assert step(s) == [("a", 2400)]
    s.add(req("b", 16 * 49))  # 49 blocks: 50 are free, but 2 are the watermark's
    assert step(s) == [("a", 1)]  # (a's first output token takes block 151)
    s.add(req("c", 16 * 40))  # would fit, but it is behind b: first come first served
    assert step(s) == [("a", 1)]
    s.finish(s.running[0])
    assert step(s) == [("b", 784), ("c", 640)]


def short_trace(seed, n=60):
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(30.0)
        out.append(TraceRequest(f"r{i}", t, rng.randint(50, 6000), rng.randint(5, 200)))
    return out


def test_fast_forward_equals_stepping_for_v0():
    tr = short_trace(1)
    c = SimConfig(A100, L7, (1,) * 3, False, kv_blocks=800, round_robin=True, v0_scheduler=True)
    fast, slow = simulate(tr, c), simulate(tr, SimConfig(**{**c.__dict__, "check": True}))
    assert fast.steps == slow.steps and fast.preemptions == slow.preemptions
    for a, b in zip(slow.completed, fast.completed):
        assert (a.request_id, a.home) == (b.request_id, b.home)
        assert a.finish_s == pytest.approx(b.finish_s, rel=1e-9)


def test_the_paper_baseline_is_vllm_multi_without_chunked_prefill():
    d = deployment("vllm-multi-paper", A100, L7, 8)
    assert d.sizes == deployment("vllm-multi", A100, L7, 8).sizes and d.v0 and d.round_robin and not d.lending
    # a long prompt arrives while a request decodes: v0 prefills it whole and first (its first token
    # sooner) while the decode waits the whole prefill (it ends later); chunked prefill mixes them
    tr = [TraceRequest("a", 0.0, 100, 300), TraceRequest("b", 0.5, 60_000, 2)]
    runs = {}
    for v0 in (False, True):
        res = simulate(tr, SimConfig(A100, L7, (1,), False, kv_blocks=8000, v0_scheduler=v0))
        runs[v0] = {c.request_id: c for c in res.completed}
    assert runs[True]["b"].first_token_s < runs[False]["b"].first_token_s
    assert runs[True]["a"].finish_s > runs[False]["a"].finish_s
