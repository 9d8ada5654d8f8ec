"""Where the gManager's placement rounds run: a process of their own, or the calling thread.

A round at 64 instances and 10K requests is pure Python for up to its whole
budget (PlanBudget). On a thread of rank 0 it would hold the GIL that rank 0's
event loop (HTTP, routing, heartbeats) and its own compute thread need, and
the working copies it allocates trigger full garbage collections there; in a
process of its own it costs rank 0 only the snapshot's encoding (a few ms at
that size: msgspec, in C) and the moves coming back. ``plan_round`` is the
round itself, the same function wherever it runs; ``Planner`` runs it in a
spawned worker once a view holds ``WORKER_MIN_REQUESTS`` requests (smaller
ones plan in a millisecond or two on the calling thread), or if the worker
cannot be had.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import msgspec

from infinite.cluster.cost_model import CostModel
from infinite.cluster.placement import ClusterSnapshot, Move, PlacementConfig, PlanBudget, plan

log = logging.getLogger(__name__)

__all__ = ["RoundResult", "plan_round", "Planner"]

# (moves, where the search was cut or None, whether the budget ended the round)
RoundResult = tuple[list[Move], "tuple[int, str] | None", bool]


def plan_round(snapshot: bytes, cost: CostModel, cfg: PlacementConfig, budget_s: float,
               resume: tuple[int, str] | None) -> RoundResult:
    """Decode the snapshot (msgpack) and plan on it for at most ``budget_s`` from now."""
    deadline = time.monotonic() + budget_s
    snap = msgspec.msgpack.decode(snapshot, type=ClusterSnapshot)
    budget = PlanBudget(lambda: time.monotonic() >= deadline, resume=resume)
    moves = plan(snap, cost, cfg, budget)
    return moves, budget.cut, budget.stopped


def _settle() -> None:
    """The worker's start-up heap (the package's imports, torch among them) out of the collector's
    sight, as a rank's (cluster.rank.settle_heap): a full collection would otherwise walk it in
    the middle of a round. Ctrl-C is for rank 0, which stops the worker itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.collect()
    gc.freeze()


MAX_RESTARTS = 3  # a worker that keeps dying is not restarted again: rounds then run on rank 0


WORKER_MIN_REQUESTS = 512  # smaller views plan in a millisecond or two: no process is worth it


class Planner:
    """Runs each round in the worker process once a view is large enough to make it worth one
    (``min_requests``): it is spawned on the first such round, on the round's thread."""

    def __init__(self, min_requests: int = WORKER_MIN_REQUESTS) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self.min_requests = min_requests
        self.restarts = 0

    @property
    def in_process(self) -> bool:
        """Whether rounds run in a worker process (else on the calling thread)."""
        return self._pool is not None

    def start(self) -> None:
        """Spawn the worker and wait until it answers (seconds: a fresh interpreter imports the
        package; fork would copy rank 0's threads and model). Call it off the event loop."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_settle)
            self._pool.submit(int).result()

    def run(self, snap: ClusterSnapshot, cost: CostModel, cfg: PlacementConfig, budget_s: float,
            resume: tuple[int, str] | None) -> RoundResult:
        if self._pool is None and len(snap.requests) >= self.min_requests and self.restarts <= MAX_RESTARTS:
            t0 = time.monotonic()
            try:
                self.start()
            except Exception:  # noqa: BLE001 - no worker to be had: rounds stay here
                log.exception("no placement worker; rounds run on rank 0")
                self.close()
                self.restarts = MAX_RESTARTS + 1
            budget_s = max(0.0, budget_s - (time.monotonic() - t0))
        data = msgspec.msgpack.encode(snap)
        if self._pool is None:
            return plan_round(data, cost, cfg, budget_s, resume)
        try:
            return self._pool.submit(plan_round, data, cost, cfg, budget_s, resume).result()
        except BrokenProcessPool:  # the worker died (killed, out of memory)
            self.close()
            self.restarts += 1
            log.error("the placement worker died; this round runs on rank 0%s",
                      "" if self.restarts > MAX_RESTARTS else ", a new worker the next one")
            if self.restarts <= MAX_RESTARTS:
                try:
                    self.start()
                except Exception:  # noqa: BLE001 - no worker to be had: rounds stay on rank 0
                    log.exception("no placement worker")
                    self.close()
                    self.restarts = MAX_RESTARTS + 1
            return plan_round(data, cost, cfg, budget_s, resume)

    def close(self) -> None:
        """Stop the worker (waits for a round in flight: at most the budget)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
