"""How many KV blocks an instance on a GPU gets: vLLM's way, measured rather than guessed.

The pool takes what is left of ``total x gpu_memory_utilization`` once the
weights, the peak activations of the largest step the scheduler can make
(``max_num_batched_tokens`` of prefill) and the decode graphs' memory pool are
counted. The activations are measured by running that step once on a
throw-away KV cache (``profile_peaks``); the graphs' pool by a decode step of
the largest batch (a captured graph holds about that step's activations).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from infinite.attention import MAMetadata
from infinite.kv.cache import KVCache, auto_num_blocks, bytes_per_block
from infinite.kv.rmanager import blocks_for
from infinite.runtime.config import EngineConfig
from infinite.runtime.model_runner import LocalAttention, StepInputs, forward

log = logging.getLogger(__name__)


@dataclass
class MemoryPlan:
    total: int  # device memory
    utilization: float
    in_use: int  # allocated before profiling: weights, tables, buffers
    prefill_peak: int  # extra memory at the peak of the largest prefill step
    graph_reserve: int  # extra memory of the largest decode step: what its graph's pool holds
    non_torch: int  # memory held outside torch's allocator (CUDA context, NCCL buffers)

    @property
    def kv_bytes(self) -> int:
        return kv_budget(self.total, self.utilization, self.in_use, self.prefill_peak, self.graph_reserve,
                         self.non_torch)


def kv_budget(total: int, utilization: float, in_use: int, prefill_peak: int, graph_reserve: int,
              non_torch: int) -> int:
    """Bytes for the KV pool: the share of the device this instance may use, minus everything else."""
    return max(0, int(total * utilization) - in_use - prefill_peak - graph_reserve - non_torch)


def _profile_forward(model, num_tokens: int, num_rows: int, block_size: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """Peak extra memory of one forward of ``num_rows`` requests sharing ``num_tokens`` new tokens."""
    c = model.config
    per_row = num_tokens // num_rows
    q_lens = [per_row] * num_rows
    q_lens[-1] += num_tokens - per_row * num_rows
    nb = [blocks_for(n, block_size) for n in q_lens]
    kv = KVCache(c.num_layers, sum(nb), block_size, c.num_kv_heads, c.head_dim, dtype, device)
    blocks, first = [], 0
    for n in nb:
        blocks.append(list(range(first, first + n)))
        first += n
    meta = MAMetadata.build(q_lens, [0] * num_rows, blocks, device=device)
    pos = meta.q_pos
    slots = torch.cat([torch.arange(n, device=device) + b[0] * block_size for n, b in zip(q_lens, blocks)])
    last = torch.cumsum(torch.tensor(q_lens, device=device), 0) - 1
    inputs = StepInputs(torch.zeros(num_tokens, dtype=torch.int64, device=device), pos, slots, meta, last, [],
                        q_lens, [0] * num_rows, max_position=max(q_lens) - 1)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    forward(model, inputs, LocalAttention(kv, inputs, c.head_dim ** -0.5))
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del kv, inputs, meta
    torch.cuda.empty_cache()
    return max(0, peak)


def profile_peaks(model, max_num_batched_tokens: int, max_num_seqs: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, utilization: float) -> MemoryPlan:
    """Measure what the pool must leave room for (CUDA only)."""
    if device.type != "cuda":
        raise RuntimeError("memory profiling measures a CUDA device")
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    in_use = torch.cuda.memory_allocated(device)
    prefill = _profile_forward(model, max_num_batched_tokens, 1, block_size, dtype, device)
    decode = _profile_forward(model, max_num_seqs, max_num_seqs, block_size, dtype, device)
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    return MemoryPlan(total, utilization, in_use, prefill, decode, non_torch)


def size_pool(model, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> tuple[int, MemoryPlan | None]:
    """KV blocks of this rank's pool -> (blocks, the memory plan when a GPU was profiled): the configured
    count, what profiling leaves on a GPU, or a share of RAM on a CPU. Every rank of a tensor-parallel
    group runs this (the profile's forward holds the group's collectives) and the group takes the least."""
    c = model.config
    block_bytes = bytes_per_block(c.num_layers, config.block_size, c.num_kv_heads, c.head_dim, dtype)
    if config.num_kv_blocks:
        return config.num_kv_blocks, None
    if device.type != "cuda":
        return auto_num_blocks(block_bytes, device), None
    plan = profile_peaks(model, config.max_num_batched_tokens, config.max_num_seqs, config.block_size, dtype, device,
                         config.gpu_memory_utilization)
    num_blocks = plan.kv_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(f"no GPU memory is left for the KV cache: {plan} "
                         "(raise --gpu-memory-utilization or lower --max-num-batched-tokens)")
    log.info("KV pool: %d blocks (%.2f GiB) from %s", num_blocks, num_blocks * block_bytes / 2**30, plan)
    return num_blocks, plan
