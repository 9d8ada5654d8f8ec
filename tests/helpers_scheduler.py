"""Driving a Scheduler as the engine would, without a model: the scheduler and prefix-cache tests share it."""

from __future__ import annotations

import random
from collections.abc import Callable

from infinite.runtime.request import Request, Status
from infinite.runtime.scheduler import Scheduler


def run_step(sched: Scheduler):
    """Apply a schedule as the engine would: advance computed tokens (offering filled blocks to the
    prefix cache), append a token when caught up, finish at max_tokens."""
    batch = sched.schedule()
    for r, n in zip(batch.requests, batch.num_new_tokens):
        r.num_computed_tokens += n
        assert r.num_computed_tokens <= r.num_tokens
        sched.allocator.cache_computed(r)
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.max_tokens:
                sched.finish(r)
    return batch


def run_with_aborts(sched: Scheduler, reqs: list[Request], rng: random.Random,
                    after_step: Callable[[], None] = lambda: None, max_steps: int = 3000) -> set[str]:
    """Steps until nothing is left, aborting a random live request with probability 0.02 before a
    step; ``after_step`` checks invariants. The ids of the aborted requests."""
    aborted: set[str] = set()
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        if rng.random() < 0.02:
            live = [r for r in reqs if r.status is not Status.FINISHED]
            if live:
                victim = rng.choice(live)
                sched.finish(victim)
                aborted.add(victim.request_id)
        run_step(sched)
        after_step()
    return aborted
