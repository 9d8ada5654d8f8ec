"""rManager: the block accounting of one instance.

Thread-safe: in a cluster the compute thread (its own requests) and the
handlers of other ranks' calls (blocks lent to them) change it concurrently.

Every block of the local pool is free (possibly still holding a cached prefix,
``BlockPool``), used by local requests only, or lent (referenced by at least one
remote debtor's request, and maybe by local ones too). With the prefix cache a
block may sit in several tables at once (reference-counted). A local request's
block table is an ordered list of (instance, block): its rBlocks, oldest first,
which may point into other instances' pools (borrowed blocks, or a prefix
cached there).

Every operation costs O(blocks it changes), never O(blocks held): a request of
a million tokens holds ~60K blocks and its creditors lend tens of thousands,
and all of it sits behind one lock that the compute thread, the creditor's
handlers and the heartbeat share. So the counters a heartbeat reports (free,
used, lent, borrowed, and per request how many of its blocks sit on each
instance) are kept on change, and the requests whose counts changed since the
last heartbeat are remembered (``placement_changes``). ``walk()`` is the one
O(tables) tally, kept apart for leak checks.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from infinite.kv.block_pool import BlockPool
from infinite.kv.prefix import BlockHash


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
    def __init__(self, rank: int, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self._lock = threading.RLock()
        self.rank = rank
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.tables: dict[str, list[RBlock]] = {}  # local requests -> rBlocks, oldest first
        self._pos: dict[str, dict[RBlock, int]] = {}  # local requests -> each rBlock's index in its table
        self._held: dict[str, dict[int, int]] = {}  # local requests -> instance -> blocks there
        self._changed: set[str] = set()  # requests whose counts changed since placement_changes
        self._removed: set[str] = set()  # requests gone since placement_changes
        # (debtor rank, request) -> local blocks lent to it, in lending order (a dict as an ordered set)
        self.lent: dict[tuple[int, str], dict[int, None]] = {}
        self._lent_refs: dict[int, int] = {}  # local block -> lent entries holding it (a shared prefix: several)
        self._named: dict[str, int] = {}  # local requests -> table entries offered to the prefix cache so far
        self._num_borrowed = 0
        # For the engine's persistent batch (infinite.runtime.input_batch): the requests whose tables
        # changed since the last take_changed(), and an epoch per table that moves on every change
        # other than an append (a mirror then knows that appending is not enough).
        self._dirty: set[str] = set()
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
        """A copy of the request's whole table: O(its blocks); per-beat and per-step paths use the
        counts (``num_held``, ``held_counts``) instead."""
        return list(self.tables.get(request_id, ()))

    @_locked
    def take_changed(self) -> set[str]:
        """Requests whose tables changed since the last call (appended, replaced, shrunk or freed)."""
        out, self._dirty = self._dirty, set()
        return out

    @_locked
    def live_table(self, request_id: str) -> tuple[list[RBlock] | None, int]:
        """The request's table itself (not a copy: read it, never change it) and its epoch; (None, 0)
        when it has none. The list stays the request's until its epoch moves."""
        table = self.tables.get(request_id)
        return (table, self._epoch[request_id]) if table is not None else (None, 0)

    def _moved(self, request_id: str) -> None:
        """A change other than an append: mirrors of the table must rebuild it."""
        self._epoch[request_id] = next(self._epochs)
        self._dirty.add(request_id)

    @_locked
    def num_held(self, request_id: str) -> int:
        """Blocks in the request's table, on any instance."""
        return len(self.tables.get(request_id, ()))

    @_locked
    def held_counts(self, request_id: str) -> dict[int, int]:
        """How many of the request's blocks sit on each instance (kept on change)."""
        return dict(self._held.get(request_id, {}))

    @_locked
    def holds(self, request_id: str, refs: list[RBlock]) -> bool:
        """Whether every one of ``refs`` is in the request's table (O(len(refs)))."""
        pos = self._pos.get(request_id)
        return pos is not None and all(r in pos for r in refs)

    @_locked
    def oldest(self, request_id: str, where: int, upto: int, n: int, skip: frozenset[RBlock] = frozenset()
               ) -> list[RBlock]:
        """Up to ``n`` of the request's blocks on instance ``where`` among its first ``upto``,
        oldest first, leaving out ``skip`` and local blocks other tables share too (a cached
        prefix: moving them frees nothing); the scan stops as soon as it has found them."""
        out: list[RBlock] = []
        if n <= 0:
            return out
        table = self.tables.get(request_id, ())
        ref_of = self.pool.ref
        for i in range(min(upto, len(table))):
            ref = table[i]
            if ref.instance == where and ref not in skip and (where != self.rank or ref_of[ref.block] == 1):
                out.append(ref)
                if len(out) == n:
                    break
        return out

    def _count(self, request_id: str, refs, sign: int) -> None:
        held = self._held.setdefault(request_id, {})
        for ref in refs:
            k = held.get(ref.instance, 0) + sign
            if k:
                held[ref.instance] = k
            else:
                del held[ref.instance]
        self._changed.add(request_id)

    def _index_from(self, request_id: str, start: int) -> None:
        """Re-index the table's entries from ``start`` on (after an insertion or a cut)."""
        table, pos = self.tables[request_id], self._pos[request_id]
        for i in range(start, len(table)):
            pos[table[i]] = i

    def _drop(self, request_id: str) -> None:
        """The request's table is gone (or empty): forget its index and counts."""
        self.tables.pop(request_id, None)
        self._pos.pop(request_id, None)
        self._held.pop(request_id, None)
        self._changed.discard(request_id)
        self._removed.add(request_id)
        self._epoch.pop(request_id, None)
        self._named.pop(request_id, None)
        self._dirty.add(request_id)

    def _table(self, request_id: str) -> list[RBlock]:
        if request_id not in self.tables:
            self.tables[request_id] = []
            self._pos[request_id] = {}
            self._removed.discard(request_id)
            self._epoch[request_id] = next(self._epochs)
        return self.tables[request_id]

    def num_needed(self, request_id: str, num_tokens: int) -> int:
        """More local blocks the request needs to hold num_tokens tokens. Asked for every running
        request every step, so it takes no lock: one dict read and one len() are atomic."""
        return max(0, -(-num_tokens // self.block_size) - len(self.tables.get(request_id, ())))

    @_locked
    def allocate(self, request_id: str, n: int) -> list[RBlock]:
        new = [RBlock(self.rank, b) for b in self.pool.allocate(n)]
        if not new:
            return new
        table = self._table(request_id)
        start = len(table)
        table.extend(new)
        self._index_from(request_id, start)
        self._count(request_id, new, +1)
        self._dirty.add(request_id)
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
        pos = self._pos[request_id]
        for r in tail:
            del pos[r]
        self._count(request_id, tail, -1)
        self._moved(request_id)
        if not table:
            self._drop(request_id)
        elif self._named.get(request_id, 0) > len(table):
            self._named[request_id] = len(table)
        self.pool.free([r.block for r in reversed(tail)])

    # ---- the prefix cache -----------------------------------------------
    @property
    def caching(self) -> bool:
        return self.pool.enable_caching

    def num_offered(self, request_id: str) -> int:
        """Table entries of the request already offered to the prefix cache. Asked for every
        request every step, so it takes no lock (one dict read)."""
        return self._named.get(request_id, 0)

    @_locked
    def match(self, names: list[BlockHash]) -> tuple[int, int]:
        """How many blocks of the longest cached run of ``names`` this pool holds, and how many of
        those are referenced now (taking them costs no free block). Takes no reference."""
        hits = self.pool.lookup(names)
        return len(hits), sum(1 for b in hits if self.pool.ref[b] > 0)

    @_locked
    def start(self, request_id: str, names: list[BlockHash], num_blocks: int, remote: list[RBlock] = ()) -> int:
        """Give a request with no table yet ``num_blocks`` blocks: the cached blocks of the longest
        run of ``names`` by reference, then ``remote`` (a prefix cached on other instances, lent
        to it: the blocks that follow ``names``), then new ones. All or nothing, under one lock (a
        loan on another thread may evict a cached block between ``match`` and here): MemoryError
        and no change when the pool cannot, or when ``remote`` is given and fewer than all of
        ``names`` are still cached (it would not follow them). Returns how many cached blocks,
        local and remote, the table starts with."""
        if self.tables.get(request_id):
            raise RuntimeError(f"request {request_id} already holds blocks")
        hits = self.pool.lookup(names[:num_blocks])
        if remote and len(hits) != len(names):
            raise MemoryError(f"the cached prefix changed: {len(hits)} of {len(names)} blocks left")
        revived = sum(1 for b in hits if self.pool.ref[b] == 0)
        need = num_blocks - len(hits) - len(remote)
        if need < 0:
            raise ValueError(f"{len(hits)} cached and {len(remote)} remote blocks for a table of {num_blocks}")
        if need + revived > self.pool.num_free:
            raise MemoryError(f"KV pool exhausted: {need} new and {revived} cached blocks asked for, "
                              f"{self.pool.num_free} free")
        self.pool.touch(hits)
        refs = [RBlock(self.rank, b) for b in hits] + list(remote) + [RBlock(self.rank, b)
                                                                      for b in self.pool.allocate(need)]
        if refs:
            table = self._table(request_id)
            table.extend(refs)
            self._index_from(request_id, 0)
            self._count(request_id, refs, +1)
            self._dirty.add(request_id)
        self._num_borrowed += len(remote)
        self._named[request_id] = len(hits) + len(remote)
        return len(hits) + len(remote)

    @_locked
    def cache_computed(self, request_id: str, names: list[BlockHash], num_blocks: int) -> int:
        """Offer the request's first ``num_blocks`` blocks, full and with their KV computed
        (``names``: their names, in table order), to the prefix cache; local blocks only, each
        offered once (O(blocks not offered before)). Returns how many were cached."""
        if not self.pool.enable_caching:
            return 0
        table = self.tables.get(request_id)
        if table is None:
            return 0
        done = self._named.get(request_id, 0)
        end = min(num_blocks, len(names), len(table))
        n = 0
        for i in range(done, end):
            ref = table[i]
            if ref.instance == self.rank:
                n += self.pool.cache(ref.block, names[i], i + 1)
        if end > done:
            self._named[request_id] = end
        return n

    @_locked
    def exclusive(self, ref: RBlock) -> bool:
        """Whether the local block is held by one table only (moving it frees it)."""
        return ref.instance == self.rank and self.pool.ref[ref.block] == 1

    @_locked
    def take_anchor_changes(self, everything: bool = False) -> tuple[list[int], list[int]]:
        return self.pool.take_anchor_changes(everything)

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
        if not refs:
            return
        table = self._table(request_id)
        where = len(table) if at is None else at
        if where != len(table):
            self._moved(request_id)
        self._dirty.add(request_id)
        table[where:where] = refs
        self._index_from(request_id, where)  # O(refs + the entries after them: the few just allocated)
        self._count(request_id, refs, +1)
        self._num_borrowed += sum(1 for r in refs if r.instance != self.rank)

    @_locked
    def replace_blocks(self, request_id: str, old: list[RBlock], new: list[RBlock]) -> None:
        """After a migration: swap old refs for new ones at the same logical positions."""
        table, pos = self.tables[request_id], self._pos[request_id]
        self._moved(request_id)
        first_home = len(table)
        for o, n in zip(old, new, strict=True):
            i = pos.pop(o)
            table[i] = n
            pos[n] = i
            self._num_borrowed += (n.instance != self.rank) - (o.instance != self.rank)
            if n.instance == self.rank:
                first_home = min(first_home, i)
        self._count(request_id, old, -1)
        self._count(request_id, new, +1)
        if first_home < self._named.get(request_id, 0):
            self._named[request_id] = first_home  # blocks copied home: offered to the prefix cache again

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
        """Per local request: how many of its blocks sit on each instance (O(requests): the counts
        are kept on change)."""
        return {rid: dict(counts) for rid, counts in self._held.items()}

    @_locked
    def placement_changes(self, everything: bool = False) -> tuple[dict[str, dict[int, int]], list[str]]:
        """The placement diff since the last call: (counts of the requests whose counts changed,
        requests gone); O(changed requests). ``everything``: all counts (the last diff was lost)."""
        changed = self._held if everything else {rid: self._held[rid] for rid in self._changed}
        out = ({rid: dict(c) for rid, c in changed.items()}, sorted(self._removed))
        self._changed.clear()
        self._removed.clear()
        return out

    @_locked
    def touching(self, rank: int) -> list[str]:
        """Local requests with any block on ``rank`` (O(requests), from the counts)."""
        return sorted(rid for rid, counts in self._held.items() if counts.get(rank, 0) > 0)

    @_locked
    def free_request(self, request_id: str) -> list[RBlock]:
        """Free the request's local blocks; return its remote refs for the caller to release."""
        table = self.tables.get(request_id)
        if table is None:
            return []
        self._drop(request_id)
        local = [r.block for r in reversed(table) if r.instance == self.rank]  # newest first: evicted first
        remote = [r for r in table if r.instance != self.rank]
        self.pool.free(local)
        self._num_borrowed -= len(remote)
        return remote

    # ---- blocks lent to remote debtors -----------------------------------
    def _lend_refs(self, debtor: int, request_id: str, blocks: list[int]) -> None:
        if blocks:
            self.lent.setdefault((debtor, request_id), {}).update(dict.fromkeys(blocks))
        for b in blocks:
            self._lent_refs[b] = self._lent_refs.get(b, 0) + 1

    @_locked
    def lend(self, debtor: int, request_id: str, n: int) -> list[int]:
        blocks = self.pool.allocate(n)
        self._lend_refs(debtor, request_id, blocks)
        return blocks

    @_locked
    def lend_cached(self, debtor: int, request_id: str, names: list[BlockHash],
                    lendable: Callable[[RManager], int]) -> list[int]:
        """A remote request takes the cached blocks of the longest run of ``names`` by reference
        (never evicted while it holds them; ``release_lent`` gives them back). Blocks nobody
        references now come out of the free memory, so their number must be within
        ``lendable(self)`` (read under the same lock); else fewer, or []."""
        held = self.lent.get((debtor, request_id), {})
        hits = self.pool.lookup(names)
        room = lendable(self) if hits else 0
        revived = 0
        for i, b in enumerate(hits):
            revived += self.pool.ref[b] == 0
            if revived > room or b in held:
                hits = hits[:i]
                break
        self.pool.touch(hits)
        self._lend_refs(debtor, request_id, hits)
        return hits

    @_locked
    def is_lent(self, debtor: int, request_id: str, blocks: list[int]) -> bool:
        """Whether every one of ``blocks`` is lent to that debtor's request (O(len(blocks)))."""
        held = self.lent.get((debtor, request_id), {})
        return all(b in held for b in blocks)

    @_locked
    def try_lend(self, debtor: int, request_id: str, n: int, lendable: Callable[[RManager], int]) -> list[int]:
        """Lend n blocks if ``lendable(self)`` (read under the same lock) allows it; else []."""
        if n <= 0 or n > lendable(self):
            return []
        return self.lend(debtor, request_id, n)

    @_locked
    def release_lent(self, debtor: int, request_id: str, blocks: list[int] | None = None) -> int:
        """Return lent blocks (all of them for the request when blocks is None) to the pool:
        O(len(blocks)), checked before anything changes (all or nothing)."""
        key = (debtor, request_id)
        held = self.lent.get(key, {})
        drop = list(held) if blocks is None else list(blocks)
        missing = {b for b in drop if b not in held}
        if not missing and len(set(drop)) != len(drop):  # a block twice: the second is not lent any more
            missing = {b for b, k in Counter(drop).items() if k > 1}
        if missing:
            raise RuntimeError(f"blocks {sorted(missing)} are not lent to {debtor}/{request_id}")
        if len(drop) == len(held):
            self.lent.pop(key, None)
        else:
            for b in drop:
                del held[b]
        refs = self._lent_refs
        for b in drop:
            k = refs[b]
            if k == 1:
                del refs[b]
            else:
                refs[b] = k - 1
        self.pool.free(reversed(drop))
        return len(drop)

    # ---- accounting ------------------------------------------------------
    @property
    def num_lent(self) -> int:
        """Distinct local blocks referenced by at least one remote request."""
        return len(self._lent_refs)

    @property
    def num_borrowed(self) -> int:
        return self._num_borrowed

    @property
    def num_used(self) -> int:
        """Local pool blocks used by local requests only (a block also lent counts as lent)."""
        return self.pool.num_blocks - self.pool.num_free - len(self._lent_refs)

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
            "cached_blocks": self.pool.num_cached,
            "evictable_blocks": self.pool.num_evictable,
            "pool_version": self.pool.version,  # orders readings of free/used/lent (BlockPool.version)
        }
