import pytest

from infinite.sim.simulator import SimConfig, TraceRequest, compare_lending, mixed_trace, simulate


def small_trace(seed=1):
    # 2 instances x 256 blocks x 16 tokens = 4096 tokens each; long prompts do not fit one instance
    return mixed_trace(seed, num_short=40, num_long=2, short_rate_per_s=20.0, short_prompt=(64, 512),
                       short_output=(8, 32), long_prompt=(5000, 6500), long_output=(8, 16))


CFG = SimConfig(num_instances=2, blocks_per_instance=256, block_size=16, max_step_tokens=512)


def test_lending_serves_requests_that_do_not_fit_one_instance():
    trace = small_trace()
    res = compare_lending(trace, CFG)
    off, on = res["off"], res["on"]
    assert off.rejected == 2 and off.served == 40
    assert on.rejected == 0 and on.unfinished == 0
    assert on.served > off.served
    assert on.moves > 0 and on.blocks_moved > 0
    assert off.moves == 0


def test_simulation_is_deterministic():
    trace = small_trace(seed=5)
    assert simulate(trace, CFG) == simulate(trace, CFG)


def test_short_only_trace_needs_no_lending_and_serves_everything():
    trace = mixed_trace(2, num_short=30, num_long=0, short_prompt=(64, 256), short_output=(4, 16))
    res = compare_lending(trace, CFG)
    for r in res.values():
        assert r.served == 30 and r.rejected == 0
        assert r.generated_tokens == sum(t.output_len for t in trace)
        assert r.throughput_tok_s > 0


def test_request_larger_than_cluster_is_rejected_even_with_lending():
    trace = [TraceRequest("huge", 0.0, 100_000, 4)]
    assert simulate(trace, CFG).rejected == 1


def test_bad_input_raises():
    with pytest.raises(ValueError):
        TraceRequest("x", 0.0, 0, 1)
    with pytest.raises(ValueError):
        SimConfig(num_instances=0)
    with pytest.raises(ValueError):
        simulate([TraceRequest("a", 0, 1, 1), TraceRequest("a", 1, 1, 1)], CFG)
