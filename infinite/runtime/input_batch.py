"""The persistent batch: per-request state of the running requests in preallocated tensors.

vLLM v1's ``InputBatch`` is the model. Each running request owns a row; its
local KV blocks (physical id, logical index) sit in row ``r`` of two
``[max_rows, max_blocks]`` int32 tables, kept on the device and changed by
diffs: a request joins (its table is mirrored once), grows a block (one
entry), has blocks replaced by a migration (its row is rebuilt), or leaves
(the last row moves into its place, vLLM's "condense"). The rManager says
which tables changed since the last step (``RManager.take_changed``), so a
step costs nothing for the rows that did not change, and nothing ever walks a
whole block table per step.

Rows are in their own order, not the scheduler's: a step's MicroAttention
reads rows ``0..n-1`` as they are (a view, no gather), which is also what a
captured CUDA graph reads from its static buffers. Padding rows of a graph
bucket are rows past ``n``, whose block count is 0: they see no key.

On a CPU device the host arrays are the device tensors; on a GPU, host
mirrors (pinned) take the writes and each step uploads only what changed.

Blocks on other instances (borrowed) are kept by the same diffs, per row and
creditor (``RemoteGroup``): what the cluster's data plane tells each creditor
about the row, so that a step with remote blocks costs O(rows x creditors +
new tokens), not a walk of every table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from infinite.kv.rmanager import RBlock, RManager
from infinite.runtime.request import Request


@dataclass
class RemoteGroup:
    """One row's blocks on one creditor, in logical order.

    ``epoch`` moves whenever the group changes other than by appending entries (the group is
    then a new object), so that whoever mirrors it elsewhere (a creditor,
    infinite.cluster.remote_attention) knows when appending the new entries is not enough.
    ``sent``/``sent_gen``: that mirror's bookkeeping, entries the creditor was told about in
    its generation ``sent_gen`` of the mirror."""

    blocks: list[int]  # physical ids in the creditor's pool
    logical: list[int]  # their logical index in the request, ascending
    epoch: int
    sent: int = 0
    sent_gen: int = -1


@dataclass
class _RowSync:
    table: list[RBlock]  # the rManager's own list for the request (read only)
    epoch: int  # the table's epoch when mirrored
    seen: int  # table entries mirrored into the row
    remote: dict[int, RemoteGroup] = field(default_factory=dict)  # creditor -> the row's blocks there


class InputBatch:
    def __init__(self, rm: RManager, max_rows: int, max_blocks: int, device: torch.device) -> None:
        self.rm = rm
        self.rank = rm.rank
        self.block_size = rm.block_size
        self.max_rows = max_rows
        self.max_blocks = max_blocks
        self.device = device
        self.on_host = device.type == "cpu"
        pin = device.type == "cuda"
        # Host side: [max_rows, max_blocks] physical ids and logical indices, [max_rows] local counts.
        self._bt_h = torch.zeros(max_rows, max_blocks, dtype=torch.int32, pin_memory=pin)
        self._bi_h = torch.zeros(max_rows, max_blocks, dtype=torch.int32, pin_memory=pin)
        self._nb_h = torch.zeros(max_rows, dtype=torch.int32, pin_memory=pin)
        self.bt_np, self.bi_np, self.nb_np = self._bt_h.numpy(), self._bi_h.numpy(), self._nb_h.numpy()
        if self.on_host:
            self.block_tables, self.block_idx, self.num_blocks = self._bt_h, self._bi_h, self._nb_h
        else:
            self.block_tables = self._bt_h.to(device)  # [max_rows, max_blocks] int32
            self.block_idx = self._bi_h.to(device)  # [max_rows, max_blocks] int32
            self.num_blocks = self._nb_h.to(device)  # [max_rows] int32
        self.requests: list[Request] = []  # row -> request
        self.row_of: dict[str, int] = {}
        self._sync: list[_RowSync] = []
        # Device writes still to upload (GPU only): single entries, whole rows, row moves.
        self._cells: list[tuple[int, int]] = []  # (row, column) of appended entries
        self._rows: set[int] = set()  # rows to upload whole (joined, rebuilt, moved into)
        # (creditor, request) of remote groups that went away (the row left, or its blocks there
        # came home) since the last take_remote_dropped(): the creditor may forget them.
        self._remote_dropped: list[tuple[int, str]] = []
        # The same changes for the other ranks of a tensor-parallel group, kept until the first rank
        # sends them with the next step (runtime/tp.py); None when nobody mirrors this batch.
        self.mirror_rows: set[int] | None = None
        self.mirror_cells: list[tuple[int, int]] | None = None

    # ---- rows --------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return len(self.requests)

    def refs(self, row: int) -> list[RBlock]:
        """The row's whole table (the rManager's list: local and remote blocks, logical order)."""
        return self._sync[row].table

    def has_remote(self, request_id: str) -> bool:
        """The request holds blocks on other instances."""
        return bool(self._sync[self.row_of[request_id]].remote)

    def remote_groups(self, row: int) -> dict[int, RemoteGroup]:
        """The row's blocks on each creditor (kept by diffs: read, never change, the lists)."""
        return self._sync[row].remote

    def take_remote_dropped(self) -> list[tuple[int, str]]:
        """(creditor, request) of the remote groups gone since the last call."""
        out, self._remote_dropped = self._remote_dropped, []
        return out

    def sync(self, scheduled: list[Request]) -> None:
        """Bring the rows up to date with the rManager before a step: drop the rows of requests that
        no longer hold a table, apply the changed tables, add rows for newly scheduled requests.
        O(changed) work: rows whose tables did not change are not touched."""
        changed = self.rm.take_changed()
        for rid in changed:
            row = self.row_of.get(rid)
            if row is not None:
                self._resync(row)
        row_of, rows = self.row_of, self.requests
        for req in scheduled:
            row = row_of.get(req.request_id)
            if row is None:
                self._add(req)
            elif rows[row] is not req:  # an id used again by a new request once the old one finished
                self._remove(row)
                self._add(req)

    def _add(self, req: Request) -> None:
        table, epoch = self.rm.live_table(req.request_id)
        if table is None:
            raise RuntimeError(f"request {req.request_id} was scheduled without KV blocks")
        if len(self.requests) >= self.max_rows:
            raise RuntimeError(f"the persistent batch is full ({self.max_rows} rows)")
        row = len(self.requests)
        self.requests.append(req)
        self.row_of[req.request_id] = row
        self._sync.append(_RowSync(table, epoch, 0))
        self.nb_np[row] = 0
        self._rebuild(row)

    def _resync(self, row: int) -> None:
        st = self._sync[row]
        table, epoch = self.rm.live_table(self.requests[row].request_id)
        if table is None:
            self._remove(row)
        elif table is not st.table or epoch != st.epoch:
            st.table, st.epoch = table, epoch
            self._rebuild(row)
        elif len(table) > st.seen:
            self._append(row, st.seen, len(table))

    def _append(self, row: int, start: int, end: int) -> None:
        st = self._sync[row]
        n = int(self.nb_np[row])
        for i in range(start, end):
            ref = st.table[i]
            if ref.instance == self.rank:
                self.bt_np[row, n] = ref.block
                self.bi_np[row, n] = i
                if not self.on_host:
                    self._cells.append((row, n))
                if self.mirror_cells is not None:
                    self.mirror_cells.append((row, n))
                n += 1
            else:
                g = st.remote.get(ref.instance)
                if g is None:
                    g = st.remote[ref.instance] = RemoteGroup([], [], st.epoch)
                g.blocks.append(ref.block)
                g.logical.append(i)
        self.nb_np[row] = n
        st.seen = end

    def _rebuild(self, row: int) -> None:
        """Mirror the row's whole table (a join, or a change other than an append): O(its blocks)."""
        st = self._sync[row]
        local: list[tuple[int, int]] = []
        remote: dict[int, tuple[list[int], list[int]]] = {}
        rank = self.rank
        for i, ref in enumerate(st.table):
            if ref.instance == rank:
                local.append((ref.block, i))
            else:
                blocks, logical = remote.setdefault(ref.instance, ([], []))
                blocks.append(ref.block)
                logical.append(i)
        self._regroup(row, remote)
        n = len(local)
        if n > self.max_blocks:
            raise RuntimeError(f"request {self.requests[row].request_id} holds {n} local blocks, "
                               f"over the batch's {self.max_blocks} per row")
        if n:
            arr = np.asarray(local, dtype=np.int32)  # [n, 2]
            self.bt_np[row, :n] = arr[:, 0]
            self.bi_np[row, :n] = arr[:, 1]
        self.nb_np[row] = n
        st.seen = len(st.table)
        self._row_changed(row)

    def _row_changed(self, row: int) -> None:
        """The row's table was rewritten: whole-row uploads (and mirrors) take it."""
        if not self.on_host:
            self._rows.add(row)
        if self.mirror_rows is not None:
            self.mirror_rows.add(row)

    def _regroup(self, row: int, remote: dict[int, tuple[list[int], list[int]]]) -> None:
        """The row's remote groups after a rebuild: a group that only grew keeps its epoch (its
        creditor then gets the new entries alone), any other change takes the table's epoch."""
        st = self._sync[row]
        rid = self.requests[row].request_id
        old, st.remote = st.remote, {}
        for c, (blocks, logical) in remote.items():
            g = old.get(c)
            k = len(g.blocks) if g is not None else 0
            if g is not None and blocks[:k] == g.blocks and logical[:k] == g.logical:
                g.blocks, g.logical = blocks, logical
            else:
                g = RemoteGroup(blocks, logical, st.epoch)
            st.remote[c] = g
        self._remote_dropped.extend((c, rid) for c in old if c not in st.remote)

    def _remove(self, row: int) -> None:
        """The last row moves into ``row`` (its tables copied once), so rows stay 0..n-1."""
        rid = self.requests[row].request_id
        self._remote_dropped.extend((c, rid) for c in self._sync[row].remote)
        last = len(self.requests) - 1
        if row != last:
            n = int(self.nb_np[last])
            self.bt_np[row, :n] = self.bt_np[last, :n]
            self.bi_np[row, :n] = self.bi_np[last, :n]
            self.nb_np[row] = n
            moved = self.requests[last]
            self.requests[row] = moved
            self._sync[row] = self._sync[last]
            self.row_of[moved.request_id] = row
            self._row_changed(row)  # re-uploaded whole: a leave is rare, a row is O(its blocks)
        self.nb_np[last] = 0
        self.requests.pop()
        self._sync.pop()
        del self.row_of[rid]

    # ---- device upload ------------------------------------------------------------------------
    def upload(self) -> None:
        """Copy what changed to the device: rebuilt or moved rows whole, appended entries one by one,
        and the block counts (rows past the batch read 0: a graph's padding rows see no key)."""
        if self.on_host:
            return
        dev = self.device
        n_rows = self.num_rows
        for row in self._rows:
            n = int(self.nb_np[row])
            if row < n_rows and n:
                self.block_tables[row, :n].copy_(self._bt_h[row, :n].to(dev))
                self.block_idx[row, :n].copy_(self._bi_h[row, :n].to(dev))
        cells = [(r, c) for r, c in self._cells if r < n_rows and r not in self._rows]
        if cells:
            rows = np.fromiter((r for r, _ in cells), dtype=np.int64, count=len(cells))
            cols = np.fromiter((c for _, c in cells), dtype=np.int64, count=len(cells))
            idx = torch.from_numpy(rows * self.max_blocks + cols).to(dev)
            self.block_tables.view(-1).index_copy_(0, idx, torch.from_numpy(self.bt_np[rows, cols]).to(dev))
            self.block_idx.view(-1).index_copy_(0, idx, torch.from_numpy(self.bi_np[rows, cols]).to(dev))
        self._rows.clear()
        self._cells.clear()
        self.num_blocks.copy_(self._nb_h.to(dev))

    # ---- checks -----------------------------------------------------------------------------------
    def rebuilt_from_scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows as a from-scratch build from the rManager's tables would make them
        (tests compare the persistent state with this)."""
        n = self.num_rows
        bt = np.zeros((n, self.max_blocks), dtype=np.int32)
        bi = np.zeros((n, self.max_blocks), dtype=np.int32)
        nb = np.zeros(n, dtype=np.int32)
        for row, req in enumerate(self.requests):
            table = self.rm.table(req.request_id)
            local = [(ref.block, i) for i, ref in enumerate(table) if ref.instance == self.rank]
            nb[row] = len(local)
            for j, (b, i) in enumerate(local):
                bt[row, j], bi[row, j] = b, i
        return bt, bi, nb

    def remote_from_scratch(self) -> list[dict[int, tuple[list[int], list[int]]]]:
        """Per row, its blocks on each creditor (ids, logical indices) as a from-scratch build of the
        rManager's tables makes them (tests compare the remote groups with this)."""
        out = []
        for req in self.requests:
            groups: dict[int, tuple[list[int], list[int]]] = {}
            for i, ref in enumerate(self.rm.table(req.request_id)):
                if ref.instance != self.rank:
                    blocks, logical = groups.setdefault(ref.instance, ([], []))
                    blocks.append(ref.block)
                    logical.append(i)
            out.append(groups)
        return out
