"""An instance's side of membership: rank 0's cluster views, applied between two steps.

A view says which ranks serve, which drain, which were lost and which left
(infinite.cluster.membership). When one arrives the instance, on its compute
thread (so never in the middle of a step):

* for a rank newly *lost*: returns every block it had lent to that rank's
  requests, forgets the blocks its own requests held there (gone with it), and
  recomputes those requests — preempted, then prefilled again from prompt and
  generated tokens, with their other blocks freed;
* for a rank newly *leaving*: recomputes its requests that hold blocks there,
  releasing those blocks back to it, so that it can drain;
* sets the capacity of one request to what the serving ranks can hold, and ends
  the requests that no longer fit anywhere with a ``rank_lost`` error instead of
  letting them wait forever;
* if the view says this rank itself is gone, it was fenced off: it stops.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from infinite.cluster import messages as M
from infinite.cluster import recovery
from infinite.cluster.membership import view_actions, view_states
from infinite.cluster.policy import LendingPolicy
from infinite.kv.rmanager import RManager

log = logging.getLogger(__name__)


class ViewHost(Protocol):
    """What of an Instance the view touches (the Instance owns an InstanceView, so no import back)."""

    rank: int
    policy: LendingPolicy
    rm: RManager
    allocator: Any  # ClusterAllocator: .lost, .capacity, .other_pools
    creditor: Any  # Creditor: .forget_debtor
    engine: Any  # LLMEngine: .scheduler, .abort_request, .block_size

    def fence(self, reason: str) -> None: ...

    def send_failures(self, failures: list[M.RequestFailure]) -> None: ...


class InstanceView:
    def __init__(self, instance: ViewHost) -> None:
        self.instance = instance
        self.states: dict[int, str] = {}
        self.epoch = -1
        self.serving: list[int] = []
        self._pending: M.ClusterView | None = None
        self._lock = threading.Lock()
        self.recomputed = 0  # requests recomputed here because a rank holding their blocks left
        self.failed = 0  # requests ended because the cluster can no longer hold them

    def offer(self, view: M.ClusterView) -> bool:
        """Any thread: keep the newest view for the next apply(); True if it is news."""
        with self._lock:
            newest = self._pending.epoch if self._pending is not None else self.epoch
            if view.epoch <= newest:
                return False
            self._pending = view
            return True

    def apply(self) -> None:
        """Compute thread, between two steps."""
        with self._lock:
            view, self._pending = self._pending, None
        if view is None or view.epoch <= self.epoch:
            return
        inst = self.instance
        new = view_states(view.serving, view.draining, view.lost, view.left)
        lost, leaving = view_actions(self.states, new)
        self.states, self.epoch, self.serving = new, view.epoch, list(view.serving)
        if new.get(inst.rank) in ("lost", "left"):
            inst.fence(f"rank 0 declared this rank {new[inst.rank]}")
            return
        lost = [r for r in lost if r != inst.rank]
        leaving = [r for r in leaving if r != inst.rank]  # this rank draining: rank 0 moves its requests
        for r in lost:
            inst.allocator.lost.add(r)
            n = inst.rm.release_debtor(r)
            inst.creditor.forget_debtor(r)
            k = self._recompute_touching(r)
            if n or k:
                log.warning("rank %d: rank %d is gone: took back %d blocks lent to it, recomputing %d requests that "
                            "held blocks there", inst.rank, r, n, k)
        for r in leaving:
            k = self._recompute_touching(r)
            if k:
                log.info("rank %d: rank %d is leaving: recomputing %d requests that held blocks there", inst.rank, r, k)
        self._resize(view)

    def _recompute_touching(self, rank: int) -> int:
        e = self.instance.engine
        ids = set(self.instance.rm.touching(rank))  # from the counts kept on change: no table walked
        n = 0
        for req in list(e.scheduler.running):
            if req.request_id in ids and e.scheduler.recompute(req):
                n += 1
        self.recomputed += n
        return n

    def _resize(self, view: M.ClusterView) -> None:
        """The capacity of one request with the ranks that serve now; end what no longer fits."""
        inst = self.instance
        peers = len(set(view.serving) - {inst.rank})
        cap = recovery.capacity_blocks(inst.policy, inst.rm.num_blocks, peers)
        inst.allocator.capacity = cap
        inst.allocator.other_pools = [inst.rm.num_blocks] * peers
        e = inst.engine
        gone = [r for r, s in self.states.items() if s in ("lost", "left")]
        failures = []
        for req in list(e.scheduler.running) + list(e.scheduler.waiting):
            if not recovery.fits(cap, req.num_prompt_tokens, req.max_tokens, e.block_size):
                need = recovery.blocks_needed(req.num_prompt_tokens, req.max_tokens, e.block_size)
                e.abort_request(req.request_id)
                failures.append(M.RequestFailure(req.request_id, recovery.no_room_message(req.request_id, need, cap, gone),
                                                 "rank_lost"))
        if failures:
            self.failed += len(failures)
            inst.send_failures(failures)
