"""rManager: the block accounting of one instance.

Thread-safe: in a cluster the compute thread (its own requests) and the
handlers of other ranks' calls (blocks lent to them) change it concurrently.

Every block of the local pool is in exactly one state: free, used by a local
request, or lent to a remote debtor's request. A local request's block table
is an ordered list of (instance, block): its rBlocks, oldest first, which may
point into other instances' pools (borrowed blocks).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Callable
from typing import NamedTuple

from infinite.kv.block_pool import BlockPool


class RBlock(NamedTuple):
    instance: int
    block: int


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class RManager:
    def __init__(self, rank: int, num_blocks: int, block_size: int) -> None:
        self._lock = threading.RLock()
        self.rank = rank
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.tables: dict[str, list[RBlock]] = {}  # local requests -> rBlocks, oldest first
        self.lent: dict[tuple[int, str], list[int]] = {}  # (debtor rank, request) -> local blocks
        self._num_lent = 0
        self._num_borrowed = 0
        # Change tracking for the engine's persistent batch (infinite.runtime.input_batch): every
        # request whose table changed since the last take_changed(), and an epoch per table that moves
        # on every change other than an append (so a mirror knows when appending is not enough).
        self._changed: set[str] = set()
        self._epoch: dict[str, int] = {}
        self._epochs = itertools.count(1)

    # ---- local requests -------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @_locked
    def table(self, request_id: str) -> list[RBlock]:
        return list(self.tables.get(request_id, ()))

    def _table_for(self, request_id: str) -> list[RBlock]:
        table = self.tables.get(request_id)
        if table is None:
            table = self.tables[request_id] = []
            self._epoch[request_id] = next(self._epochs)
        return table

    def _moved(self, request_id: str) -> None:
        """A change other than an append: mirrors of the table must rebuild it."""
        self._epoch[request_id] = next(self._epochs)
        self._changed.add(request_id)

    @_locked
    def num_table_blocks(self, request_id: str) -> int:
        return len(self.tables.get(request_id, ()))

    @_locked
    def take_changed(self) -> set[str]:
        """Requests whose tables changed since the last call (appended, replaced, shrunk or freed)."""
        out, self._changed = self._changed, set()
        return out

    @_locked
    def live_table(self, request_id: str) -> tuple[list[RBlock] | None, int]:
        """The request's table itself (not a copy: read it, never change it) and its epoch; (None, 0)
        when it has none. The list stays the request's until its epoch moves."""
        table = self.tables.get(request_id)
        return (table, self._epoch[request_id]) if table is not None else (None, 0)

    @_locked
    def num_needed(self, request_id: str, num_tokens: int) -> int:
        """More local blocks the request needs to hold num_tokens tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.tables.get(request_id, ())))

    @_locked
    def allocate(self, request_id: str, n: int) -> list[RBlock]:
        new = [RBlock(self.rank, b) for b in self.pool.allocate(n)]
        self._table_for(request_id).extend(new)
        self._changed.add(request_id)
        return new

    @_locked
    def free_tail(self, request_id: str, n: int) -> None:
        """Give back the request's n newest blocks (local ones), undoing a growth that failed."""
        if n <= 0:
            return
        table = self.tables[request_id]
        tail = table[-n:]
        if any(r.instance != self.rank for r in tail):
            raise RuntimeError("free_tail only undoes local allocations")
        del table[-n:]
        self._moved(request_id)
        if not table:
            del self.tables[request_id]
            self._epoch.pop(request_id, None)
        self.pool.free([r.block for r in tail])

    @_locked
    def take_free(self, n: int) -> list[int]:
        """Blocks for an incoming copy: in use, in no table until replace_blocks puts them there."""
        return self.pool.allocate(n)

    @_locked
    def return_free(self, blocks: list[int]) -> None:
        """Undo take_free (the copy never came)."""
        self.pool.free(blocks)

    @_locked
    def append_remote(self, request_id: str, refs: list[RBlock], at: int | None = None) -> None:
        """Record blocks creditors reserved for this request, at the end of its table or at
        logical position ``at`` (before the blocks that follow it)."""
        table = self._table_for(request_id)
        if at is not None and at != len(table):
            self._moved(request_id)
        table[len(table) if at is None else at:len(table) if at is None else at] = refs
        self._changed.add(request_id)
        self._num_borrowed += len(refs)

    @_locked
    def replace_blocks(self, request_id: str, old: list[RBlock], new: list[RBlock]) -> None:
        """After a migration: swap old refs for new ones at the same logical positions."""
        table = self.tables[request_id]
        self._moved(request_id)
        where = {ref: i for i, ref in enumerate(table)}
        for o, n in zip(old, new, strict=True):
            table[where[o]] = n
            self._num_borrowed += (n.instance != self.rank) - (o.instance != self.rank)

    @_locked
    def swap_out(self, request_id: str, old: list[RBlock], new: list[RBlock]) -> None:
        """Migration done: the request's local blocks `old` now live at `new`; free the local ones."""
        for o in old:
            if o.instance != self.rank:
                raise RuntimeError(f"swap_out moves local blocks only, got {o}")
        self.replace_blocks(request_id, old, new)
        self.pool.free([o.block for o in old])

    @_locked
    def placement(self) -> dict[str, dict[int, int]]:
        """Per local request: how many of its blocks sit on each instance."""
        out: dict[str, dict[int, int]] = {}
        for rid, table in self.tables.items():
            counts: dict[int, int] = {}
            for ref in table:
                counts[ref.instance] = counts.get(ref.instance, 0) + 1
            out[rid] = counts
        return out

    @_locked
    def free_request(self, request_id: str) -> list[RBlock]:
        """Free the request's local blocks; return its remote refs for the caller to release."""
        table = self.tables.pop(request_id, [])
        self._epoch.pop(request_id, None)
        self._changed.add(request_id)
        local = [r.block for r in table if r.instance == self.rank]
        remote = [r for r in table if r.instance != self.rank]
        self.pool.free(local)
        self._num_borrowed -= len(remote)
        return remote

    # ---- blocks lent to remote debtors -----------------------------------
    @_locked
    def lend(self, debtor: int, request_id: str, n: int) -> list[int]:
        blocks = self.pool.allocate(n)
        self.lent.setdefault((debtor, request_id), []).extend(blocks)
        self._num_lent += n
        return blocks

    @_locked
    def try_lend(self, debtor: int, request_id: str, n: int, lendable: Callable[[RManager], int]) -> list[int]:
        """Lend n blocks if ``lendable(self)`` (read under the same lock) allows it; else []."""
        if n <= 0 or n > lendable(self):
            return []
        return self.lend(debtor, request_id, n)

    @_locked
    def release_lent(self, debtor: int, request_id: str, blocks: list[int] | None = None) -> int:
        """Return lent blocks (all of them for the request when blocks is None) to the pool."""
        held = self.lent.get((debtor, request_id), [])
        drop = list(held) if blocks is None else blocks
        missing = set(drop) - set(held)
        if missing:
            raise RuntimeError(f"blocks {sorted(missing)} are not lent to {debtor}/{request_id}")
        keep = [b for b in held if b not in set(drop)]
        if keep:
            self.lent[(debtor, request_id)] = keep
        else:
            self.lent.pop((debtor, request_id), None)
        self.pool.free(drop)
        self._num_lent -= len(drop)
        return len(drop)

    # ---- accounting ------------------------------------------------------
    @property
    def num_lent(self) -> int:
        return self._num_lent

    @property
    def num_borrowed(self) -> int:
        return self._num_borrowed

    @property
    def num_used(self) -> int:
        """Local pool blocks used by local requests."""
        return self.pool.num_blocks - self.pool.num_free - self._num_lent

    @_locked
    def walk(self) -> dict[str, int]:
        """Counts found by walking the block tables and the lent lists, not derived from the free
        count: a leak check compares them with the pool's free list, three independent tallies."""
        return {
            "table_blocks": sum(len(t) for t in self.tables.values()),
            "lent_entries": sum(len(b) for b in self.lent.values()),
        }

    @_locked
    def release_debtor(self, debtor: int) -> int:
        """Return every block lent to ``debtor`` (it died, or left owing them) to the pool."""
        n = 0
        for key in [k for k in self.lent if k[0] == debtor]:
            n += self.release_lent(debtor, key[1])
        return n

    @_locked
    def stats(self) -> dict[str, int]:
        return {
            "rank": self.rank,
            "total_blocks": self.num_blocks,
            "free_blocks": self.num_free,
            "used_blocks": self.num_used,
            "lent_blocks": self.num_lent,
            "borrowed_blocks": self.num_borrowed,
        }
