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
from dataclasses import dataclass, field

from infinite.kv.prefix import BlockHash
from infinite.kv.rmanager import RManager
from infinite.runtime.request import Request


@dataclass(frozen=True)
class PrefixHit:
    """What the prefix cache offers a waiting request (looked up, nothing taken yet)."""

    names: list[BlockHash] = field(default_factory=list)  # names of the blocks a hit may cover
    local: int = 0  # blocks of a run from the start cached in this pool
    shared: int = 0  # of those, referenced now: taking them needs no free block
    remote: tuple[int, int] | None = None  # (holder, blocks) the gManager saw cached on another instance


NO_HIT = PrefixHit()


def max_hit_blocks(req: Request, block_size: int) -> int:
    """Blocks of a request the prefix cache may supply: full blocks before its last token (that one
    is always computed: its logits are sampled), and before the first prompt position whose logprob
    a request that asked for them still lacks (it computes what it needs)."""
    limit = req.num_tokens - 1
    if req.num_prompt_logprobs_missing:
        limit = min(limit, len(req.prompt_logprobs))
    return max(0, limit) // block_size


class BlockAllocator(ABC):
    rm: RManager  # the instance's block accounting (its pool and its requests' tables)

    @property
    def block_size(self) -> int:
        return self.rm.block_size

    def lookup(self, req: Request) -> PrefixHit:
        """The cached prefix a waiting request could start from (no prefix cache: none)."""
        return NO_HIT

    def start(self, req: Request, hit: PrefixHit) -> int | None:
        """Give a waiting request blocks for all its tokens, starting from ``hit``'s cached blocks.
        All or nothing: None (and no change) when the blocks cannot be had now; else how many of
        its tokens already have their KV (whole cached blocks)."""
        return 0 if self.grow(req, req.num_tokens) else None

    def cache_computed(self, req: Request) -> None:
        """The request's KV advanced (``num_computed_tokens``): offer its newly full blocks to the
        prefix cache. O(1) unless a block filled."""

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
    """One instance: blocks come from its own pool only (and its prefix cache, when on)."""

    def __init__(self, rm: RManager) -> None:
        self.rm = rm

    def lookup(self, req: Request) -> PrefixHit:
        if not self.rm.caching:
            return NO_HIT
        n = max_hit_blocks(req, self.rm.block_size)
        if n == 0:
            return NO_HIT
        names = req.block_names(self.rm.block_size, n)[:n]
        local, shared = self.rm.match(names)
        return PrefixHit(names, local, shared, req.prefix_hint)

    def start(self, req: Request, hit: PrefixHit) -> int | None:
        if not hit.local:
            return super().start(req, hit)
        try:  # the cached blocks first (fewer if some were evicted since the lookup), then growth
            got = self.rm.start(req.request_id, hit.names[:hit.local], hit.local)
        except MemoryError:
            return None
        if not self.grow(req, req.num_tokens):
            self.release(req)
            return None
        return got * self.rm.block_size

    def cache_computed(self, req: Request) -> None:
        rm = self.rm
        full = req.num_computed_tokens // rm.block_size
        if rm.caching and full > rm.num_offered(req.request_id):
            rm.cache_computed(req.request_id, req.block_names(rm.block_size, full), full)

    def grow(self, req: Request, num_tokens: int) -> bool:
        need = self.rm.num_needed(req.request_id, num_tokens)
        if not need:  # most steps of most requests: the last block has room
            return True
        if need > self.rm.num_free:
            return False
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
