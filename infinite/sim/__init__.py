"""Cluster simulator driving the real placement with the cost model."""

from infinite.sim.simulator import SimConfig, SimResult, TraceRequest, compare_lending, mixed_trace, simulate

__all__ = ["SimConfig", "SimResult", "TraceRequest", "compare_lending", "mixed_trace", "simulate"]
