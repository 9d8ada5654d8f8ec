"""Moving a request's KV blocks between instances while it keeps decoding.

Only *full* blocks move (every token in them computed), so their contents no longer change:
the copy runs in the background while the home keeps stepping on the old copy, and only
the table swap waits for the gap between two steps (``apply_done``, on the compute thread).
A request that ends or is preempted meanwhile simply drops the copy, and the blocks reserved
for it go back; a copy that fails does the same. No token is recomputed.

Three movements, all initiated by the home:

* ``push``: its oldest local blocks to blocks reserved on a creditor (move_kvcache, and
  local-first growth: the tail stays home, the head moves out);
* ``pull``: blocks a creditor holds for it come back into its own pool (blocks come home);
* ``push_now``: the same as push, synchronously (the allocator, mid-schedule).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from infinite.cluster import messages as M
from infinite.cluster.counters import StepCounters
from infinite.cluster.transport import Future, Transport
from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RBlock, RManager

log = logging.getLogger(__name__)


@dataclass
class _Transfer:
    request_id: str
    old: list[RBlock]  # where the blocks are now (in table order)
    new: list[RBlock]  # where they will be
    done: Future
    local_dst: list[int] | None = None  # pull: local blocks to write once the contents arrive
    seconds: list[float] = field(default_factory=list)  # the copy's time, once its contents arrived


class Migrator:
    def __init__(self, rm: RManager, kv: KVCache, transport: Transport, counters: StepCounters,
                 timeout_s: float = 30.0) -> None:
        self.rm = rm
        self.kv = kv
        self.transport = transport
        self.counters = counters
        self.timeout_s = timeout_s
        self.rank = rm.rank
        self._pending: list[_Transfer] = []
        self._lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return self.kv.k.shape[0]

    @property
    def busy(self) -> set[str]:
        """Requests with a transfer in flight (the planner leaves them alone meanwhile)."""
        with self._lock:
            return {t.request_id for t in self._pending}

    # ---- which blocks may move ------------------------------------------------------------
    def oldest_full(self, request_id: str, computed_tokens: int, where: int, n: int) -> list[RBlock]:
        """Up to n of the request's oldest blocks on instance ``where`` whose tokens are all computed
        (a scan that stops once it has them; no copy of the table); local blocks other requests
        share too (a cached prefix) are left out: moving them frees nothing."""
        full = computed_tokens // self.rm.block_size
        with self._lock:
            busy = frozenset(ref for t in self._pending if t.request_id == request_id for ref in t.old)
        return self.rm.oldest(request_id, where, full, n, busy)

    def _contents(self, refs: list[RBlock]) -> M.BlockTensors:
        return M.BlockTensors(*self.kv.read_blocks([r.block for r in refs]))  # [L, n, B, nkv, d]

    # ---- push: local blocks out -----------------------------------------------------------
    def push(self, request_id: str, old: list[RBlock], new: list[RBlock]) -> None:
        """Start copying local blocks ``old`` into reserved remote blocks ``new`` (one creditor)."""
        done = self.transport.write_blocks(new[0].instance, M.WriteBlocks([r.block for r in new]),
                                           self._contents(old), timeout=self.timeout_s)
        with self._lock:
            self._pending.append(_Transfer(request_id, old, new, done))

    def push_now(self, request_id: str, old: list[RBlock], new: list[RBlock]) -> bool:
        """Copy and swap at once (the caller owns the table right now). False: nothing changed
        (the copy failed; the reserved blocks went back)."""
        t0 = time.perf_counter()
        by: dict[int, tuple[list[RBlock], list[RBlock]]] = {}
        for o, n in zip(old, new, strict=True):
            e = by.setdefault(n.instance, ([], []))
            e[0].append(o)
            e[1].append(n)
        futs = [(c, o, n, self.transport.write_blocks(c, M.WriteBlocks([r.block for r in n]), self._contents(o),
                                                      timeout=self.timeout_s)) for c, (o, n) in by.items()]
        ok = True
        for c, o, n, f in futs:
            try:
                f.wait()
            except Exception:  # noqa: BLE001
                log.exception("rank %d: copying %d blocks of %s to rank %d failed", self.rank, len(o), request_id, c)
                ok = False
        if not ok:
            self._give_back(request_id, new)
            return False
        self.counters.copied(len(old), time.perf_counter() - t0)
        self.rm.swap_out(request_id, old, new)
        self.counters.migrations += 1
        self.counters.migrated_blocks += len(old)
        return True

    # ---- pull: remote blocks home ----------------------------------------------------------
    def pull(self, request_id: str, old: list[RBlock]) -> bool:
        """Start bringing remote blocks ``old`` (one creditor) into free local blocks."""
        try:
            local = self.rm.take_free(len(old))
        except MemoryError:
            return False
        creditor = old[0].instance
        t0 = time.perf_counter()
        done = self.transport.read_blocks(creditor, M.ReadBlocks(self.rank, request_id, [r.block for r in old]),
                                          timeout=self.timeout_s)
        t = _Transfer(request_id, old, [RBlock(self.rank, b) for b in local], done, local)
        done.add_done_callback(lambda _: t.seconds.append(time.perf_counter() - t0))
        with self._lock:
            self._pending.append(t)
        return True

    # ---- between steps ----------------------------------------------------------------------
    def apply_done(self) -> None:
        """Swap the tables of finished transfers (compute thread, between two steps)."""
        with self._lock:
            ready = [t for t in self._pending if t.done.done()]
            self._pending = [t for t in self._pending if not t.done.done()]
        for t in ready:
            self._finish(t)

    def _finish(self, t: _Transfer) -> None:
        try:
            contents = t.done.wait()
        except Exception as e:  # noqa: BLE001 - the copy failed: the blocks stay where they were
            log.warning("rank %d: moving %d blocks of %s failed: %s", self.rank, len(t.old), t.request_id, e)
            self._undo(t)
            return
        if not self.rm.holds(t.request_id, t.old):  # the request ended or was preempted meanwhile
            self._undo(t)
            return
        if t.local_dst is not None:  # pull: write the contents home, then give the creditor its blocks back
            if t.seconds:
                self.counters.copied(len(t.old), t.seconds[0])
            self.kv.write_blocks(t.local_dst, contents.k, contents.v)
            self.rm.replace_blocks(t.request_id, t.old, t.new)
            self._give_back(t.request_id, t.old)
        else:
            self.rm.swap_out(t.request_id, t.old, t.new)
        self.counters.migrations += 1
        self.counters.migrated_blocks += len(t.old)

    def _undo(self, t: _Transfer) -> None:
        if t.local_dst is not None:
            self.rm.return_free(t.local_dst)
        else:
            self._give_back(t.request_id, t.new)

    def _give_back(self, request_id: str, refs: list[RBlock]) -> None:
        by: dict[int, list[int]] = {}
        for r in refs:
            by.setdefault(r.instance, []).append(r.block)
        for c, blocks in by.items():
            self.transport.release(c, M.Release(self.rank, request_id, blocks), timeout=self.timeout_s)
