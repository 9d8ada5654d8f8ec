"""Engine configuration, validated once where it enters (LLM(...), the CLI)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class EngineConfig:
    model: str | None = None  # checkpoint folder; None = the embedded default model
    dtype: str = "auto"  # auto = the checkpoint's torch_dtype (float32 on CPU for half types)
    device: str | None = None  # None: cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None  # per instance; None = sized from free memory
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    seed: int = 0
    num_instances: int = 1
    # ranks (devices) per instance: Megatron-style tensor parallelism inside the instance
    # (infinite/model/parallel.py); to the cluster a group is one instance
    tensor_parallel_size: int = 1
    enable_lending: bool = True  # let requests borrow KV blocks from other instances
    max_lend_fraction: float = 0.95  # a creditor lends at most this share of its pool (beyond its own demand)
    max_remote_fraction: float = 0.5  # throughput moves keep a request's remote share under this
    # lend for throughput from the cost model's first fit, before remote steps were measured
    # (the default waits for them: on hardware where the idle probe underestimates the remote
    # path that first guess loses throughput; docs/distributed.md)
    eager_lending: bool = False
    placement_interval_s: float = 0.5  # how often the gManager reruns the placement
    threads_per_rank: int | None = None  # torch CPU threads of each rank; None = cores / ranks on the host
    data_plane: str = "p2p"  # remote MicroAttention over torch.distributed point-to-point ("p2p") or RPC ("rpc")
    served_model_name: str | None = None
    # Run every step eagerly: no CUDA graphs for decode (vLLM's --enforce-eager). CPU always runs eager.
    enforce_eager: bool = False
    # Reuse the KV of cached prompt prefixes, on this instance and across the cluster (vLLM's
    # automatic prefix caching; --no-enable-prefix-caching turns it off).
    enable_prefix_caching: bool = True
    # Prefill groups (docs/distributed.md): a prompt of at least group_min_prompt_tokens may be
    # prefilled by several instances at once when the gManager's cost model predicts it ends
    # group_min_speedup times sooner than its home alone, within group_min_efficiency of the home's
    # compute in a busy cluster (infinite/cluster/sp_policy.py).
    prefill_groups: bool = True
    group_min_prompt_tokens: int = 65536
    group_min_speedup: float = 1.2
    group_min_efficiency: float = 0.7

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")
        if self.threads_per_rank is not None and (
            isinstance(self.threads_per_rank, bool) or not isinstance(self.threads_per_rank, int) or self.threads_per_rank < 1
        ):
            raise ValueError(f"threads_per_rank must be a positive integer, got {self.threads_per_rank!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if not isinstance(self.eager_lending, bool):
            raise ValueError(f"eager_lending must be a bool, got {self.eager_lending!r}")
        if self.data_plane not in ("p2p", "rpc"):
            raise ValueError(f"data_plane must be 'p2p' or 'rpc', got {self.data_plane!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_instances", "tensor_parallel_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.tensor_parallel_size > 1 and self.data_plane != "p2p":
            raise ValueError("tensor_parallel_size > 1 needs the point-to-point data plane (data_plane='p2p'): "
                             "each rank of a group exchanges its heads' attention with its counterpart")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and (
            isinstance(self.num_kv_blocks, bool) or not isinstance(self.num_kv_blocks, int) or self.num_kv_blocks < 1
        ):
            raise ValueError(f"num_kv_blocks must be a positive integer, got {self.num_kv_blocks!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if not isinstance(self.prefill_groups, bool):
            raise ValueError(f"prefill_groups must be a bool, got {self.prefill_groups!r}")
        v = self.group_min_prompt_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"group_min_prompt_tokens must be a positive integer, got {v!r}")
        v = self.group_min_speedup
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v < float("inf"):
            raise ValueError(f"group_min_speedup must be a number >= 1, got {v!r}")
        for name in ("max_lend_fraction", "max_remote_fraction", "group_min_efficiency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected 'cpu' or 'cuda[:N]'")

    @property
    def num_processes(self) -> int:
        """Rank processes of the cluster: every instance's tensor-parallel group."""
        return self.num_instances * self.tensor_parallel_size

    def rank_threads(self, local_ranks: int) -> int:
        """Torch threads of one rank when ``local_ranks`` ranks share this host's cores."""
        if self.threads_per_rank is not None:
            return self.threads_per_rank
        return max(1, (os.cpu_count() or 1) // max(1, local_ranks))

    def torch_dtype(self, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
        chosen = _DTYPES[self.dtype]
        if chosen is not None:
            return chosen
        ck = _DTYPES.get(str(checkpoint_dtype or "float32"), torch.float32) or torch.float32
        if device.type == "cpu" and ck == torch.float16:
            return torch.float32  # CPU half matmuls are slow and inexact
        return ck

    def torch_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
