"""The creditor's rows: blocks lent to debtors' requests, as the debtors described them.

Each (debtor, handle) owns a row of two ``[rows, width]`` int32 tables (block
ids in this pool, their logical index in the request), kept on the device and
grown as needed (rows and width, doubling). A step's diffs
(``messages.AttentionMeta``) append entries to rows or replace them, and the
step's MicroAttention metadata gathers its rows with one ``index_select`` of a
``[requests]`` index: O(requests + new entries) per step, however many blocks
are lent.

A diff must continue what the row holds (same epoch, ``base`` entries held)
and come from a step no older than the debtor's newest one seen; otherwise it
is refused (``StaleRows``): the debtor's step fails like any remote failure and
its next step sends whole rows. So a step that failed midway — the creditor
may or may not have applied its diffs — never leaves a row the debtor
believes to be different.

Memory: a row lives while its debtor uses it. It goes when the debtor drops
its handle (the request left its batch, or its blocks here went home), when
the request's blocks here are all released (``Creditor.release``), or when
the debtor is forgotten (it died); the tables shrink back to their first size
when no row is left. So the rows are at most the (debtor, request) pairs
holding blocks here, and the width the most blocks one request holds here.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from infinite.attention import MAMetadata
from infinite.cluster import messages as M
from infinite.cluster.transport import StaleRows

FIRST_ROWS, FIRST_WIDTH = 8, 64


class LentRows:
    def __init__(self, pool_blocks: int, device: torch.device | str = "cpu", mirrored: bool | None = None) -> None:
        """``mirrored``: device tables apart from the host's, changed by uploads (default: on any device
        but the CPU; tests set it on a CPU to run the GPU's path)."""
        self.pool_blocks = pool_blocks
        self.device = torch.device(device)
        self.on_host = self.device.type == "cpu" if mirrored is None else not mirrored
        self._lock = threading.Lock()  # stream threads of several debtors (and slots) apply at once
        self.row_of: dict[tuple[int, int], int] = {}  # (debtor, handle) -> row
        self._newest: dict[int, int] = {}  # debtor -> newest step whose diffs were applied
        self._dirty: list[tuple[int, int, int]] = []  # (row, first, end) entries to upload (GPU only)
        self._alloc(FIRST_ROWS, FIRST_WIDTH)

    # ---- storage ----------------------------------------------------------------------------------
    def _alloc(self, rows: int, width: int) -> None:
        """Tables of ``rows`` x ``width``, keeping what the current ones hold (all of it: grow only)."""
        old = getattr(self, "bt_h", None)
        bt = np.zeros((rows, width), dtype=np.int32)
        bi = np.zeros((rows, width), dtype=np.int32)
        nb = np.zeros(rows, dtype=np.int32)
        ep = np.zeros(rows, dtype=np.int64)
        if old is not None:
            r, w = old.shape
            bt[:r, :w], bi[:r, :w], nb[:r], ep[:r] = self.bt_h, self.bi_h, self.nb_h, self.ep_h
            free = self._free + list(range(rows - 1, r - 1, -1))
        else:
            free = list(range(rows - 1, -1, -1))
        self.bt_h, self.bi_h, self.nb_h, self.ep_h = bt, bi, nb, ep  # host: ids, logical, counts, epochs
        self._free = free  # rows not in use, popped from the end
        if self.on_host:
            self.bt, self.bi = torch.from_numpy(bt), torch.from_numpy(bi)  # [rows, width] int32, shared
        else:
            self.bt = torch.from_numpy(bt).to(self.device, copy=True)
            self.bi = torch.from_numpy(bi).to(self.device, copy=True)
            self._dirty.clear()  # uploaded whole

    @property
    def capacity(self) -> tuple[int, int]:
        return self.bt_h.shape

    def _row_for(self, key: tuple[int, int]) -> int:
        row = self.row_of.get(key)
        if row is None:
            if not self._free:
                self._alloc(2 * self.capacity[0], self.capacity[1])
            row = self.row_of[key] = self._free.pop()
            self.nb_h[row] = 0
        return row

    def _drop(self, key: tuple[int, int]) -> None:
        row = self.row_of.pop(key, None)
        if row is None:
            return
        self.nb_h[row] = 0
        self._free.append(row)
        if not self.row_of and self.capacity != (FIRST_ROWS, FIRST_WIDTH):
            del self.bt_h
            self._alloc(FIRST_ROWS, FIRST_WIDTH)

    # ---- the debtors' diffs -------------------------------------------------------------------------
    def apply(self, debtor: int, step: int, meta: M.AttentionMeta, num_queries: int | None = None) -> MAMetadata:
        """Apply one step's diffs from ``debtor`` and return the step's metadata over its rows.
        Raises StaleRows when a diff does not continue what is held, ValueError when it is malformed
        (or does not describe ``num_queries`` queries, the rows of the step's query tensor)."""
        n = len(meta.handles)
        if num_queries is not None and sum(meta.q_lens) != num_queries:
            raise ValueError(f"rank {debtor} sent {num_queries} queries for requests of {sum(meta.q_lens)}")
        if not (len(meta.epochs) == len(meta.bases) == len(meta.q_lens) == len(meta.q_starts) == len(meta.counts)
                == n) or len(meta.blocks) != len(meta.logical) or sum(meta.counts) != len(meta.blocks):
            raise ValueError("malformed attention metadata: per-request lists of different lengths, or counts "
                             "that do not add up to the entries")
        if any(c < 0 for c in meta.counts) or any(b < 0 for b in meta.bases) or any(q < 0 for q in meta.q_lens):
            raise ValueError("malformed attention metadata: negative counts, bases or query lengths")
        blocks = np.asarray(meta.blocks, dtype=np.int64)
        logical = np.asarray(meta.logical, dtype=np.int64)
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.pool_blocks or logical.min() < 0):
            raise ValueError(f"block ids must lie in this pool [0, {self.pool_blocks}) and logical indices be >= 0")
        with self._lock:
            newest = self._newest.get(debtor)
            if newest is not None and step < newest:
                raise StaleRows(f"step {step} of rank {debtor} is older than its step {newest} already applied")
            self._newest[debtor] = step
            for h in meta.drop:
                self._drop((debtor, h))
            for h, e, base in zip(meta.handles, meta.epochs, meta.bases):  # all checked before any change
                if base:
                    row = self.row_of.get((debtor, h))
                    held = (-1, 0) if row is None else (int(self.ep_h[row]), int(self.nb_h[row]))
                    if held != (e, base):
                        raise StaleRows(f"rank {debtor}'s diff for handle {h} continues {base} entries of epoch {e}; "
                                        f"held: {held[1]} of epoch {held[0]}")
            rows = []
            off = 0
            for h, e, base, k in zip(meta.handles, meta.epochs, meta.bases, meta.counts):
                row = self._row_for((debtor, h))
                end = base + k
                if k:
                    lg = logical[off:off + k]
                    if (k > 1 and bool((lg[1:] <= lg[:-1]).any())) or (base and lg[0] <= self.bi_h[row, base - 1]):
                        self._drop((debtor, h))
                        raise ValueError(f"rank {debtor}'s logical indices for handle {h} do not ascend")
                    if end > self.capacity[1]:
                        self._alloc(self.capacity[0], max(end, 2 * self.capacity[1]))
                    self.bt_h[row, base:end] = blocks[off:off + k]
                    self.bi_h[row, base:end] = lg
                    if not self.on_host:
                        self._dirty.append((row, base, end))
                self.nb_h[row] = end
                self.ep_h[row] = e
                rows.append(row)
                off += k
            return self._metadata(rows, meta.q_lens, meta.q_starts)

    def _metadata(self, rows: list[int], q_lens: list[int], q_starts: list[int]) -> MAMetadata:
        """The step's rows gathered on the device: [R, width] tables, as wide as its longest row."""
        dev = self.device
        for row, a, b in self._dirty:
            # from a copy: an asynchronous upload must not read host entries a later step rewrites
            self.bt[row, a:b].copy_(torch.from_numpy(self.bt_h[row, a:b].copy()))
            self.bi[row, a:b].copy_(torch.from_numpy(self.bi_h[row, a:b].copy()))
        self._dirty.clear()
        idx_h = np.asarray(rows, dtype=np.int64)
        nb_h = self.nb_h[idx_h]  # [R]
        width = max(1, int(nb_h.max())) if rows else 1
        idx = torch.from_numpy(idx_h).to(dev)
        ql = np.asarray(q_lens, dtype=np.int64)
        cu = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(ql, out=cu[1:])
        starts = np.asarray(q_starts, dtype=np.int64)
        if ql.size and ql.max() > 1:  # positions start..start+n-1 of each request
            pos = np.repeat(starts - cu[:-1], ql) + np.arange(int(cu[-1]), dtype=np.int64)
        else:
            pos = starts[ql == 1]
        decode_rows, prefill_rows, max_prefill = MAMetadata.mixed_rows(q_lens, dev)
        return MAMetadata(
            cu_q=torch.from_numpy(cu).to(dev),
            q_pos=torch.from_numpy(pos).to(dev),
            block_tables=self.bt[:, :width].index_select(0, idx),  # [R, width] int32
            block_idx=self.bi[:, :width].index_select(0, idx),
            num_blocks=torch.from_numpy(nb_h).to(dev),  # [R] int32
            max_q_len=int(ql.max()) if ql.size else 0,
            decode_rows=decode_rows,
            prefill_rows=prefill_rows,
            max_prefill_q_len=max_prefill,
        )

    # ---- forgetting --------------------------------------------------------------------------------
    def drop(self, debtor: int, handles: list[int]) -> None:
        with self._lock:
            for h in handles:
                self._drop((debtor, h))

    def forget_debtor(self, debtor: int) -> None:
        """A dead debtor's rows, and its step order (a rank that comes back counts its steps anew)."""
        with self._lock:
            for key in [k for k in self.row_of if k[0] == debtor]:
                self._drop(key)
            self._newest.pop(debtor, None)

    def held(self, debtor: int, handle: int) -> tuple[list[int], list[int]] | None:
        """The row's (block ids, logical indices), or None (tests compare them with the debtor's)."""
        with self._lock:
            row = self.row_of.get((debtor, handle))
            if row is None:
                return None
            n = int(self.nb_h[row])
            return self.bt_h[row, :n].tolist(), self.bi_h[row, :n].tolist()
