"""One simulation from plain arguments: hardware, model, policy, trace -> summary.

Shared by the CLI, the paper comparison and the tests, so that every number
in docs/sim.md comes from the same path as ``python -m infinite.sim``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from infinite.cluster.sp_policy import GroupPolicy
from infinite.sim.engine import SimConfig, simulate
from infinite.sim.gpus import GPUS, GpuSpec, gpu_spec
from infinite.sim.models import MODELS, ModelSpec, model_spec
from infinite.sim.policies import Deployment, best_static_candidates, deployment
from infinite.sim.report import summarize
from infinite.sim.traces import TraceRequest, resolve_trace

__all__ = ["Setup", "load_scale", "resolve_gpu", "run_deployment", "run_policy", "make_trace"]


@dataclass(frozen=True)
class Setup:
    """Everything of a run but the policy and the trace."""

    gpu: GpuSpec
    model: ModelSpec
    gpus: int
    knobs: tuple[tuple[str, Any], ...] = ()  # SimConfig overrides (block_size, plan_interval_s, kv_blocks, ...)

    def config(self, dep: Deployment, **extra: Any) -> SimConfig:
        knobs = {**dict(self.knobs), **extra}
        groups = knobs.pop("groups", GroupPolicy())  # a knob: GroupPolicy(...), or None for none
        return SimConfig(self.gpu, self.model, dep.sizes, dep.lending, route_by_size=dep.route_by_size,
                         round_robin=dep.round_robin, pipeline=dep.pipeline,
                         groups=groups if dep.groups else None, v0_scheduler=dep.v0, **knobs)


def resolve_gpu(name: str) -> GpuSpec:
    if name == "cpu":
        from infinite.sim.cpu import cpu_spec

        return cpu_spec()
    return gpu_spec(name)


def load_scale(gpu: GpuSpec, model: ModelSpec) -> float:
    """How much faster than Llama2-7B on an A100 a GPU serves ``model``: the generated traces' rates
    scale with it, so every setup is loaded about as much (decode is bound by memory bandwidth)."""
    a100, l7 = GPUS["a100"], MODELS["llama2-7b"]
    return (gpu.hbm_bw / a100.hbm_bw) * (l7.weight_bytes / model.weight_bytes)


def make_trace(name: str, setup: Setup, duration_s: float, seed: int, rate: float | None = None,
               ) -> tuple[list[TraceRequest], dict]:
    return resolve_trace(name, duration_s, seed, load_scale(setup.gpu, setup.model), setup.gpus, rate)


def run_deployment(setup: Setup, dep: Deployment, trace: list[TraceRequest], **extra: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = simulate(trace, setup.config(dep, **extra))
    out = summarize(res)
    out.update(policy=dep.policy, deployment=dep.describe(), wall_s=time.perf_counter() - t0)
    return out


def run_policy(policy: str, setup: Setup, trace: list[TraceRequest], **extra: Any) -> dict[str, Any]:
    """Simulate ``policy``; best-static simulates every candidate mix and keeps the best: most
    throughput among the mixes that can hold every request of the trace (if any can)."""
    if policy != "best-static":
        return run_deployment(setup, deployment(policy, setup.gpu, setup.model, setup.gpus), trace, **extra)
    tried = [run_deployment(setup, d, trace, **extra)
             for d in best_static_candidates(setup.gpu, setup.model, setup.gpus)]
    longest = max((t.prompt_len + t.output_len for t in trace), default=0)
    whole = [r for r in tried if r["capacity_tokens"] >= longest]
    best = max(whole or tried, key=lambda r: (r["throughput_tokens_per_s"], r["requests_completed"]))
    best = dict(best)
    best["candidates"] = {r["deployment"]: round(r["throughput_tokens_per_s"], 1) for r in tried}
    best["wall_s"] = sum(r["wall_s"] for r in tried)
    return best


def with_knobs(setup: Setup, **knobs: Any) -> Setup:
    return replace(setup, knobs=tuple(sorted({**dict(setup.knobs), **knobs}.items())))


def setup_from(gpu: str, model: str, gpus: int, **knobs: Any) -> Setup:
    return Setup(resolve_gpu(gpu), model_spec(model), gpus, tuple(sorted(knobs.items())))
