"""The blocks of one instance's KV pool: reference counts, and the prefix cache over them.

vLLM v1's ``block_pool.py`` is the model. A block is referenced by every
request (local, or a remote debtor's) whose table holds it; it is free when no
one does. A full block whose KV is computed may be *cached* under its name
(``infinite.kv.prefix``): later requests with the same prefix take it by
reference instead of computing it again. When its last reference goes, a
cached block stays cached and counts as free: it is evicted (its name
forgotten) only when an allocation needs it, least recently freed first.
Free blocks that hold nothing cached are handed out before any cached one.

Pure bookkeeping: no tensors, no I/O, no lock (the rManager holds one).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from infinite.kv.prefix import BlockHash, anchor_key, is_anchor


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks  # references per block (0: free)
        self._plain: deque[int] = deque(range(num_blocks))  # free, nothing cached: handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free and cached, least recently freed first
        self.cached: dict[BlockHash, int] = {}  # name -> block
        self._name: dict[int, tuple[BlockHash, int]] = {}  # cached block -> (its name, its chain depth)
        self.anchors: set[int] = set()  # anchor keys of the cached blocks (infinite.kv.prefix)
        self._anchors_added: set[int] = set()  # since take_anchor_changes
        self._anchors_removed: set[int] = set()
        self.evictions = 0
        # Moves on every allocate and free that changes the pool: of two readings of its counts,
        # the one with the larger version is the newer (the gManager keeps the newer of a
        # creditor's heartbeat and the counts a reservation's reply carries).
        self.version = 0

    # ---- counts -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: free ones, cached or not."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks holding a named prefix (referenced or not)."""
        return len(self._name)

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold a named prefix."""
        return len(self._evictable)

    # ---- references ---------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """``n`` blocks, each with one reference: uncached free ones first, then the least recently
        freed cached ones (their names are forgotten)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise MemoryError(f"KV pool exhausted: asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._plain:
                b = self._plain.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._uncache(b)
                self.evictions += 1
            self.ref[b] = 1
            out.append(b)
        if out:
            self.version += 1
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """One more reference to each of ``blocks`` (cached ones found by ``lookup``): a free one
        leaves the eviction queue."""
        for b in blocks:
            if self.ref[b] == 0:
                if b not in self._evictable:
                    raise RuntimeError(f"KV block {b} is free and holds nothing cached: it cannot be shared")
                del self._evictable[b]
                self.version += 1
            self.ref[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody references any more becomes free, and
        stays cached (evictable, most recently freed last) if it holds a named prefix. Give a
        request's blocks newest first, so that its tail is evicted before its prefix."""
        ref, named, evictable, plain = self.ref, self._name, self._evictable, self._plain  # hot: 100K-block releases
        freed = False
        for b in blocks:
            r = ref[b] - 1
            if r < 0:
                raise RuntimeError(f"double free of KV block {b}")
            ref[b] = r
            if r == 0:
                if b in named:
                    evictable[b] = None
                else:
                    plain.append(b)
                freed = True
        if freed:
            self.version += 1

    # ---- the prefix cache ---------------------------------------------------------------------
    def cache(self, block: int, name: BlockHash, depth: int) -> bool:
        """Name a referenced block whose KV is computed (``depth``: blocks in its prefix). False
        when caching is off, the block is named already, or another block holds that name (the
        first one stays the cached copy; this one is freed as a plain block)."""
        if not self.enable_caching or block in self._name or name in self.cached:
            return False
        if self.ref[block] <= 0:
            raise RuntimeError(f"KV block {block} is free: only a block in use can be cached")
        self.cached[name] = block
        self._name[block] = (name, depth)
        if is_anchor(depth):
            self._anchor(anchor_key(name), True)
        return True

    def lookup(self, names: Iterable[BlockHash]) -> list[int]:
        """The cached blocks of the longest run of ``names`` from its start (no reference taken)."""
        out = []
        for name in names:
            b = self.cached.get(name)
            if b is None:
                break
            out.append(b)
        return out

    def name_of(self, block: int) -> BlockHash | None:
        entry = self._name.get(block)
        return entry[0] if entry is not None else None

    def _uncache(self, b: int) -> None:
        name, depth = self._name.pop(b)
        del self.cached[name]
        if is_anchor(depth):
            self._anchor(anchor_key(name), False)

    def _anchor(self, key: int, present: bool) -> None:
        """An anchor appears or goes; the diff since the last report keeps only the net change."""
        (self.anchors.add if present else self.anchors.discard)(key)
        undo, do = (self._anchors_removed, self._anchors_added) if present else (self._anchors_added,
                                                                                 self._anchors_removed)
        if key in undo:
            undo.discard(key)
        else:
            do.add(key)

    def take_anchor_changes(self, everything: bool = False) -> tuple[list[int], list[int]]:
        """Anchors (added, removed) since the last call; ``everything``: every current anchor as
        added (the last report was lost)."""
        added = sorted(self.anchors) if everything else sorted(self._anchors_added)
        removed = [] if everything else sorted(self._anchors_removed)
        self._anchors_added.clear()
        self._anchors_removed.clear()
        return added, removed
