"""Cluster layer: gManager, pure placement, cost model, transport, heartbeats.

Only the pure modules are re-exported here so that importing the package
stays cheap and never pulls in torch.distributed; import the transport and
gManager modules directly.
"""

from infinite.cluster.cost_model import CostModel, StepSample, fit
from infinite.cluster.policy import LendingPolicy, Peer
from infinite.cluster.placement import (
    ClusterSnapshot,
    InstanceState,
    Move,
    PlacementConfig,
    RequestState,
    apply_moves,
    blocked_demand,
    cluster_throughput,
    fits_cluster,
    lost_requests,
    plan,
    route,
)

__all__ = [
    "CostModel",
    "StepSample",
    "fit",
    "LendingPolicy",
    "Peer",
    "ClusterSnapshot",
    "InstanceState",
    "Move",
    "PlacementConfig",
    "RequestState",
    "apply_moves",
    "blocked_demand",
    "cluster_throughput",
    "fits_cluster",
    "lost_requests",
    "plan",
    "route",
]
