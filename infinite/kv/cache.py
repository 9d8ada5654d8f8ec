"""The preallocated KV tensors of one instance, and how many blocks fit in memory."""

from __future__ import annotations

import os

import torch


class KVCache:
    """One K and one V tensor per layer, each [N, B, nkv, d]; a slot is block * B + offset."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # zeros, not empty: masked-out keys still meet their values in p @ v, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, N, B, nkv, d]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, N, B, nkv, d]


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def auto_num_blocks(block_bytes: int, device: torch.device, gpu_memory_utilization: float = 0.9) -> int:
    """Blocks that fit: on a GPU the free memory times the utilization; on CPU a modest share of RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * gpu_memory_utilization)
    else:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        budget = min(avail // 10, 1 << 30)
    return max(1, budget // block_bytes)
