"""Cluster simulator: the project's scheduler, lending policy and placement over roofline costs.

``python -m infinite.sim --help``; docs/sim.md.
"""

from infinite.sim.engine import SimConfig, SimResult, simulate
from infinite.sim.traces import TraceRequest

__all__ = ["SimConfig", "SimResult", "TraceRequest", "simulate"]
