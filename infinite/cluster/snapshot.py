"""The placement's input and output: a snapshot of the cluster and the moves planned on it.

Plain frozen dataclasses with their validation, so that the gManager, the simulator
and tests build the same states, and a malformed state fails where it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RequestState", "InstanceState", "ClusterSnapshot", "Move"]


@dataclass(frozen=True)
class RequestState:
    """Where one running request's KV blocks are: ``blocks[instance] = count``."""

    request_id: str
    home: int
    context_len: int  # tokens
    blocks: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise TypeError(f"RequestState.request_id must be a non-empty str, got {self.request_id!r}")
        if self.context_len < 0:
            raise ValueError(f"RequestState {self.request_id}: context_len must be >= 0, got {self.context_len}")
        for inst, n in self.blocks.items():
            if n < 0:
                raise ValueError(f"RequestState {self.request_id}: negative block count {n} on instance {inst}")

    @property
    def total_blocks(self) -> int:
        return sum(self.blocks.values())

    @property
    def local_blocks(self) -> int:
        return self.blocks.get(self.home, 0)


@dataclass(frozen=True)
class InstanceState:
    """One instance as the last heartbeat saw it.

    ``waiting_blocks`` counts the blocks that requests queued at this
    instance (or running ones stalled for memory) need to proceed;
    ``waiting_requests`` says how many requests that demand belongs to (0
    with a positive demand counts as one) so that the throughput estimate
    knows how much batch the demand is worth.
    """

    rank: int
    total_blocks: int
    free_blocks: int
    lent_blocks: int
    batch_size: int
    waiting_blocks: int
    alive: bool = True
    waiting_requests: int = 0
    borrowed_blocks: int = 0  # blocks its requests hold on others (it is a debtor: it lends nothing)

    def __post_init__(self) -> None:
        if self.total_blocks < 0:
            raise ValueError(f"instance {self.rank}: total_blocks must be >= 0, got {self.total_blocks}")
        if not 0 <= self.free_blocks <= self.total_blocks:
            raise ValueError(
                f"instance {self.rank}: free_blocks {self.free_blocks} outside [0, total_blocks={self.total_blocks}]"
            )
        if not 0 <= self.lent_blocks <= self.total_blocks - self.free_blocks:
            raise ValueError(
                f"instance {self.rank}: lent_blocks {self.lent_blocks} outside [0, used={self.total_blocks - self.free_blocks}]"
            )
        if min(self.batch_size, self.waiting_blocks, self.waiting_requests, self.borrowed_blocks) < 0:
            raise ValueError(
                f"instance {self.rank}: batch_size, waiting_blocks, waiting_requests, borrowed_blocks must be >= 0"
            )

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks


@dataclass(frozen=True)
class ClusterSnapshot:
    instances: tuple[InstanceState, ...]
    requests: tuple[RequestState, ...]
    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"ClusterSnapshot.block_size must be >= 1, got {self.block_size}")
        ranks = [i.rank for i in self.instances]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ClusterSnapshot: duplicate instance ranks {sorted(ranks)}")
        known = set(ranks)
        held = {r: 0 for r in ranks}
        ids = set()
        for req in self.requests:
            if req.request_id in ids:
                raise ValueError(f"ClusterSnapshot: duplicate request id {req.request_id!r}")
            ids.add(req.request_id)
            if req.home not in known:
                raise ValueError(f"request {req.request_id}: home {req.home} is not an instance")
            for inst, n in req.blocks.items():
                if inst not in known:
                    raise ValueError(f"request {req.request_id}: blocks on unknown instance {inst}")
                held[inst] += n
        for inst in self.instances:
            if held[inst.rank] > inst.used_blocks:
                raise ValueError(
                    f"instance {inst.rank}: requests hold {held[inst.rank]} blocks there but only "
                    f"{inst.used_blocks} are in use"
                )

    def instance(self, rank: int) -> InstanceState:
        for inst in self.instances:
            if inst.rank == rank:
                return inst
        raise KeyError(f"no instance with rank {rank}")


@dataclass(frozen=True)
class Move:
    """Migrate ``num_blocks`` of a request's blocks from ``src`` to ``dst``."""

    request_id: str
    src: int
    dst: int
    num_blocks: int

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"Move {self.request_id}: num_blocks must be >= 1, got {self.num_blocks}")
        if self.src == self.dst:
            raise ValueError(f"Move {self.request_id}: src and dst are both {self.src}")
