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

    def read_blocks(self, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Contents of whole blocks (a migration's source): k, v [L, n, B, nkv, d]."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        return self.k.index_select(1, idx), self.v.index_select(1, idx)

    def write_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill whole blocks (a migration's destination) from k, v [L, n, B, nkv, d] on any device."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.k.device)
        self.k.index_copy_(1, idx, k.to(self.k.device))
        self.v.index_copy_(1, idx, v.to(self.v.device))


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


def auto_num_blocks(block_bytes: int, device: torch.device) -> int:
    """Blocks that fit on a CPU device: a modest share of RAM (a GPU's pool is sized by profiling,
    infinite.runtime.memory)."""
    if device.type != "cpu":
        raise ValueError(f"auto_num_blocks sizes CPU pools; {device} is profiled (infinite.runtime.memory)")
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    budget = min(avail // 10, 1 << 30)
    return max(1, budget // block_bytes)
