"""The simulator's pure parts: roofline costs, traces, layouts, closed-form runs, the cpu fit, routing."""

import math
import random
from dataclasses import replace

import pytest

from infinite.cluster.placement import ClusterSnapshot, InstanceState, PlacementConfig, route
from infinite.sim.costs import InstanceHW, RemotePart, kv_pool_blocks, migration_time, step_cost, weights_fit
from infinite.sim.cpu import CPU_BASE, Probe, fit_cpu, predict
from infinite.sim.engine import SimConfig, _Sim
from infinite.sim.gpus import GPUS, gpu_spec
from infinite.sim.layout import Layout
from infinite.sim.models import MODELS, model_spec
from infinite.sim.policies import best_static_candidates, min_tp, node_groups, tp_pp
from infinite.sim.segments import DecodeRun
from infinite.sim.traces import REPRESENTATIVE, TRACES, TraceRequest, generate, load_trace, save_trace

A100, L7, L70 = gpu_spec("a100"), model_spec("llama2-7b"), model_spec("llama2-70b")


def test_model_shapes_match_the_published_sizes():
    assert L7.params == pytest.approx(6.74e9, rel=0.01)
    assert model_spec("llama2-13b").params == pytest.approx(13.0e9, rel=0.01)
    assert L70.params == pytest.approx(69.0e9, rel=0.01)
    assert L7.kv_bytes_per_token == 2 * 32 * 4096 * 2  # 512 KiB: K and V, 32 layers, fp16
    assert L70.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads


def test_roofline_decode_is_bound_by_bytes_and_prefill_by_flops():
    hw = InstanceHW(A100, L7, 1, (0,))
    weights = (L7.num_layers * L7.layer_params + L7.vocab * L7.hidden) * 2 / A100.bw
    assert hw.linear_s(1, 1) == pytest.approx(weights)  # one token: reading the weights is all
    prefill = hw.linear_s(8192, 1)
    assert prefill == pytest.approx(2 * L7.num_layers * L7.layer_params * 8192 / A100.flops, rel=0.01)
    # decode attention reads the KV of every context token once per layer
    assert hw.attention_s(1000, 1000) == pytest.approx(1000 * L7.kv_bytes_per_token_layer / A100.bw)
    tp2 = InstanceHW(A100, L7, 2, (0,))
    assert tp2.linear_s(8192, 1) == pytest.approx(prefill / 2)
    assert hw.allreduce_s(100) == 0.0 and tp2.allreduce_s(100) > 0


def test_tensor_parallelism_across_nodes_pays_infiniband():
    inside = InstanceHW(A100, L7, 8, (0,))
    across = InstanceHW(A100, L7, 16, (0, 1))
    assert across.allreduce_s(4096) > 5 * inside.allreduce_s(4096)
    pp = InstanceHW(A100, L7, 8, (0, 1, 2, 3), pp=4)
    assert not pp.spans_nodes and pp.devices == 32
    one = step_cost(pp, 1, 1, 1000, 1000, requests=1).seconds
    assert step_cost(pp, 4, 4, 4000, 4000, requests=4).seconds == pytest.approx(one, rel=0.05)  # 4 in flight


def test_remote_attention_and_migration_costs():
    hw = InstanceHW(A100, L7, 1, (0,))
    near, far = InstanceHW(A100, L7, 1, (0,)), InstanceHW(A100, L7, 1, (1,))
    assert hw.same_node(near) and not hw.same_node(far)
    local_only = step_cost(hw, 1, 1, 100, 100).seconds
    nv = step_cost(hw, 1, 1, 100, 100, (RemotePart(near, True, 1, 0, 50_000, 50_000),))
    ib = step_cost(hw, 1, 1, 100, 100, (RemotePart(far, False, 1, 0, 50_000, 50_000),))
    assert local_only < nv.seconds < ib.seconds
    assert nv.served_s[0] == pytest.approx(L7.num_layers * near.attention_s(50_000, 50_000))
    t1, t2 = migration_time(hw, False, 100, 16), migration_time(hw, False, 200, 16)
    assert t2 - t1 == pytest.approx(100 * 16 * L7.kv_bytes_per_token / A100.inter_bw)


def test_pool_sizes_and_the_smallest_tp_that_holds_a_model():
    blocks = kv_pool_blocks(A100, L7, 1, 16)
    usable = 80 * 1024**3 * 0.9 - 2 * 1024**3 - L7.weight_bytes
    assert blocks == int(usable // (16 * L7.kv_bytes_per_token))
    assert min_tp(A100, L7, 32) == 1 and min_tp(A100, L70, 32) == 4
    assert not weights_fit(A100, L70, 2) and weights_fit(A100, L70, 4)
    assert tp_pp(32, 8) == (8, 4) and tp_pp(4, 8) == (4, 1)
    assert node_groups((8, 1, 1), 8) == [(0,), (1,), (1,)]
    cands = best_static_candidates(A100, L7, 32)
    assert all(c.gpus == 32 for c in cands) and cands[0].sizes == (1,) * 32


def test_the_nine_traces_are_seeded_and_keep_their_ranges():
    assert len(TRACES) == 9 and {s.family for s in TRACES.values()} == {"short", "long"}
    assert sum(s.family == "short" for s in TRACES.values()) == 3
    assert set(REPRESENTATIVE.values()) <= set(TRACES)
    for spec in TRACES.values():
        tr = generate(spec, 4000.0 if spec.family == "long" else 200.0, 2.0, seed=3)
        assert tr == generate(spec, 4000.0 if spec.family == "long" else 200.0, 2.0, seed=3)
        assert all(2 <= r.length <= spec.max_len and r.output_len <= 4096 for r in tr)
        if spec.family == "short":
            assert max(r.length for r in tr) <= 60_000
    long2m = generate(TRACES["long-2m"], 20_000.0, 2.0, seed=1)
    assert max(r.length for r in long2m) > 1_000_000  # log-uniform up to 2M reaches the top decade
    n = len(generate(TRACES["short-lognormal"], 1000.0, 5.0, seed=2))
    assert abs(n - 5000) < 4 * math.sqrt(5000)  # Poisson arrivals at the given rate


def test_trace_files_round_trip(tmp_path):
    tr = [TraceRequest("a", 0.0, 10, 5), TraceRequest("b", 1.5, 2000, 1)]
    save_trace(tr, tmp_path / "t.jsonl")
    assert load_trace(tmp_path / "t.jsonl") == tr
    (tmp_path / "bad.jsonl").write_text('{"arrival_s": 0, "prompt_len": 3}\n')
    with pytest.raises(ValueError, match="output_len"):
        load_trace(tmp_path / "bad.jsonl")


def test_layout_runs():
    lay = Layout(0)
    lay.append(0, 4)
    lay.insert(2, 1, 3)  # borrowed blocks at the oldest new positions
    assert lay.runs == [[0, 2], [1, 3], [0, 2]] and lay.remote_n == 3 and lay.total == 7
    assert lay.full_on(0, 6) == 3  # home blocks among the first 6
    lay.move_oldest(2, 0, 2)
    assert lay.runs == [[2, 2], [1, 3], [0, 2]] and lay.held == {0: 2, 1: 3, 2: 2}
    assert lay.tokens_at(0, 40, 16) == {2: 32, 1: 8}
    lay.move_oldest(3, 1, 0)  # blocks come home
    assert lay.remote_n == 2 and lay.runs == [[2, 2], [0, 5]]


def test_decode_run_closed_form_equals_the_sum_of_its_steps():
    run = DecodeRun(t0=5.0, reqs=[None] * 3, num_steps=500, base=0.01, layers=32, g=1e-7, x1=3000, remote=0.0003,
                    served_per_step={}, reserved=0, budget_left_const=100, block_size=16)
    total = 0.0
    for s in range(1, 501):
        total += run.step_seconds(s)
        assert run.elapsed(s) == pytest.approx(total, rel=1e-12)
    assert run.steps_done(run.end(123) + 1e-9) == 123
    assert run.steps_done(run.end(123) - 1e-9) == 122


@pytest.mark.parametrize("tp", [1, 2])
def test_cpu_fit_recovers_the_constants_it_was_given(tp):
    """Also for probes of tensor-parallel instances (validate --tp): the fit sees them as tp-device
    instances, whose linear work and attention split tp ways."""
    truth = replace(CPU_BASE, peak_flops=10**10.5, hbm_bw=10**10.0, attn_flops_eff=0.5, step_overhead_s=4e-3,
                    request_overhead_s=3e-4)
    model = replace(MODELS["llama2-7b"], num_layers=4, hidden=512, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate=1024, vocab=2000, dtype_bytes=4)
    probes = [Probe("tpot", b, p, 48) for b, p in ((1, 64), (8, 64), (24, 64), (1, 2000), (4, 400))]
    probes += [Probe("ttft", 1, p, 1) for p in (500, 1000, 2000, 3800)]
    got = fit_cpu(model, probes, [predict(truth, model, p, tp=tp) for p in probes], tp=tp)
    for p in probes:
        assert predict(got, model, p, tp=tp) == pytest.approx(predict(truth, model, p, tp=tp), rel=0.05)
    if tp > 1:  # the same constants on one device predict a slower prefill: the TP instance is modelled
        assert predict(truth, model, probes[-1], tp=tp) < predict(truth, model, probes[-1])


def test_the_simulator_routes_as_placement_route_does():
    """The simulator keeps instances sorted by placement.route_key; on random clusters its choice
    must be route()'s over the full snapshot."""
    rng = random.Random(4)
    for trial in range(40):
        n = rng.randint(2, 9)
        cfg = SimConfig(A100, L7, (1,) * n, lending=trial % 2 == 0, kv_blocks=rng.choice([64, 128]))
        sim = _Sim(cfg)
        for r in range(n):
            p = sim.mem.pools[r]
            p.free = rng.randint(0, p.total)
            p.demand = rng.randint(0, 80)
            sim.mem.refresh(r)
        for blocks in (1, 60, 200, 10_000):
            want = route(ClusterSnapshot(tuple(sim.state(r) for r in range(n)), (), 16),
                         PlacementConfig(policy=cfg.lending_policy()), blocks)
            assert sim.route(blocks) == want


def test_gpu_specs_name_their_sources():
    for g in GPUS.values():
        assert g.sources and all(isinstance(v, str) and v for v in g.sources.values())
    with pytest.raises(ValueError, match="unknown gpu"):
        gpu_spec("v100")
    with pytest.raises(ValueError):
        replace(A100, bw_eff=1.5)
    assert InstanceState(0, 10, 10, 0, 0, 0)  # the placement types the simulator builds stay importable


def test_tight_search_traces_fit_one_pool_and_lending_leaves_idle_pools_alone():
    from infinite.runtime.engine import resolve_model_dir
    from infinite.sim.cpu import cpu_spec
    from infinite.sim.models import ModelSpec
    from infinite.sim.tight import TightPoint, evaluate, grid, point_trace

    points = grid()
    assert len(points) == len({(p.fill, p.num_long, p.rate, p.short_output) for p in points})
    for p in points[::7]:
        trace = point_trace(p, seed=1)
        longs = [t for t in trace if t.request_id.startswith("long")]
        assert len(longs) == p.num_long and len(trace) == p.num_long + p.num_short
        # the family's point: every request fits one pool, so lending is never needed for capacity
        assert all(t.prompt_len + t.output_len <= p.pool_blocks * 16 for t in trace)
    spec, model = cpu_spec(), ModelSpec.from_dir(resolve_model_dir(None), dtype_bytes=4)
    # a trickle of small requests never fills a pool: lending must not change anything
    calm = evaluate(TightPoint(0.5, 2, 20, 1.0, (32, 96)), spec, model)
    assert calm["on"]["blocks_borrowed"] == 0 and calm["on"]["blocks_moved"] == 0
    assert calm["ratio"] == pytest.approx(1.0, abs=0.02)
    assert calm["on"]["requests_completed"] == calm["off_routed"]["requests_completed"] == 22


def test_mixed_steps_pay_decode_bytes_and_prefill_flops_and_the_cpu_pads_decode_rows():
    hw = InstanceHW(A100, L7, 1, (0,))
    decode_only = step_cost(hw, 8, 8, 0, 0, decode_read=8 * 4000).seconds
    prefill_only = step_cost(hw, 2000, 1, 2000, 2000 * 2001 / 2).seconds
    mixed = step_cost(hw, 2008, 9, 2000, 2000 * 2001 / 2, decode_read=8 * 4000).seconds
    attn_d = L7.num_layers * hw.attention_s(8 * 4000, 8 * 4000)
    assert mixed == pytest.approx(prefill_only + attn_d + (hw.base_s(2008, 9) - hw.base_s(2000, 1)))
    assert decode_only < mixed
    # the torch path (cpu) gathers a decode batch padded to its longest row; paged kernels do not
    from infinite.sim.memory import ClusterMemory
    from infinite.sim.instance import SimInstance
    from infinite.cluster.policy import LendingPolicy
    from infinite.runtime.request import Request
    from infinite.sampling.params import SamplingParams

    reqs = [Request(f"q{i}", range(c), SamplingParams(max_tokens=None, ignore_eos=True), max_tokens=5)
            for i, c in enumerate((100, 100, 1000))]
    entries = [(r, r.num_tokens, 1, True) for r in reqs]
    costs = {}
    for pads in (False, True):
        spec = replace(A100, decode_pads=pads)
        h = InstanceHW(spec, L7, 1, (0,))
        inst = SimInstance(0, h, [h], ClusterMemory([100], 16, LendingPolicy(enabled=False)), 100, 2048, 8)
        costs[pads] = inst.cost(entries)[0].seconds
        read = 3 * 1001 if pads else 1200 + 3
        assert costs[pads] == pytest.approx(h.base_s(3, 3) + L7.num_layers * h.attention_s(read, read))


def test_remote_waits_hide_behind_the_other_micro_batch():
    """As the runtime's StepRunner: requests with remote blocks apart from local-only ones; while one
    micro-batch waits on its creditors the compute thread runs the other, so a layer waits only for
    what the other's compute does not cover."""
    from infinite.cluster.policy import LendingPolicy
    from infinite.runtime.request import Request
    from infinite.sampling.params import SamplingParams
    from infinite.sim.instance import SimInstance
    from infinite.sim.memory import ClusterMemory

    near = InstanceHW(A100, L7, 1, (0,))
    mem = ClusterMemory([4000, 4000], 16, LendingPolicy())
    inst = SimInstance(0, near, [near, near], mem, 8000, 8192, 64)
    mk = lambda rid, n: Request(rid, range(n), SamplingParams(max_tokens=None, ignore_eos=True), max_tokens=4)
    far = mk("far", 32_000)
    mem.borrow("far", 0, [(1, 1000)], at=0)  # its oldest 16,000 tokens on instance 1
    mem.take_local("far", 0, 1000)
    locals_ = [mk(f"l{i}", 500) for i in range(6)]
    for r in locals_:
        mem.take_local(r.request_id, 0, 32)
    L = L7.num_layers
    alone, _ = inst.cost([(far, far.num_tokens, 1, True)])
    both, _ = inst.cost([(far, far.num_tokens, 1, True)] + [(r, r.num_tokens, 1, True) for r in locals_])
    g = near.gpu
    wait = alone.remote_layer_s  # a lone micro-batch hides nothing
    nb = (near.base_s(6, 6) - g.step_overhead_s - g.request_overhead_s * 6) / L
    local = near.attention_s(16_001 + 6 * 501, 16_001 + 6 * 501)
    assert both.remote_layer_s == pytest.approx(max(0.0, wait - nb))
    assert both.seconds == pytest.approx(near.base_s(1, 1) + near.base_s(6, 6) - g.step_overhead_s
                                         + L * max(local, wait - nb))


def test_the_grouped_validation_trace_waits_for_the_runtime_and_groups_in_the_simulator():
    """sim validate's hook for issue 17: the grouped trace runs once EngineConfig has the group knobs;
    its simulated side (the same trace and policy) does form groups on the cpu device."""
    from infinite.runtime.config import EngineConfig
    from infinite.sim.engine import simulate
    from infinite.sim.validate import (BUDGET, GROUP_FIELDS, VALIDATION_GROUPS, runtime_prefills_in_groups,
                                       validation_trace)

    assert runtime_prefills_in_groups() == all(f in EngineConfig.__dataclass_fields__ for f in GROUP_FIELDS)
    # the embedded model's shapes and constants of the order validate fits on a 2-core CPU
    spec = replace(CPU_BASE, peak_flops=3e10, hbm_bw=1e10, step_overhead_s=2e-3, request_overhead_s=4e-4)
    _, trace = validation_trace(40, 4, 5.0, 1024, 2, (10, 1000), (4096, 8192))
    small = replace(model_spec("llama2-7b"), num_layers=4, hidden=512, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate=1024, vocab=32000, dtype_bytes=4)
    res = simulate(trace, SimConfig(spec, small, (1, 1), True, kv_blocks=1024, max_num_batched_tokens=BUDGET,
                                    groups=VALIDATION_GROUPS))
    assert res.groups > 0 and len(res.completed) == len(trace)
