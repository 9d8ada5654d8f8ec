"""Decode steps replayed from CUDA graphs, one per padded batch size (vLLM, nano-vllm).

A pure decode step whose KV is all local is the same sequence of kernels every
time: only the values in its inputs change. So at start-up the runner captures
one graph per batch size in ``capture_sizes`` (largest first, sharing one
memory pool), each reading its inputs from static device buffers:

* token ids, positions and slots: rows ``0..b-1`` of ``DecodeBuffers.dev``
  (``prepare_decode`` writes the step's rows there and pads the rest with rows
  that see no key and write no KV);
* the block tables and block counts: rows ``0..b-1`` of the persistent batch's
  device tables, full width (the kernels bound their loops by the device-side
  counts, so one capture serves every context length);
* RoPE tables reserved to ``max_model_len`` before capture.

A step of ``n`` rows replays the graph of the smallest size ``b >= n`` and
reads logits ``[:n]``. Batches larger than the largest size, steps with
prefill chunks or remote MicroAttention run eager (docs/kernels.md says why).

Without capture (a CPU device, or ``enforce_eager``) ``run`` calls the same
padded forward eagerly: that is how the padding, the buckets and the static
buffers are tested on CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from infinite.attention import MAMetadata
from infinite.kv.cache import KVCache
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.model_runner import DecodeBuffers, LocalAttention, StepInputs, forward

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes with a graph: 1, 2, 4, then every multiple of 8 up to ``max_batch``
    (vLLM's default list), and ``max_batch`` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


@dataclass
class CaptureReport:
    sizes: list[int]
    seconds: float
    memory_bytes: int  # device memory the graphs' pool took


class GraphRunner:
    def __init__(self, model, kv: KVCache, ib: InputBatch, buf: DecodeBuffers, scale: float,
                 max_batch: int, max_position: int) -> None:
        self.model, self.kv, self.ib, self.buf, self.scale = model, kv, ib, buf, scale
        self.sizes = capture_sizes(min(max_batch, ib.max_rows))
        self.max_position = max_position  # RoPE reserved this far: a replay never grows a table
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [b, V] outputs of each graph

    def bucket(self, n: int) -> int | None:
        """The padded size a step of ``n`` rows runs at; None above the largest."""
        for s in self.sizes:
            if s >= n:
                return s
        return None

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    # ---- the padded forward ------------------------------------------------------------------
    def padded_inputs(self, b: int) -> StepInputs:
        """Step inputs over static rows ``0..b-1``: the tensors every replay of size ``b`` reads."""
        dev = self.buf.dev
        ib = self.ib
        meta = MAMetadata(
            cu_q=self.buf.cu_q[: b + 1],
            q_pos=dev[1, :b],
            block_tables=ib.block_tables[:b],  # full width: loops end at the device-side counts
            block_idx=ib.block_idx[:b],
            num_blocks=ib.num_blocks[:b],
            max_q_len=1,
        )
        return StepInputs(dev[0, :b], dev[1, :b], dev[2, :b], meta, self.buf.arange[:b], [], [1] * b, [],
                          max_position=self.max_position)

    def _forward(self, b: int) -> torch.Tensor:
        inputs = self.padded_inputs(b)
        return forward(self.model, inputs, LocalAttention(self.kv, inputs, self.scale))  # [b, V]

    def run(self, n: int) -> torch.Tensor:
        """Logits [n, V] of a decode step whose inputs ``prepare_decode`` padded to ``bucket(n)``."""
        b = self.bucket(n)
        if b is None:
            raise ValueError(f"a decode step of {n} rows is over the largest graph size {self.sizes[-1]}")
        g = self.graphs.get(b)
        if g is None:
            return self._forward(b)[:n]
        g.replay()
        return self.logits[b][:n]

    # ---- capture -------------------------------------------------------------------------------
    def capture(self) -> CaptureReport:
        """One graph per size, largest first, in one shared pool. Rows past the live batch have a
        block count of 0, so the warm-up and captured runs read no KV and write none."""
        if self.kv.k.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        h = self.buf.host
        for b in reversed(self.sizes):
            h[0, :b], h[1, :b], h[2, :b] = 0, 0, -1
            self.buf.upload(b)
            self.ib.upload()
            self._forward(b)  # warm-up: compiles the kernels, sizes the workspaces
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = g
        torch.cuda.synchronize()
        report = CaptureReport(list(self.sizes), time.perf_counter() - t0,
                               max(0, free_before - torch.cuda.mem_get_info()[0]))
        log.info("captured %d decode graphs (batch %d..%d) in %.1f s, %.0f MiB", len(self.sizes), self.sizes[0],
                 self.sizes[-1], report.seconds, report.memory_bytes / 2**20)
        return report
