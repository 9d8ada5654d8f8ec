"""The free list of one instance's KV pool: it only counts and hands out block ids."""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks
        # Moves on every allocate and free that changes the pool: of two readings of its counts,
        # the one with the larger version is the newer (the gManager keeps the newer of a
        # creditor's heartbeat and the counts a reservation's reply carries).
        self.version = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise MemoryError(f"KV pool exhausted: asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._is_free[b] = False
        if out:
            self.version += 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._is_free[b]:
                raise RuntimeError(f"double free of KV block {b}")
            self._is_free[b] = True
            self._free.append(b)
        if blocks:
            self.version += 1
