"""Tensor parallelism inside one instance: which slice of every weight a rank holds, and the
group's collectives.

Why: a model whose weights do not fit one device (70B in bfloat16 is 140 GB) runs as a group
of ``tp`` ranks, Megatron-style. QKV and gate/up are column-parallel (each rank computes its
heads and its share of the MLP width), o_proj and down are row-parallel (each rank's partial
product, one all-reduce each per layer), and the vocabulary is split for the embedding (one
all-reduce of the masked lookups) and for the logits (gathered on the group's first rank,
the only one that samples). The heads split evenly; where there are fewer KV heads than
ranks, each KV head is replicated on ``tp / nkv`` ranks (the ranks whose query heads use it).

``TPShard`` is pure arithmetic on a ModelConfig (tested directly); ``TPGroup`` wraps a
torch.distributed process group (gloo on CPU, NCCL on GPU, the same calls).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ModelConfig


class GroupError(RuntimeError):
    """A collective of the tensor-parallel group failed: a rank of the group is gone or broken,
    so the whole group (one instance) has failed."""


@dataclass(frozen=True)
class TPShard:
    """What rank ``rank`` of a group of ``size`` holds: half-open ranges of heads, KV heads, MLP
    columns and (padded) vocabulary rows."""

    rank: int
    size: int
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]  # rows of the vocabulary padded to size * vocab_per_rank (may end past it)
    vocab_per_rank: int

    @property
    def first(self) -> bool:
        """The group's first rank: it alone adds the row-parallel biases (the all-reduce sums them once)."""
        return self.rank == 0


def shard_of(cfg: ModelConfig, rank: int, size: int) -> TPShard:
    """Rank ``rank``'s share of ``cfg`` in a group of ``size``; ValueError with the numbers when the
    model cannot be split that way."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {size!r}")
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a group of {size}")
    check_divisible(cfg, size)
    nh = cfg.num_heads // size
    inter = cfg.intermediate_size // size
    vpr = -(-cfg.vocab_size // size)
    return TPShard(rank, size, (rank * nh, (rank + 1) * nh), kv_layout(cfg.num_kv_heads, size)[rank],
                   (rank * inter, (rank + 1) * inter), (rank * vpr, (rank + 1) * vpr), vpr)


def kv_layout(num_kv_heads: int, size: int) -> list[tuple[int, int]]:
    """Each rank's KV heads [lo, hi): an even split, or (fewer KV heads than ranks) the one KV head its
    query heads use, replicated on ``size / num_kv_heads`` consecutive ranks."""
    if num_kv_heads >= size:
        per = num_kv_heads // size
        return [(r * per, (r + 1) * per) for r in range(size)]
    return [(r * num_kv_heads // size, r * num_kv_heads // size + 1) for r in range(size)]


def check_divisible(cfg: ModelConfig, size: int) -> None:
    """Whether a group of ``size`` can split ``cfg`` (ValueError naming the setting otherwise)."""
    if cfg.num_heads % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's {cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {size} and the model's {cfg.num_kv_heads} KV heads: one must "
                         "divide the other (KV heads are split, or replicated when fewer than ranks)")
    if cfg.intermediate_size % size:
        raise ValueError(f"tensor_parallel_size {size} does not divide the model's intermediate_size "
                         f"{cfg.intermediate_size}")


def local_config(cfg: ModelConfig, shard: TPShard) -> ModelConfig:
    """The architecture one rank runs: its heads, KV heads and MLP width (hidden size, layers and the
    vocabulary, the width of the logits the group returns, are the model's)."""
    return dataclasses.replace(cfg, num_heads=shard.heads[1] - shard.heads[0],
                               num_kv_heads=shard.kv_heads[1] - shard.kv_heads[0],
                               intermediate_size=shard.intermediate[1] - shard.intermediate[0])


class TPGroup:
    """One instance's ranks and their collectives; every rank of the group must make the same calls
    in the same order. Errors come out as GroupError."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int, device: torch.device) -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.device = device

    def _run(self, fn, *args, **kwargs):
        try:
            return fn(*args, group=self.group, **kwargs)
        except GroupError:
            raise
        except Exception as e:  # noqa: BLE001 - gloo/NCCL errors of a lost peer: the group has failed
            raise GroupError(f"tensor-parallel collective {fn.__name__} failed: {e}") from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns x."""
        self._run(dist.all_reduce, x)
        return x

    def all_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._run(dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_max(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._run(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """From the group's first rank to the others, in place."""
        self._run(dist.broadcast, t, group_src=0)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's ``t`` (same shape everywhere) on the first rank, in rank order; None elsewhere."""
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.rank == 0 else None
        self._run(dist.gather, t.contiguous(), gather_list=parts, group_dst=0)
        return parts

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None) -> torch.Tensor:
        """Part r of the first rank's ``parts`` into rank r's ``out``."""
        self._run(dist.scatter, out, scatter_list=None if parts is None else [p.contiguous() for p in parts],
                  group_src=0)
        return out

    def gather_columns(self, x: torch.Tensor, width: int) -> torch.Tensor | None:
        """x [N, k] on every rank -> [N, width] (the ranks' columns side by side, cut at ``width``) on the
        first rank; None elsewhere (the vocabulary-parallel logits)."""
        parts = self.gather(x)
        return None if parts is None else torch.cat(parts, dim=-1)[:, :width]
