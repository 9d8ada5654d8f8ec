"""Step-time cost model of one instance, fitted from heartbeat samples.

The placement needs to predict how a move of KV blocks changes the decode
throughput of the two instances involved. Following the Infinite-LLM paper,
the time of one layer of an instance running a batch of ``β`` requests whose
contexts total ``C = Σ_r S_r`` tokens is

    T_layer(β, C) = W(β) / f(β) + C / g

We keep ``W(β)/f(β)`` linear, ``a + b·β``: the fixed part ``a`` (reading the
weights, kernel launches) is paid whatever the batch, so the time *per
request* ``a/β + b`` falls as the batch grows and saturates at ``b`` once the
device is busy — small batches waste the device. Attention reads the whole
context, at a rate ``g`` that barely depends on β, so it is ``c·C`` with
``c = 1/g``. A step runs every layer, so the model works on whole steps:

    step(β, C, m, q) = a + b·β + c·C + L·(m·ℓ + q·τ)

where the last term is the *exposed* time of remote MicroAttention: ``m``
remote MA calls per layer (one per (request, creditor) pair) each paying a
latency ``ℓ``, and ``q`` query tokens per layer sent out and returned as
partial (output, LSE) at ``τ`` seconds each. Overlap with local compute hides
part of it; ``ℓ`` is fitted from measured steps, so it is whatever is left.

Prefill is priced apart, for the choice of a prefill group
(``infinite.cluster.sp_policy``): a prompt token costs ``p_tok`` of
non-attention work and each (query, key) pair ``p_pair`` of attention, over
all layers; both are compute rates, not fitted from decode heartbeats (they
come from the probe, like ``τ``).

All values are plain floats; no torch, so the gManager and the simulator
share it.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

__all__ = ["StepSample", "CostModel", "fit", "remote_measured", "MIN_REMOTE_SAMPLES", "Calibration", "REFIT_S"]


@dataclass(frozen=True)
class StepSample:
    """One measured decode step, as a heartbeat reports it: the batch, the context and the remote
    calls of that very step with that step's time (never a mean of steps against a snapshot), and
    only decode steps (a prefill chunk computes many rows: its time says nothing of ``b``)."""

    batch_size: int
    context_tokens: int
    step_time_s: float
    remote_calls: float = 0  # remote MA calls per layer in that step
    remote_query_tokens: int = 0  # query tokens sent to creditors per layer

    def __post_init__(self) -> None:
        if self.batch_size < 0 or self.context_tokens < 0:
            raise ValueError(f"StepSample: batch_size and context_tokens must be >= 0, got {self}")
        if self.remote_calls < 0 or self.remote_query_tokens < 0:
            raise ValueError(f"StepSample: remote counts must be >= 0, got {self}")
        if not (self.step_time_s > 0 and math.isfinite(self.step_time_s)):
            raise ValueError(f"StepSample: step_time_s must be a positive finite number, got {self.step_time_s}")


@dataclass(frozen=True)
class CostModel:
    """Per-step time model; defaults are a 7B-class model on one datacenter GPU.

    Defaults: weights read once per step (~14 GB at ~1.6 TB/s ≈ 8 ms), ~50 µs
    of FFN/projection compute per extra request, ~0.3 µs per context token of
    attention (a 7B model holds ~0.5 MB of KV per token), 32 layers, and a
    remote MA that costs ~15 µs of exposed latency per call per layer plus a
    few µs per query token (a 4096-wide query out, output + LSE back).
    """

    base_s: float = 8e-3  # a: time of a step with an empty batch
    per_request_s: float = 5e-5  # b: non-attention time per request in the batch
    per_context_token_s: float = 3e-7  # c = 1/g: attention time per context token read
    remote_latency_s: float = 1.5e-5  # ℓ: exposed latency of one remote MA call, per layer
    remote_token_s: float = 2e-6  # τ: send one query + return its partial, per layer
    num_layers: int = 32
    prefill_token_s: float = 7e-5  # p_tok: non-attention time of one prompt token, all layers (~2·6.7 GFLOP)
    prefill_pair_s: float = 3e-9  # p_pair: attention time of one (query, key) pair, all layers (4·4096·32 FLOP)

    def __post_init__(self) -> None:
        for name in ("base_s", "per_request_s", "per_context_token_s", "remote_latency_s", "remote_token_s",
                     "prefill_token_s", "prefill_pair_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {v}")
        if self.base_s + self.per_request_s <= 0:
            raise ValueError("CostModel: base_s + per_request_s must be > 0 (a step cannot take no time)")
        if self.num_layers < 1:
            raise ValueError(f"CostModel.num_layers must be >= 1, got {self.num_layers}")

    def remote_ma_time(self, num_calls: int, query_tokens: int | None = None) -> float:
        """Seconds a step spends on remote MicroAttention over all layers.

        ``query_tokens`` defaults to one per call (a decode step).
        """
        if num_calls < 0:
            raise ValueError(f"num_calls must be >= 0, got {num_calls}")
        q = num_calls if query_tokens is None else query_tokens
        if q < 0:
            raise ValueError(f"query_tokens must be >= 0, got {q}")
        return self.num_layers * (num_calls * self.remote_latency_s + q * self.remote_token_s)

    def step_time(
        self, batch_size: float, context_tokens: float, remote_calls: int = 0, query_tokens: int | None = None
    ) -> float:
        """Seconds of one decode step: ``a + b·β + c·C`` plus exposed remote MA time."""
        if batch_size < 0 or context_tokens < 0:
            raise ValueError(f"batch_size and context_tokens must be >= 0, got {batch_size}, {context_tokens}")
        local = self.base_s + self.per_request_s * batch_size + self.per_context_token_s * context_tokens
        return local + self.remote_ma_time(remote_calls, query_tokens)

    def prefill_time(self, tokens: float, pairs: float) -> float:
        """Seconds of ``tokens`` prompt tokens whose queries make ``pairs`` (query, key) pairs, on
        top of the step they ride in."""
        if tokens < 0 or pairs < 0:
            raise ValueError(f"tokens and pairs must be >= 0, got {tokens}, {pairs}")
        return tokens * self.prefill_token_s + pairs * self.prefill_pair_s

    def layer_time(self, batch_size: float, context_tokens: float, remote_calls: int = 0) -> float:
        """``T_layer(β, S)``: one step's time spread evenly over the layers."""
        return self.step_time(batch_size, context_tokens, remote_calls) / self.num_layers

    def throughput(self, batch_size: float, context_tokens: float, remote_calls: int = 0) -> float:
        """Decode tokens per second: every running request emits one token per step."""
        if batch_size <= 0:
            return 0.0
        return batch_size / self.step_time(batch_size, context_tokens, remote_calls)


MIN_REMOTE_SAMPLES = 8  # measured steps with remote calls before the remote path's cost is trusted


def remote_measured(samples: Sequence[StepSample], at_least: int = MIN_REMOTE_SAMPLES) -> bool:
    """Whether ``samples`` hold enough steps that made remote calls for a fit to know what the
    remote path costs. Until they do, the remote latency is the idle probe's round trip, which
    misses what a busy rank adds (thread wake-ups, both ranks' cores shared): on the 2-core CPU
    the probe says ~0.3-0.7 ms per layer where loaded steps measure ~1-2 ms. Loans and moves made
    for throughput wait for this; loans that admit a request no pool can hold do not (they are
    what produce the first remote samples)."""
    return sum(1 for s in samples if s.remote_calls > 0) >= at_least


REFIT_S = 5.0  # how often the step-time model is refitted (a fit costs tens of ms of rank 0's CPU)


@dataclass
class Calibration:
    """The samples the cost model is fitted from, and whether it is trusted for throughput.

    Steps without remote calls and steps with them are kept in windows of their own: a cluster
    whose remote steps are a small share of its steps would otherwise push them out of one
    window of recent steps, the fit would forget what the remote path costs, and lending for
    throughput would switch itself off (then no loan is made, no remote step is measured, and
    it stays off). A remote sample leaves only for a newer one, so once ``remote_measured`` the
    model stays calibrated. No I/O: the caller passes the clock; the gManager and the simulator
    both keep one. Thread-safe (heartbeats add, the planner refits).
    """

    local: deque[StepSample] = field(default_factory=lambda: deque(maxlen=384))
    remote: deque[StepSample] = field(default_factory=lambda: deque(maxlen=128))
    fitted_at: float = -math.inf
    calibrated: bool = False  # fitted to measured remote steps (or eager): loans and moves for throughput
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, sample: StepSample) -> None:
        with self._lock:
            (self.remote if sample.remote_calls > 0 else self.local).append(sample)

    def extend(self, samples: Iterable[StepSample]) -> None:
        for s in samples:
            self.add(s)

    def samples(self) -> list[StepSample]:
        with self._lock:
            return [*self.local, *self.remote]

    def __len__(self) -> int:
        return len(self.local) + len(self.remote)

    def refit(self, cost: CostModel, now: float, eager: bool = False) -> CostModel:
        """The model to use from ``now``: refitted every REFIT_S once there are 8 samples (else
        ``cost`` as is); ``calibrated`` follows. ``eager``: trusted from the first fit."""
        if len(self) < 8 or now - self.fitted_at < REFIT_S:
            return cost
        self.fitted_at = now
        samples = self.samples()
        self.calibrated = remote_measured(samples) or eager
        return fit(samples, prior=cost)


_FITTED = ("base_s", "per_request_s", "per_context_token_s", "remote_latency_s")


def fit(
    samples: list[StepSample],
    prior: CostModel | None = None,
    *,
    min_samples: int = 3,
    prior_weight: float = 1e-6,
) -> CostModel:
    """Least-squares fit of ``a, b, c, ℓ`` to measured steps, all kept ``>= 0``.

    Why a prior: heartbeats of a young cluster carry few and often collinear
    samples (every step at the same batch size, say). With fewer than
    ``min_samples`` samples the prior is returned as is; otherwise each
    parameter is pulled toward its prior value with the weight of
    ``prior_weight`` of a sample, so directions the data do not determine
    keep the prior's value while the others follow the data. ``τ`` and the
    layer count are not fitted (they come from message size and the model).
    """
    base = prior if prior is not None else CostModel()
    if not isinstance(samples, (list, tuple)):
        raise TypeError(f"fit: samples must be a list of StepSample, got {type(samples).__name__}")
    for s in samples:
        if not isinstance(s, StepSample):
            raise TypeError(f"fit: every sample must be a StepSample, got {type(s).__name__}")
    if prior_weight <= 0:
        raise ValueError(f"fit: prior_weight must be > 0, got {prior_weight}")
    if len(samples) < max(1, min_samples):
        return base

    L = base.num_layers
    rows = [[1.0, float(s.batch_size), float(s.context_tokens), float(L * s.remote_calls)] for s in samples]
    ys = [s.step_time_s - L * s.remote_query_tokens * base.remote_token_s for s in samples]
    theta0 = [getattr(base, name) for name in _FITTED]
    n = len(rows)
    # Column scales make the prior's pull comparable across parameters whose
    # units differ by orders of magnitude; a column with no data gets the
    # scale of the step time it would explain at its prior value.
    mean_y = sum(abs(y) for y in ys) / n or 1.0
    scales = []
    for j in range(4):
        rms = math.sqrt(sum(r[j] ** 2 for r in rows) / n)
        if rms == 0.0:
            rms = mean_y / theta0[j] if theta0[j] > 0 else 1.0
        scales.append(rms)
    lam = prior_weight * n

    # The normal equations in column-scaled units, built once for all 16 active sets (the gManager
    # refits on every placement run, over up to 512 samples).
    xs = [[r[j] / scales[j] for j in range(4)] for r in rows]
    gram = [[sum(x[p] * x[q] for x in xs) for q in range(4)] for p in range(4)]
    xty = [sum(x[p] * y for x, y in zip(xs, ys)) for p in range(4)]
    best: tuple[float, list[float]] | None = None
    for active in _subsets(4):
        theta = _solve_ridge(gram, xty, theta0, scales, lam, active)
        if theta is None or any(t < 0 for t in theta):
            continue
        obj = sum((y - sum(r[j] * theta[j] for j in range(4))) ** 2 for r, y in zip(rows, ys))
        obj += lam * sum((scales[j] * (theta[j] - theta0[j])) ** 2 for j in range(4))
        if best is None or obj < best[0]:
            best = (obj, theta)
    if best is None:  # only the all-zero solution is feasible; keep the prior
        return base
    theta = best[1]
    if theta[0] + theta[1] <= 0:
        return base
    return replace(base, **dict(zip(_FITTED, theta)))


def _subsets(n: int) -> list[tuple[int, ...]]:
    """Active sets for the non-negative fit: 4 parameters, so enumerate all 16."""
    return [c for k in range(n, -1, -1) for c in itertools.combinations(range(n), k)]


def _solve_ridge(
    gram: list[list[float]],
    xty: list[float],
    theta0: list[float],
    scales: list[float],
    lam: float,
    active: tuple[int, ...],
) -> list[float] | None:
    """Normal equations of the prior-pulled least squares, inactive parameters pinned at 0.

    ``gram``/``xty`` are XᵀX and Xᵀy in scaled units u_j = theta_j * scale_j, so the system is
    well conditioned."""
    theta = [0.0] * len(theta0)
    if not active:
        return theta
    A = [[gram[p][q] for q in active] for p in active]
    rhs = [xty[p] for p in active]
    for k, j in enumerate(active):
        A[k][k] += lam
        rhs[k] += lam * theta0[j] * scales[j]
    u = _gauss(A, rhs)
    if u is None:
        return None
    for k, j in enumerate(active):
        theta[j] = u[k] / scales[j]
    return theta


def _gauss(A: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    M = [row[:] + [b[i]] for i, row in enumerate(A)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(M[r][col]))
        if abs(M[piv][col]) < 1e-300:
            return None
        M[col], M[piv] = M[piv], M[col]
        for r in range(col + 1, n):
            f = M[r][col] / M[col][col]
            if f:
                for c in range(col, n + 1):
                    M[r][c] -= f * M[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][c] * x[c] for c in range(r + 1, n))) / M[r][r]
    return x
