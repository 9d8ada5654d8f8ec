"""Shared by the attention kernel tests: a NaN-poisoned paged pool and a float64 reference."""

import random

import torch

from infinite.attention import torch_ops
from infinite.attention.metadata import MAMetadata
from infinite.attention.reference import attention_f64, max_rel_err

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


class Pool:
    """A NaN-poisoned paged cache holding random requests, so any read of an unwritten slot shows."""

    def __init__(self, num_blocks, bsz, nkv, d, dtype, gen):
        self.k = torch.full((num_blocks, bsz, nkv, d), float("nan"), dtype=dtype)
        self.v = torch.full((num_blocks, bsz, nkv, d), float("nan"), dtype=dtype)
        self.free = list(range(num_blocks))
        random.Random(int(torch.randint(0, 2**31, (1,), generator=gen))).shuffle(self.free)
        self.gen = gen

    def add(self, length: int) -> list[int]:
        """Blocks of a new request with `length` random keys/values (written through torch_ops)."""
        bsz, nkv, d = self.k.shape[1:]
        blocks = [self.free.pop() for _ in range(-(-length // bsz))]
        slots = torch.tensor([blocks[p // bsz] * bsz + p % bsz for p in range(length)], dtype=torch.int64)
        k = torch.randn(length, nkv, d, generator=self.gen)
        v = torch.randn(length, nkv, d, generator=self.gen)
        torch_ops.write_kv(self.k, self.v, k, v, slots)
        return blocks


def reference(q, pool, meta: MAMetadata, scale):
    """float64 attention of each query over the keys its request's blocks hold at positions <= q_pos."""
    return attention_f64(q, pool.k, pool.v, meta, scale)


def check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and lse.dtype == torch.float32
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert torch.all(out[empty] == 0)
    if (~empty).any():
        assert max_rel_err(out[~empty], ref_out[~empty]) < TOL[dtype]
        assert max_rel_err(lse[~empty], ref_lse[~empty]) < TOL[dtype]
