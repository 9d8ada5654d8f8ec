"""A tensor-parallel instance's step, told by its first rank to the others.

Why: the scheduler, the sampler and the front door run once per instance, on the group's
first rank; the other ranks hold their shards of the model and their heads' KV, and must run
exactly the forward the first rank runs (every layer meets the group's all-reduces). So
before each forward the first rank broadcasts the step: the changes of its persistent batch's
block tables since the last step (the others mirror the tables: a step costs O(batch), not
O(blocks held)) and the step's inputs (token ids, positions, slots, logits rows: O(tokens)).

Two channels per group, each its own process group (one all-reduce order per channel):

* the step channel: commands the first rank's compute thread sends (``STEP``, ``REMOTE`` for
  the cluster's steps with remote blocks, ``PROBE``, ``NOOP`` as a keepalive, ``STOP``), and
  the model's collectives;
* the block channel: whole-block reads and writes of a migration (``GroupKVCache``), which the
  first rank serves from transport threads while its compute thread steps.

A message is a header ``int64[4]`` (command, payload length, two arguments) and an ``int64``
payload, both broadcast on the group's device (CPU for gloo, the GPU for NCCL).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RManager
from infinite.model.parallel import GroupError, TPGroup
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.model_runner import StepInputs, step_metadata

NOOP, SETUP, STEP, REMOTE, PROBE, STOP, READ, WRITE = range(8)
STEP_COMMANDS = frozenset({STEP, REMOTE})  # their payload starts with the first rank's table changes
HEADER = 4
KEEPALIVE_S = 0.5  # an idle first rank tells its group it lives (and learns whether they do) this often


# ---- payloads ------------------------------------------------------------------------------------


class PayloadWriter:
    """Ints from the host and int64 tensors from the device, in order, joined once into one tensor."""

    def __init__(self) -> None:
        self.pieces: list[torch.Tensor] = []

    def ints(self, values: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(values, dtype=np.int64).reshape(-1)
        if arr.size:
            self.pieces.append(torch.from_numpy(arr))

    def array(self, values: Sequence[int] | np.ndarray) -> None:
        """Length-prefixed."""
        arr = np.asarray(values, dtype=np.int64).reshape(-1)
        self.ints([arr.size])
        self.ints(arr)

    def tensor(self, t: torch.Tensor) -> None:
        if t.numel():
            self.pieces.append(t.reshape(-1).to(torch.int64))

    def build(self, device: torch.device) -> torch.Tensor:
        if not self.pieces:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat([p.to(device, non_blocking=True) for p in self.pieces])


class PayloadReader:
    """Reads a PayloadWriter's tensor in the same order: ints on the host (one copy of the whole
    payload), tensors as views of the device payload."""

    def __init__(self, payload: torch.Tensor) -> None:
        self.dev = payload
        self.host = payload.numpy() if payload.device.type == "cpu" else payload.cpu().numpy()
        self.off = 0

    def ints(self, n: int) -> np.ndarray:
        out = self.host[self.off:self.off + n]
        self.off += n
        return out

    def int(self) -> int:
        return int(self.ints(1)[0])

    def array(self) -> np.ndarray:
        return self.ints(self.int())

    def tensor(self, n: int) -> torch.Tensor:
        out = self.dev[self.off:self.off + n]
        self.off += n
        return out

    @property
    def done(self) -> bool:
        return self.off == self.host.size


class Channel:
    """One direction of a group: its first rank's commands to the others."""

    def __init__(self, group: TPGroup) -> None:
        self.group = group
        self.device = group.device

    def send(self, cmd: int, payload: PayloadWriter | None = None, a: int = 0, b: int = 0) -> None:
        data = payload.build(self.device) if payload is not None else None
        n = 0 if data is None else data.numel()
        self.group.broadcast(torch.tensor([cmd, n, a, b], dtype=torch.int64).to(self.device))
        if n:
            self.group.broadcast(data)

    def recv(self) -> tuple[int, PayloadReader | None, int, int]:
        hdr = self.group.broadcast(torch.empty(HEADER, dtype=torch.int64, device=self.device))
        cmd, n, a, b = hdr.tolist()
        if not n:
            return cmd, None, a, b
        return cmd, PayloadReader(self.group.broadcast(torch.empty(n, dtype=torch.int64, device=self.device))), a, b


# ---- the persistent batch's tables, mirrored -----------------------------------------------------


def put_table_changes(w: PayloadWriter, ib: InputBatch) -> None:
    """The rows and cells of ``ib``'s tables that changed since the last call, and the rows' block
    counts: O(rows, changed entries). Whole rows go for rows joined, rebuilt or moved into."""
    n = ib.num_rows
    rows = sorted(r for r in ib.mirror_rows if r < n)
    whole = set(rows)
    cells = np.asarray([(r, c) for r, c in ib.mirror_cells if r < n and r not in whole], dtype=np.int64)
    cells = cells.reshape(-1, 2)
    parts = [np.asarray([n, len(rows), len(cells)], dtype=np.int64)]
    for r in rows:
        k = int(ib.nb_np[r])
        parts += [np.asarray([r, k], dtype=np.int64), ib.bt_np[r, :k], ib.bi_np[r, :k]]
    if len(cells):
        rr, cc = cells[:, 0], cells[:, 1]
        parts += [rr, cc, ib.bt_np[rr, cc], ib.bi_np[rr, cc]]
    parts.append(ib.nb_np[:n])
    w.ints(np.concatenate([p.astype(np.int64) for p in parts]))
    ib.mirror_rows.clear()
    ib.mirror_cells.clear()


class MirrorBatch(InputBatch):
    """The tables of the first rank's persistent batch on another rank of its group: changed by the
    diffs it sends (``apply``), uploaded like the original. Rows carry no Request here."""

    def __init__(self, rank: int, max_rows: int, max_blocks: int, block_size: int, device: torch.device) -> None:
        super().__init__(RManager(rank, max_blocks, block_size), max_rows, max_blocks, device)
        self._num_rows = 0

    @property
    def num_rows(self) -> int:  # type: ignore[override]
        return self._num_rows

    def apply(self, r: PayloadReader) -> None:
        n, nrows, ncells = (int(x) for x in r.ints(3))
        for _ in range(nrows):
            row, k = (int(x) for x in r.ints(2))
            self.bt_np[row, :k] = r.ints(k)
            self.bi_np[row, :k] = r.ints(k)
            if not self.on_host:
                self._rows.add(row)
        if ncells:
            rr, cc = r.ints(ncells), r.ints(ncells)
            self.bt_np[rr, cc] = r.ints(ncells)
            self.bi_np[rr, cc] = r.ints(ncells)
            if not self.on_host:
                self._cells.extend(zip(rr.tolist(), cc.tolist()))
        self.nb_np[:n] = r.ints(n)
        self.nb_np[n:max(n, self._num_rows)] = 0
        self._num_rows = n
        self.upload()


# ---- a step's inputs -----------------------------------------------------------------------------


def put_step(w: PayloadWriter, inputs: StepInputs) -> None:
    """What another rank needs to run the same forward: O(tokens + rows)."""
    t, r, s = inputs.input_ids.numel(), len(inputs.q_lens), inputs.logits_indices.numel()
    gathered = inputs.rows != list(range(r))  # a cluster's micro-batch: a subset of the batch's rows
    w.ints([t, r, s, inputs.max_position, int(gathered)])
    for x in (inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.logits_indices):
        w.tensor(x)
    w.ints(inputs.q_lens)
    if gathered:
        w.ints(inputs.rows)


def get_step(r: PayloadReader, ib: InputBatch) -> StepInputs:
    """The StepInputs ``put_step`` wrote, with the block metadata rebuilt from the mirrored tables."""
    t, rows_n, s, max_pos, gathered = (int(x) for x in r.ints(5))
    ids, pos, slots, logits_idx = r.tensor(t), r.tensor(t), r.tensor(t), r.tensor(s)
    q_lens = r.ints(rows_n).tolist()
    rows = r.ints(rows_n).tolist() if gathered else None
    meta = step_metadata(ib, rows, q_lens, pos)
    return StepInputs(ids, pos, slots, meta, logits_idx, [], q_lens, [], max_position=max_pos,
                      rows=rows if rows is not None else list(range(rows_n)))


# ---- whole blocks across the group (migrations) -------------------------------------------------


class GroupKVCache(KVCache):
    """The first rank's pool, whose block reads and writes cover every rank's heads: a migration moves
    whole blocks between instances, and each rank's pool holds only its heads of them. Called from
    transport threads and the compute thread alike (one lock: one order on the block channel)."""

    def __init__(self, channel: Channel, layout: list[tuple[int, int]], *kv_args) -> None:
        super().__init__(*kv_args)
        self.channel = channel
        self.layout = layout  # each rank's KV heads [lo, hi)
        self._lock = threading.Lock()

    def read_blocks(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            w = PayloadWriter()
            w.ints(blocks)
            self.channel.send(READ, w)
            k, v = super().read_blocks(blocks)
            group = self.channel.group
            return merge_heads(group.gather(k), self.layout), merge_heads(group.gather(v), self.layout)

    def write_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        with self._lock:
            w = PayloadWriter()
            w.ints(blocks)
            self.channel.send(WRITE, w)
            group = self.channel.group
            dev = self.k.device
            ks, vs = split_heads(k.to(dev), self.layout), split_heads(v.to(dev), self.layout)
            super().write_blocks(blocks, group.scatter(torch.empty_like(ks[0]), ks),
                                 group.scatter(torch.empty_like(vs[0]), vs))


def merge_heads(parts: list[torch.Tensor], layout: list[tuple[int, int]]) -> torch.Tensor:
    """Every rank's [L, n, B, nkv_r, d] -> the whole [L, n, B, nkv, d] (a replicated head taken once)."""
    first = {}
    for r, span in enumerate(layout):
        first.setdefault(span, r)
    return torch.cat([parts[first[span]] for span in sorted(first)], dim=3)


def split_heads(x: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """[L, n, B, nkv, d] -> each rank's heads of it."""
    return [x[:, :, :, lo:hi] for lo, hi in layout]


def serve_blocks(channel: Channel, kv: KVCache) -> None:
    """A rank other than the first: answer the block channel until STOP (its own thread)."""
    group = channel.group
    while True:
        cmd, payload, _, _ = channel.recv()
        if cmd == STOP:
            return
        blocks = payload.ints(payload.host.size).tolist()
        if cmd == READ:
            k, v = kv.read_blocks(blocks)
            group.gather(k)
            group.gather(v)
        elif cmd == WRITE:
            shape = (kv.k.shape[0], len(blocks), *kv.k.shape[2:])
            k = group.scatter(torch.empty(shape, dtype=kv.k.dtype, device=kv.k.device), None)
            v = group.scatter(torch.empty(shape, dtype=kv.v.dtype, device=kv.v.device), None)
            kv.write_blocks(blocks, k, v)
        else:
            raise GroupError(f"unknown block command {cmd}")


# ---- the first rank ------------------------------------------------------------------------------


class TPLeader:
    """What an engine on a group's first rank uses to drive the group (runtime/engine.py)."""

    def __init__(self, group: TPGroup, blocks: TPGroup, kv_layout: list[tuple[int, int]]) -> None:
        self.group = group
        self.channel = Channel(group)
        self.block_channel = Channel(blocks)
        self.kv_layout = kv_layout
        self.input_batch: InputBatch | None = None
        self._last = time.monotonic()

    @property
    def size(self) -> int:
        return self.group.size

    def kv_cache(self, *kv_args) -> GroupKVCache:
        return GroupKVCache(self.block_channel, self.kv_layout, *kv_args)

    def attach(self, ib: InputBatch, max_model_len: int) -> None:
        """The engine's persistent batch: its changes go to the other ranks with every step."""
        ib.mirror_rows, ib.mirror_cells = set(), []
        self.input_batch = ib
        w = PayloadWriter()
        w.ints([ib.max_rows, ib.max_blocks, max_model_len])
        self.send(SETUP, w)

    def send(self, cmd: int, payload: PayloadWriter | None = None, a: int = 0) -> None:
        self.channel.send(cmd, payload, a)
        self._last = time.monotonic()

    def send_step(self, cmd: int, fill: Callable[[PayloadWriter], None]) -> None:
        """A step command: the table changes first, then what ``fill`` writes."""
        w = PayloadWriter()
        put_table_changes(w, self.input_batch)
        fill(w)
        self.send(cmd, w)

    def step(self, inputs: StepInputs) -> None:
        self.send_step(STEP, lambda w: put_step(w, inputs))

    def idle(self) -> None:
        """Between steps with nothing to run: a keepalive now and then, so that a lost rank of the group
        shows (as a GroupError) even on an idle instance."""
        if time.monotonic() - self._last > KEEPALIVE_S:
            self.send(NOOP)

    def stop(self) -> None:
        """Both channels: the other ranks exit their loops."""
        self.send(STOP)
        self.block_channel.send(STOP)
