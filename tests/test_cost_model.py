import math
import random

import pytest

from infinite.cluster.cost_model import CostModel, StepSample, fit, remote_measured


def _samples(truth: CostModel, n: int, seed: int = 0, noise: float = 0.0) -> list[StepSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        b = rng.randint(1, 64)
        c = rng.randint(0, 200_000)
        m = rng.randint(0, 4)
        t = truth.step_time(b, c, m, m) * (1 + rng.uniform(-noise, noise))
        out.append(StepSample(b, c, t, remote_calls=m, remote_query_tokens=m))
    return out


def test_fit_recovers_known_parameters():
    truth = CostModel(base_s=0.012, per_request_s=1.3e-4, per_context_token_s=4.1e-7, remote_latency_s=2.2e-5)
    got = fit(_samples(truth, 40))
    for name in ("base_s", "per_request_s", "per_context_token_s", "remote_latency_s"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-3), name


def test_fit_tolerates_noise():
    truth = CostModel(base_s=0.01, per_request_s=1e-4, per_context_token_s=3e-7)
    got = fit(_samples(truth, 400, seed=3, noise=0.02))
    assert got.base_s == pytest.approx(truth.base_s, rel=0.1)
    assert got.per_request_s == pytest.approx(truth.per_request_s, rel=0.1)
    assert got.per_context_token_s == pytest.approx(truth.per_context_token_s, rel=0.1)


def test_fit_with_few_samples_returns_prior():
    prior = CostModel(base_s=0.02)
    assert fit([], prior) == prior
    assert fit([StepSample(4, 1000, 0.5)], prior) == prior


def test_fit_collinear_samples_keep_prior_where_undetermined():
    prior = CostModel()
    # every sample at batch 8 and no remote calls: b and ℓ are not identifiable
    truth = CostModel(base_s=0.01, per_request_s=prior.per_request_s, per_context_token_s=5e-7)
    samples = [StepSample(8, c, truth.step_time(8, c)) for c in (1000, 5000, 20000, 80000)]
    got = fit(samples, prior)
    assert got.remote_latency_s == pytest.approx(prior.remote_latency_s, rel=1e-3)
    assert got.per_context_token_s == pytest.approx(5e-7, rel=1e-3)
    for s in samples:  # predictions on the data still match
        assert got.step_time(s.batch_size, s.context_tokens) == pytest.approx(s.step_time_s, rel=1e-4)


def test_fit_keeps_parameters_non_negative():
    # step time falls with context: least squares would make c negative
    samples = [StepSample(4, c, 0.02 - 1e-8 * c) for c in (0, 1000, 100000, 500000)]
    got = fit(samples)
    assert got.per_context_token_s >= 0 and got.base_s >= 0 and got.per_request_s >= 0


def test_step_time_shape_and_throughput():
    cm = CostModel(base_s=0.01, per_request_s=1e-4, per_context_token_s=1e-7, remote_latency_s=1e-5,
                   remote_token_s=1e-6, num_layers=10)
    assert cm.step_time(4, 1000) == pytest.approx(0.01 + 4e-4 + 1e-4)
    assert cm.remote_ma_time(3) == pytest.approx(10 * (3e-5 + 3e-6))
    assert cm.step_time(4, 1000, remote_calls=3) == pytest.approx(cm.step_time(4, 1000) + cm.remote_ma_time(3))
    assert cm.layer_time(4, 1000) == pytest.approx(cm.step_time(4, 1000) / 10)
    # small batches waste the device: per-request time falls with batch size
    per_req = [cm.step_time(b, 0) / b for b in (1, 4, 16, 64)]
    assert per_req == sorted(per_req, reverse=True)
    assert cm.throughput(0, 0) == 0.0
    assert cm.throughput(8, 0) == pytest.approx(8 / cm.step_time(8, 0))


def test_bad_input_raises():
    with pytest.raises(ValueError):
        CostModel(base_s=-1)
    with pytest.raises(ValueError):
        StepSample(1, 1, 0.0)
    with pytest.raises(ValueError):
        StepSample(-1, 1, 0.1)
    with pytest.raises(TypeError):
        fit([(1, 2, 3)])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        CostModel().step_time(-1, 0)
    assert math.isfinite(CostModel().step_time(0, 0))


def test_remote_cost_is_measured_only_by_steps_that_made_remote_calls():
    local = [StepSample(4, 1000, 0.01) for _ in range(100)]
    remote = [StepSample(4, 1000, 0.02, remote_calls=0.5) for _ in range(8)]
    assert not remote_measured(local)
    assert not remote_measured(local + remote[:7])
    assert remote_measured(local + remote)
    assert remote_measured(remote[:2], at_least=2)
