"""Step, probe and served-call timers measure the device's work, not the launches (a fake device:
no GPU here, and the rule is the same on any)."""

from __future__ import annotations

import time

import pytest
import torch

from infinite.cluster.device_timer import EventTimer, PerfCounterTimer, device_timer


class FakeDevice:
    """A device that runs queued work after the host queued it, as a GPU does: a launch returns at
    once (the host clock moves by the launch cost), the device's clock runs the work later."""

    LAUNCH_S = 1e-6

    def __init__(self) -> None:
        self.host = 0.0
        self.busy_until = 0.0  # when the device finishes what was queued so far
        self.syncs = 0

    def launch(self, seconds: float) -> None:
        self.busy_until = max(self.busy_until, self.host) + seconds
        self.host += self.LAUNCH_S

    def event(self) -> FakeEvent:
        return FakeEvent(self)


class FakeEvent:
    """torch.cuda.Event's interface: elapsed_time fails on an event the device has not reached and
    the host has not waited for (CUDA's cudaErrorNotReady)."""

    def __init__(self, dev: FakeDevice) -> None:
        self.dev = dev
        self.at: float | None = None

    def record(self) -> None:
        self.at = max(self.dev.busy_until, self.dev.host)  # reached once the work before it ran

    def synchronize(self) -> None:
        self.dev.syncs += 1
        self.dev.host = max(self.dev.host, self.at)

    def elapsed_time(self, end: FakeEvent) -> float:
        if end.at > self.dev.host:
            raise RuntimeError("CUDA error: device not ready")
        return (end.at - self.at) * 1e3


def test_the_event_timer_waits_for_the_device_and_reports_its_time():
    dev = FakeDevice()
    timer = EventTimer(dev.event)
    timer.start()
    dev.launch(0.005)
    dev.launch(0.003)
    launched_at = dev.host
    took = timer.elapsed()
    assert took == pytest.approx(0.008, rel=1e-6)  # the device's 8 ms, not the 2 us of launches
    assert dev.syncs == 1 and dev.host >= 0.008  # the host waited for the work
    # A host clock around the same launches would have measured the launches only.
    host_timer = PerfCounterTimer(clock=lambda: dev.host)
    host_timer.start()
    dev.launch(0.004)
    assert host_timer.elapsed() == pytest.approx(FakeDevice.LAUNCH_S)
    assert launched_at < 0.008


def test_the_timer_measures_only_what_was_queued_after_start():
    dev = FakeDevice()
    dev.launch(0.010)  # earlier work, still running when the timer starts
    timer = EventTimer(dev.event)
    with timer.measure() as m:
        dev.launch(0.002)
    assert m.seconds == pytest.approx(0.002, rel=1e-6)


def test_elapsed_before_start_is_an_error_and_the_cpu_timer_reads_the_clock():
    with pytest.raises(RuntimeError, match="before start"):
        EventTimer(FakeDevice().event).elapsed()
    timer = device_timer("cpu")
    assert isinstance(timer, PerfCounterTimer)
    with timer.measure() as m:
        time.sleep(0.01)
    assert 0.009 <= m.seconds < 1.0


class ScriptedDevice:
    """Timers over one FakeDevice that runs the n-th timed call for ``durations[n]`` seconds."""

    def __init__(self, durations: list[float]) -> None:
        self.dev = FakeDevice()
        self.durations = durations
        self.calls = 0

    def timer(self) -> EventTimer:
        outer = self

        class Timed(EventTimer):
            def start(self) -> None:
                super().start()
                outer.dev.launch(outer.durations[outer.calls])
                outer.calls += 1

        return Timed(self.dev.event)


def test_the_cost_probe_times_with_the_device_timer():
    """measure_cost reads the timer it is given: on a GPU its synchronized time, never a launch."""
    from infinite.cluster.cost_probe import measure_cost
    from infinite.model.loader import load_model
    from infinite.tiny import default_model_dir

    model = load_model(default_model_dir(), dtype=torch.float32, device="cpu")
    # warm-up runs are not timed; 5 timed runs each: batch 1, batch 16, one MicroAttention, a prompt
    # chunk of 4 blocks (64 tokens), its causal MicroAttention
    script = ScriptedDevice([0.002] * 5 + [0.002] * 5 + [0.004] * 5 + [0.065] * 5 + [0.013] * 5)
    cost = measure_cost(model, 16, torch.float32, torch.device("cpu"), batch=16, context_blocks=8,
                        timer=script.timer(), chunk_blocks=4)
    assert script.calls == 25 and script.dev.syncs == 25  # every timed run waited for
    assert cost.per_request_s == pytest.approx(0.0, abs=1e-9)  # the device took as long at batch 16 as at 1
    assert cost.base_s == pytest.approx(0.002, rel=1e-6)
    layers = model.config.num_layers
    assert cost.per_context_token_s == pytest.approx(layers * 0.004 / (8 * 16), rel=1e-6)
    assert cost.prefill_token_s == pytest.approx((0.065 - 0.002) / 63, rel=1e-6)  # a prompt token past the first
    assert cost.prefill_pair_s == pytest.approx(layers * 0.013 / (64 * 65 / 2), rel=1e-6)


def test_the_creditor_counts_the_device_time_of_a_served_call():
    from infinite.attention import MAMetadata
    from infinite.cluster import messages as M
    from infinite.cluster.counters import StepCounters
    from infinite.cluster.creditor import Creditor
    from infinite.cluster.policy import LendingPolicy
    from infinite.kv.cache import KVCache
    from infinite.kv.rmanager import RManager

    script = ScriptedDevice([0.003, 0.005])
    counters = StepCounters()
    kv = KVCache(1, 4, 4, 1, 8, torch.float32)
    creditor = Creditor(RManager(1, 4, 4), kv, 8 ** -0.5, LendingPolicy(), counters, make_timer=script.timer)
    try:
        meta = MAMetadata.build([1], [3], [[0]])
        out = creditor.attend(0, meta, M.AttentionTensors(torch.randn(1, 2, 8)))
        assert out.out.shape == (1, 2, 8)
        creditor.attend(0, meta, M.AttentionTensors(torch.randn(1, 2, 8)))
        assert counters.served_calls == 2 and counters.decode_served_calls == 2
        assert counters.served_s == pytest.approx(0.008, rel=1e-6) and script.dev.syncs == 2
    finally:
        creditor.close()
