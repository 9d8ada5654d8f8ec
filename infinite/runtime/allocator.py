"""BlockAllocator: how the scheduler gets KV blocks for a request, and gives them back.

The scheduler decides *who* runs; the allocator decides *where their blocks
come from*. One instance takes them from its own pool (``LocalAllocator``); a
cluster instance also borrows what its pool lacks from creditors
(``infinite.cluster.allocator.ClusterAllocator``). The scheduler sees only
this interface, so the same scheduling code runs alone, in a cluster and in
the simulator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from infinite.kv.rmanager import RManager
from infinite.runtime.request import Request


class BlockAllocator(ABC):
    rm: RManager  # the instance's block accounting (its pool and its requests' tables)

    @property
    def block_size(self) -> int:
        return self.rm.block_size

    @abstractmethod
    def grow(self, req: Request, num_tokens: int) -> bool:
        """Make ``req``'s block table hold ``num_tokens`` tokens. All or nothing: False (and
        no change) when the blocks cannot be had now."""

    @abstractmethod
    def release(self, req: Request) -> None:
        """Give back every block of ``req``, wherever it lives."""

    @abstractmethod
    def free_blocks(self) -> int:
        """Blocks an admission may count on now."""

    @abstractmethod
    def capacity_blocks(self) -> int:
        """The most blocks one request can ever hold (judged on empty pools)."""

    @abstractmethod
    def capacity_reason(self) -> str:
        """What sets capacity_blocks, and the setting that raises it (for error messages)."""


class LocalAllocator(BlockAllocator):
    """One instance: blocks come from its own pool only."""

    def __init__(self, rm: RManager) -> None:
        self.rm = rm

    def grow(self, req: Request, num_tokens: int) -> bool:
        need = self.rm.num_needed(req.request_id, num_tokens)
        if need > self.rm.num_free:
            return False
        if need:
            self.rm.allocate(req.request_id, need)
        return True

    def release(self, req: Request) -> None:
        self.rm.free_request(req.request_id)

    def free_blocks(self) -> int:
        return self.rm.num_free

    def capacity_blocks(self) -> int:
        return self.rm.num_blocks

    def capacity_reason(self) -> str:
        return f"one instance's pool of {self.rm.num_blocks} blocks (num_kv_blocks / --num-kv-blocks)"
