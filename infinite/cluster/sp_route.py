"""The gManager's inputs to ``sp_policy.choose_group``: instances as group candidates, the runtime's
cost model for prefill, and the shape of what a round moves. Pure: heartbeat stats in, plain
values out (the gManager calls it under its lock; tests drive it with made-up stats).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from infinite.cluster import messages as M
from infinite.cluster.cost_model import CostModel
from infinite.cluster.sp_policy import Candidate, GroupPolicy

__all__ = ["group_candidates", "prefill_cost", "group_policy"]


def group_policy(config) -> GroupPolicy:
    """The EngineConfig's group knobs as the policy (``own_tokens``: the share of a member's step
    kept for its own requests, a quarter of the budget). Off for tensor-parallel instances: a
    round's forward would need the instance's followers, which run only what its steps broadcast."""
    return GroupPolicy(enabled=config.prefill_groups and config.tensor_parallel_size == 1,
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


def prefill_cost(cost: CostModel) -> CostModel:
    """The cost model with its prefill terms from the runtime's own fit: a prompt token's
    non-attention work is a request's share of a step (``per_request_s``), a (query, key) pair
    is one context token read (``per_context_token_s``): decode's rates, an approximation of a
    prompt's (whose tokens share their weight reads)."""
    return replace(cost, prefill_token_s=cost.per_request_s, prefill_pair_s=cost.per_context_token_s)
