"""The gManager's inputs to ``sp_policy.choose_group``: the policy from the EngineConfig, and the
instances as group candidates. Pure: heartbeat stats in, plain values out (the gManager calls it
under its lock; tests drive it with made-up stats). The cost model is the gManager's own: its
prefill rates come from the start-up probe (``cost_probe.measure_cost``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from infinite.cluster import messages as M
from infinite.cluster.sp_policy import Candidate, GroupPolicy

__all__ = ["group_candidates", "group_policy"]


def group_policy(config) -> GroupPolicy:
    """The EngineConfig's group knobs as the policy (``own_tokens``: the share of a member's step
    kept for its own requests, a quarter of the budget). Off without lending (a member keeps its
    segment as blocks lent to the request) and for tensor-parallel instances (a round's forward
    would need the instance's followers, which run only what its steps broadcast)."""
    return GroupPolicy(enabled=config.prefill_groups and config.enable_lending and config.tensor_parallel_size == 1,
                       min_prompt_tokens=config.group_min_prompt_tokens,
                       min_speedup=config.group_min_speedup, min_efficiency=config.group_min_efficiency,
                       own_tokens=config.max_num_batched_tokens // 4)


def group_candidates(stats: Mapping[int, M.InstanceStats], serving: Iterable[int], lendable: Mapping[int, int],
                     in_group: set[int]) -> list[Candidate]:
    """Serving instances as ``choose_group`` sees them. ``lendable``: blocks each may lend now
    (``LendingPolicy.lendable``: what a member may hold for the group, as blocks lent to the
    request; the home's share of free blocks beyond its demand, within the same cap). An instance
    is idle when it is in no group and queues nothing; one that borrows may not lend (roles)."""
    out = []
    for r in sorted(serving):
        s = stats.get(r)
        if s is None:
            continue
        out.append(Candidate(rank=r, batch_size=s.num_running, context_tokens=s.tokens_held,
                             step_tokens=s.num_running, room_blocks=max(0, lendable.get(r, 0)),
                             idle=r not in in_group and s.num_waiting == 0,
                             may_lend=s.borrowed_blocks == 0, may_borrow=s.lent_blocks == 0))
    return out

