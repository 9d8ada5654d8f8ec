"""ClusterAllocator: a cluster instance's blocks come from its own pool first, and what the
pool lacks is borrowed from creditors through the gManager (all or nothing)."""

from __future__ import annotations

import logging

from infinite.cluster import messages as M
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.transport import Transport, wait_all
from infinite.kv.rmanager import RBlock, RManager
from infinite.runtime.allocator import LocalAllocator
from infinite.runtime.request import Request

log = logging.getLogger(__name__)


class ClusterAllocator(LocalAllocator):
    def __init__(self, rm: RManager, transport: Transport, policy: LendingPolicy, capacity_blocks: int,
                 timeout_s: float = 30.0) -> None:
        super().__init__(rm)
        self.transport = transport
        self.policy = policy
        self.capacity = capacity_blocks
        self.timeout_s = timeout_s
        self.borrowable = 0  # blocks the rest of the cluster can still lend us (the gManager's last word)
        self.lost: set[int] = set()  # ranks that died: their blocks went with them, nothing to release there

    def capacity_blocks(self) -> int:
        return self.capacity

    def free_blocks(self) -> int:
        return self.rm.num_free + (self.borrowable if self.policy.enabled else 0)

    def grow(self, req: Request, num_tokens: int) -> bool:
        rid = req.request_id
        need = self.rm.num_needed(rid, num_tokens)
        if need == 0:
            return True
        local = min(need, self.rm.num_free)
        if local:
            try:
                self.rm.allocate(rid, local)
            except MemoryError:  # a concurrent lend took them
                return False
        rest = need - local
        if rest == 0:
            return True
        refs = self._borrow(rid, rest) if self.policy.enabled else []
        if not refs:
            # All or nothing: a request left waiting must not sit on blocks it cannot use.
            self.rm.free_tail(rid, local)
            self.borrowable = 0
            return False
        self.rm.append_remote(rid, refs)
        self.borrowable = max(0, self.borrowable - len(refs))
        return True

    def _borrow(self, request_id: str, n: int) -> list[RBlock]:
        try:
            got = self.transport.borrow(M.Borrow(self.rm.rank, request_id, n), timeout=self.timeout_s).wait()
        except Exception:  # noqa: BLE001 - rank 0 unreachable: behave as a lone instance
            log.warning("rank %d: borrowing %d blocks for %s failed", self.rm.rank, n, request_id, exc_info=True)
            return []
        return [RBlock(c, b) for c, b in got.blocks]

    def release(self, req: Request) -> None:
        remote = self.rm.free_request(req.request_id)
        self.give_back(req.request_id, remote)

    def give_back(self, request_id: str, refs: list[RBlock]) -> None:
        """Release remote blocks on their creditors, in parallel, and wait: a request's end is
        reported only once its blocks are free everywhere."""
        by_creditor: dict[int, list[int]] = {}
        for ref in refs:
            if ref.instance not in self.lost:
                by_creditor.setdefault(ref.instance, []).append(ref.block)
        ranks = list(by_creditor)
        futs = [self.transport.release(c, M.Release(self.rm.rank, request_id, by_creditor[c]), timeout=self.timeout_s)
                for c in ranks]

        def lost(i: int, err: BaseException) -> None:  # that creditor is gone; its blocks went with it
            log.warning("release of %d blocks on rank %d failed: %s", len(by_creditor[ranks[i]]), ranks[i], err)

        wait_all(futs, on_error=lost)
