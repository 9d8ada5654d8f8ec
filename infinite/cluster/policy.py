"""LendingPolicy: every rule about who may lend KV blocks to whom, and how many, in one place.

The gManager (on-demand borrowing, routing), the front door (a request's
capacity), the placement (periodic moves) and the simulator all ask this one
object, so the rules cannot drift between copies. Pure: plain ints in, plain
ints out, no I/O.

Roles (no debt chains, no cycles): an instance whose requests hold borrowed
blocks is a *debtor* and lends nothing; an instance that lends is a
*creditor* and borrows nothing. So a block is never passed on, and no two
instances ever owe each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infinite.runtime.config import EngineConfig

__all__ = ["LendingPolicy", "Peer"]


@dataclass(frozen=True)
class Peer:
    """What the policy needs to know of an instance (from its last heartbeat)."""

    rank: int
    total: int  # blocks in its pool
    free: int  # blocks free now
    lent: int  # blocks it lends to others
    borrowed: int  # blocks its own requests hold on others
    reserved: int = 0  # free blocks it must keep for its own demand (queued requests, routed prompts)


@dataclass(frozen=True)
class LendingPolicy:
    """The cap protects a creditor's own demand, not its idle memory: a creditor lends free
    blocks beyond what its queue and its running requests' next ``demand_horizon_tokens``
    need (``Peer.reserved``), up to ``max_lend_fraction`` of its pool, so one request on an
    idle cluster can use nearly all of it."""

    enabled: bool = True
    max_lend_fraction: float = 0.95  # a creditor lends at most this share of its pool
    max_remote_fraction: float = 0.5  # throughput moves keep a request's remote share under this
    demand_horizon_tokens: int = 256  # growth of a creditor's running requests it keeps room for
    eager: bool = False  # lend for throughput before remote steps were measured (cost_model.remote_measured)

    def __post_init__(self) -> None:
        for name in ("max_lend_fraction", "max_remote_fraction"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"LendingPolicy.{name} must be in [0, 1], got {v!r}")

    @classmethod
    def from_config(cls, config: EngineConfig, world_size: int) -> LendingPolicy:
        """The policy of a cluster of ``world_size`` instances run with ``config``."""
        return cls(
            enabled=config.enable_lending and world_size > 1,
            max_lend_fraction=config.max_lend_fraction,
            max_remote_fraction=config.max_remote_fraction,
            eager=config.eager_lending,
        )

    # ---- one creditor ---------------------------------------------------------------
    def lend_cap(self, total_blocks: int) -> int:
        """The most blocks an instance may hold for others at once."""
        return math.floor(self.max_lend_fraction * total_blocks) if self.enabled else 0

    def may_lend(self, borrowed: int) -> bool:
        return self.enabled and borrowed == 0

    def may_borrow(self, lent: int) -> bool:
        return self.enabled and lent == 0

    def lendable(self, p: Peer) -> int:
        """Blocks ``p`` may lend now: free beyond its own reserve, within its lend cap."""
        if not self.may_lend(p.borrowed):
            return 0
        return max(0, min(p.free - p.reserved, self.lend_cap(p.total) - p.lent))

    def queue_demand(self, waiting_blocks: Iterable[int], pool_blocks: int) -> int:
        """Blocks an instance keeps for its queue (``waiting_blocks``: each queued request's need,
        in queue order): what its requests need up to the first one its pool cannot hold. That
        one must borrow whatever is kept for it, and admission is first come first served, so
        nothing behind it starts before it: keeping blocks for them only stops this instance
        lending to others, and when every instance's head is that large no one lends to anyone
        (a deadlock the cluster simulator found on long traces). Capped at the pool: keeping
        more than it holds changes nothing."""
        total = 0
        for b in waiting_blocks:
            if b > pool_blocks or total >= pool_blocks:
                break
            total += b
        return min(total, pool_blocks)

    def own_demand(self, waiting_blocks: int, running: list[tuple[int, int, int]], block_size: int) -> int:
        """Blocks an instance keeps for itself: its queue, plus what each running request
        (tokens now, tokens at most, blocks held) needs over the next demand_horizon_tokens."""
        growth = 0
        for tokens, max_tokens, held in running:
            target = min(tokens + self.demand_horizon_tokens, max_tokens)
            growth += max(0, -(-target // block_size) - held)
        return waiting_blocks + growth

    # ---- one request ------------------------------------------------------------------
    def request_capacity(self, home_total: int, other_totals: Iterable[int]) -> int:
        """The most blocks one request homed on a pool of ``home_total`` blocks can ever hold:
        its home's pool plus what every other instance may lend (judged on empty pools, so a
        request that fits waits for memory instead of being rejected)."""
        return home_total + sum(self.lend_cap(t) for t in other_totals)

    def movable(self, local_blocks: int, total_blocks: int) -> int:
        """Blocks of a request a throughput move may still send away: the newest block stays
        home (local-first) and the remote share stays under ``max_remote_fraction``."""
        remote = total_blocks - local_blocks
        cap = math.floor(self.max_remote_fraction * total_blocks) - remote
        return max(0, min(local_blocks - 1, cap)) if self.enabled else 0

    # ---- on-demand borrowing ------------------------------------------------------------
    def borrow_order(self, debtor: int, peers: Sequence[Peer], held: Mapping[int, int]) -> list[tuple[int, int]]:
        """(creditor, lendable) in the order to ask: creditors already holding the request
        first (its remote blocks on as few instances as possible), then the most lendable."""
        cands = [(p.rank, self.lendable(p)) for p in peers if p.rank != debtor]
        cands = [(r, n) for r, n in cands if n > 0]
        cands.sort(key=lambda c: (-(held.get(c[0], 0) > 0), -c[1], c[0]))
        return cands

    def borrow_plan(
        self, debtor: Peer, n: int, peers: Sequence[Peer], held: Mapping[int, int] | None = None
    ) -> list[tuple[int, int]]:
        """How many blocks to take from which creditor so a debtor's request gets ``n`` more:
        all or nothing ([] when the cluster cannot lend that many, or the debtor is a creditor)."""
        if n <= 0 or not self.may_borrow(debtor.lent):
            return []
        out: list[tuple[int, int]] = []
        left = n
        for rank, lendable in self.borrow_order(debtor.rank, peers, held or {}):
            take = min(left, lendable)
            out.append((rank, take))
            left -= take
            if left == 0:
                return out
        return []
