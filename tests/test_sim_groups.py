"""Prefill groups in the simulator: conservation, fast-forward = stepping, what a group buys and costs."""

import random

import pytest

from infinite.cluster.sp_policy import GroupPolicy
from infinite.sim import engine
from infinite.sim.engine import SimConfig, simulate
from infinite.sim.gpus import gpu_spec
from infinite.sim.models import model_spec
from infinite.sim.traces import TraceRequest

A100, L7 = gpu_spec("a100"), model_spec("llama2-7b")


def cfg(n=4, blocks=4096, groups=GroupPolicy(), **kw):
    return SimConfig(A100, L7, (1,) * n, True, kv_blocks=blocks, max_num_batched_tokens=8192, groups=groups, **kw)


def trace(seed=0, n=30, longs=((0.5, 70_000, 40), (6.0, 90_000, 20))):
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(10.0)
        out.append(TraceRequest(f"r{i}", t, rng.randint(50, 2000), rng.randint(5, 80)))
    out += [TraceRequest(f"long{j}", a, p, o) for j, (a, p, o) in enumerate(longs)]
    return sorted(out, key=lambda r: (r.arrival_s, r.request_id))


def test_groups_prefill_long_prompts_and_give_every_block_back():
    tr = trace()
    sim = engine._Sim(cfg())
    res = sim.run(tr)
    assert not res.rejected and len(res.completed) == len(tr)
    assert res.groups == 2 and res.group_members >= 4 and res.group_blocks > 0
    sim.mem.check()
    assert not sim.mem.layouts and not sim.groups and all(i.guest is None for i in sim.inst)
    for p in sim.mem.pools:
        assert (p.free, p.lent, p.borrowed) == (p.total, 0, 0)
    by_id = {c.request_id: c for c in res.completed}
    for t in tr:
        c = by_id[t.request_id]
        assert (c.prompt_len, c.output_len) == (t.prompt_len, t.output_len)
        assert c.arrival_s <= c.first_token_s <= c.finish_s
    assert by_id["long0"].remote_blocks > 0  # its KV stayed where the members computed it


def test_a_group_prefills_sooner_than_the_home_alone():
    tr = trace(n=0, longs=((0.0, 120_000, 10),))
    alone = simulate(tr, cfg(groups=None)).completed[0]
    grouped = simulate(tr, cfg()).completed[0]
    assert grouped.first_token_s - grouped.arrival_s < 0.5 * (alone.first_token_s - alone.arrival_s)
    # the prefill's tokens are the same work: the throughput window counts them once either way
    assert simulate(tr, cfg()).window_tokens == simulate(tr, cfg(groups=None)).window_tokens


def test_fast_forward_equals_stepping_with_groups():
    tr = trace(seed=3)
    c = cfg(n=3, plan_interval_s=0.05)
    fast, slow = simulate(tr, c), simulate(tr, SimConfig(**{**c.__dict__, "check": True}))
    assert fast.groups == slow.groups > 0 and fast.steps == slow.steps
    for a, b in zip(slow.completed, fast.completed):
        assert a.request_id == b.request_id
        assert a.first_token_s == pytest.approx(b.first_token_s, rel=1e-9)
        assert a.finish_s == pytest.approx(b.finish_s, rel=1e-9)


def test_rounds_wait_for_the_slowest_member_and_busy_time_is_only_the_work():
    """A member also decoding its own request makes every round a little longer; the others wait
    for it, and the wait is not counted as their busy time: they did the same work as without it."""
    long0 = TraceRequest("long0", 0.5, 200_000, 5)
    light = engine._Sim(cfg(n=3, blocks=16384))
    light.run([long0])
    loaded = engine._Sim(cfg(n=3, blocks=16384))
    res = loaded.run([TraceRequest("own", 0.0, 30_000, 3000), long0])  # decoding on one member throughout
    assert res.groups == light.groups_formed == 1
    done = {c.request_id: c for c in res.completed}
    assert done["long0"].first_token_s > light.completed[0].first_token_s  # its own steps slow the rounds
    own = done["own"].home
    light_busy = [i.busy_s for i in light.inst]
    for i in loaded.inst:  # the same work as some member of the light group (the home decodes long0 too)
        if i.rank != own:
            assert min(abs(i.busy_s / b - 1) for b in light_busy) < 1e-6
    assert loaded.inst[own].busy_s > max(light_busy)


def test_groups_are_off_without_lending_or_for_short_prompts():
    tr = trace()
    assert simulate(tr, SimConfig(A100, L7, (1,) * 4, False, kv_blocks=4096, groups=GroupPolicy())).groups == 0
    assert simulate(tr, cfg(groups=GroupPolicy(min_prompt_tokens=200_000))).groups == 0
    assert simulate(trace(), cfg()).groups == simulate(trace(), cfg()).groups  # deterministic
