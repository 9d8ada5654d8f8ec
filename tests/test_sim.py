"""The cluster simulator: conservation, fast-forward = stepping, lending's effect, the policies."""

import random

import pytest

from infinite.sim.engine import SimConfig, simulate
from infinite.sim.gpus import gpu_spec
from infinite.sim.memory import ClusterMemory
from infinite.sim.models import model_spec
from infinite.sim.policies import deployment
from infinite.sim.report import summarize
from infinite.sim.traces import TraceRequest

A100, L7 = gpu_spec("a100"), model_spec("llama2-7b")


def cfg(n=4, blocks=64, lending=True, **kw):
    return SimConfig(A100, L7, (1,) * n, lending, kv_blocks=blocks, **kw)


def trace(seed, n, rate, prompt, output, longs=()):
    """Poisson arrivals of requests with uniform prompt/output lengths, plus (arrival, prompt, output) extras."""
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(f"r{i}", t, rng.randint(*prompt), rng.randint(*output)))
    out += [TraceRequest(f"long{j}", a, p, o) for j, (a, p, o) in enumerate(longs)]
    return sorted(out, key=lambda r: (r.arrival_s, r.request_id))


def run(tr, c):
    """Simulate and check the invariants every run must keep."""
    res = simulate(tr, c)
    done = {x.request_id for x in res.completed}
    rejected = {rid for ids in res.rejected.values() for rid in ids}
    assert done | rejected == {t.request_id for t in tr} and not done & rejected
    for x in res.completed:  # every completed request generated exactly its output
        t = next(q for q in tr if q.request_id == x.request_id)
        assert (x.prompt_len, x.output_len) == (t.prompt_len, t.output_len)
        assert x.arrival_s <= x.first_token_s <= x.finish_s
    return res


def test_requests_and_memory_are_conserved():
    # 4 instances x 64 blocks x 16 tokens; two requests need more than one instance, one more than the cluster
    longs = [(0.5, 1500, 20), (1.0, 1700, 8), (1.5, 5000, 4)]
    tr = trace(1, 60, 30.0, (50, 400), (5, 60), longs)
    c = cfg()
    from infinite.sim import engine

    sim = engine._Sim(c)
    res = sim.run(tr)
    cap = 64 + 3 * c.lending_policy().lend_cap(64)  # its pool plus what the 3 others may lend
    assert set(res.rejected) == {f"longer than any instance can hold ({cap} blocks of 16 tokens)"}
    assert res.rejected[next(iter(res.rejected))] == ["long2"]
    assert len(res.completed) == 62
    sim.mem.check()
    assert not sim.mem.layouts and not sim.mem.moving
    for p in sim.mem.pools:  # every block came home and nothing is owed
        assert (p.free, p.lent, p.borrowed, p.demand) == (p.total, 0, 0, 0)
    assert res.blocks_borrowed > 0  # the long ones borrowed on demand


@pytest.mark.parametrize("lending", [False, True])
def test_fast_forward_equals_stepping(lending):
    """check=True schedules every predicted step with the real Scheduler at its time and compares
    batch and step cost; the whole run must come out the same."""
    longs = [(0.3, 1400, 30), (0.9, 900, 40)]
    tr = trace(2, 50, 40.0, (30, 300), (2, 80), longs)
    c = cfg(n=3, blocks=48, lending=lending, plan_interval_s=0.05)
    fast, slow = run(tr, c), run(tr, SimConfig(**{**c.__dict__, "check": True}))
    assert slow.steps == fast.steps and slow.preemptions == fast.preemptions
    assert slow.preemptions > 0
    assert [(x.request_id, x.home, x.preemptions) for x in slow.completed] == \
        [(x.request_id, x.home, x.preemptions) for x in fast.completed]
    for a, b in zip(slow.completed, fast.completed):
        assert a.finish_s == pytest.approx(b.finish_s, rel=1e-9)
        assert a.first_token_s == pytest.approx(b.first_token_s, rel=1e-9)
    assert (slow.moves, slow.blocks_moved, slow.blocks_borrowed) == (fast.moves, fast.blocks_moved,
                                                                      fast.blocks_borrowed)


def test_simulation_is_deterministic():
    tr = trace(3, 40, 20.0, (30, 300), (2, 50), [(0.4, 1200, 10)])
    assert summarize(run(tr, cfg())) == summarize(run(tr, cfg()))


def test_lending_leaves_short_only_traffic_alone():
    """Requests far smaller than a pool: lending on must change throughput by under 2%."""
    tr = trace(4, 400, 60.0, (20, 200), (10, 120))
    off = summarize(run(tr, cfg(n=4, blocks=256, lending=False)))
    on = summarize(run(tr, cfg(n=4, blocks=256, lending=True)))
    assert off["requests_completed"] == on["requests_completed"] == 400
    assert on["throughput_tokens_per_s"] == pytest.approx(off["throughput_tokens_per_s"], rel=0.02)


def test_request_longer_than_an_instance_is_served_only_with_lending():
    tr = trace(5, 20, 10.0, (30, 200), (5, 30), [(0.2, 2500, 16)])
    multi = run(tr, cfg(lending=False))
    inf = run(tr, cfg(lending=True))
    assert [rid for ids in multi.rejected.values() for rid in ids] == ["long0"]
    assert not inf.rejected and len(inf.completed) == 21
    served = next(x for x in inf.completed if x.request_id == "long0")
    assert served.remote_blocks > 0


def test_deployments_of_the_policies():
    assert deployment("vllm-multi", A100, L7, 32).sizes == (1,) * 32
    assert deployment("infinite", A100, L7, 32).lending
    assert deployment("vllm-single", A100, L7, 32).sizes == (32,)
    assert deployment("vllm-single", A100, L7, 32).describe() == "1xTP8xPP4"
    assert deployment("vllm-multi", A100, model_spec("llama2-70b"), 32).sizes == (4,) * 8
    with pytest.raises(ValueError, match="nodes of 8"):
        deployment("vllm-single", A100, L7, 12)  # 12 GPUs are not whole nodes for the pipeline


def test_borrow_candidates_give_borrow_plan_the_same_answer():
    """ClusterMemory hands borrow_plan only the creditors it could reach; the plan must equal the plan
    over every peer, whatever the pools look like."""
    from infinite.cluster.policy import LendingPolicy

    rng = random.Random(7)
    pol = LendingPolicy()
    for _ in range(200):
        n = rng.randint(2, 12)
        mem = ClusterMemory([rng.randint(8, 64) for _ in range(n)], 16, pol)
        for r in range(n):  # random occupancy and demand
            p = mem.pools[r]
            p.free = rng.randint(0, p.total)
            p.demand = rng.randint(0, 10)
            mem.refresh(r)
        debtor, need = rng.randrange(n), rng.randint(1, 60)
        held = {rng.randrange(n): rng.randint(1, 3) for _ in range(rng.randint(0, 2))}
        full = pol.borrow_plan(mem.peer(debtor), need, [mem.peer(r) for r in range(n)], held)
        few = pol.borrow_plan(mem.peer(debtor), need, mem.candidates(debtor, need, held), held)
        assert few == full
