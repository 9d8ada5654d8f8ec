"""Torch MicroAttention / AggregationAttention against dense float64 attention."""

import random

import pytest
import torch

from infinite.attention import MAMetadata, aggregate, micro_attention, write_kv


def dense_reference(q, k, v, q_pos, scale):
    """q [n,nh,d], k/v [S,nkv,d] (positions 0..S-1) -> out [n,nh,d], lse [n,nh] in float64."""
    nh, nkv = q.shape[1], k.shape[1]
    g = nh // nkv
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,shd->hns", q.double(), k) * scale
    mask = torch.arange(k.shape[0])[None, :] > q_pos[:, None]
    s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hns,shd->nhd", torch.softmax(s, -1), v)
    return out, lse.T


def fill_request(k_cache, v_cache, blocks, length, nkv, d, gen):
    """Write `length` random keys/values into `blocks`, return the dense k, v."""
    bsz = k_cache.shape[1]
    k = torch.randn(length, nkv, d, generator=gen)
    v = torch.randn(length, nkv, d, generator=gen)
    slots = torch.tensor([blocks[p // bsz] * bsz + p % bsz for p in range(length)])
    write_kv(k_cache, v_cache, k, v, slots)
    return k, v


@pytest.mark.parametrize("bsz,nh,nkv,d", [(16, 4, 4, 16), (16, 8, 2, 32), (32, 8, 1, 64)])
def test_mixed_prefill_and_decode_match_dense(bsz, nh, nkv, d):
    gen = torch.Generator().manual_seed(bsz * 131 + nh)
    n_blocks = 64
    k_cache = torch.zeros(n_blocks, bsz, nkv, d)
    v_cache = torch.zeros(n_blocks, bsz, nkv, d)
    free = list(range(n_blocks))
    random.Random(0).shuffle(free)
    # (context length, number of new query tokens at the end)
    reqs = [(1, 1), (37, 1), (50, 50), (70, 13), (33, 1), (bsz, bsz)]
    q_lens, q_starts, tables, dense = [], [], [], []
    for length, nq in reqs:
        nb = -(-length // bsz)
        blocks = [free.pop() for _ in range(nb)]
        dense.append(fill_request(k_cache, v_cache, blocks, length, nkv, d, gen))
        q_lens.append(nq)
        q_starts.append(length - nq)
        tables.append(blocks)
    meta = MAMetadata.build(q_lens, q_starts, tables)
    q = torch.randn(sum(q_lens), nh, d, generator=gen)
    scale = d**-0.5
    out, lse = micro_attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and lse.shape == (q.shape[0], nh)
    off = 0
    for (length, nq), (k, v), start in zip(reqs, dense, q_starts):
        ref_o, ref_l = dense_reference(q[off : off + nq], k, v, torch.arange(start, start + nq), scale)
        torch.testing.assert_close(out[off : off + nq].double(), ref_o, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse[off : off + nq].double(), ref_l, rtol=1e-4, atol=1e-5)
        off += nq


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_split_blocks_merged_by_aggregation_equal_whole(parts):
    """Any split of a request's blocks into parts, merged by AA, equals attention over all."""
    gen = torch.Generator().manual_seed(parts)
    bsz, nh, nkv, d = 16, 8, 2, 32
    length = 16 * 9 + 5
    nb = -(-length // bsz)
    k_cache = torch.zeros(32, bsz, nkv, d)
    v_cache = torch.zeros(32, bsz, nkv, d)
    blocks = random.Random(parts).sample(range(32), nb)
    fill_request(k_cache, v_cache, blocks, length, nkv, d, gen)
    # two requests: a decode query at the end, and a prefill chunk of 20 tokens
    q = torch.randn(1 + 20, nh, d, generator=gen)
    whole = MAMetadata.build([1, 20], [length - 1, length - 20], [blocks, blocks])
    ref = micro_attention(q, k_cache, v_cache, whole, d**-0.5)
    logical = list(range(nb))
    random.Random(parts + 7).shuffle(logical)
    chunks = [sorted(logical[i::parts]) for i in range(parts)]
    partial = []
    for ch in chunks:
        meta = MAMetadata.build(
            [1, 20], [length - 1, length - 20], [[blocks[j] for j in ch]] * 2, [ch, ch]
        )
        partial.append(micro_attention(q, k_cache, v_cache, meta, d**-0.5))
    out, lse = aggregate(partial)
    torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref[1], rtol=1e-5, atol=1e-6)


def test_part_with_no_visible_key_contributes_nothing():
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(4, 16, 2, 8, generator=gen)
    v_cache = torch.randn(4, 16, 2, 8, generator=gen)
    q = torch.randn(1, 4, 8, generator=gen)
    seen = MAMetadata.build([1], [20], [[0, 1]], [[0, 1]])
    unseen = MAMetadata.build([1], [20], [[2]], [[5]])  # keys at positions 80..95 > 20
    o1, l1 = micro_attention(q, k_cache, v_cache, seen, 0.3)
    o2, l2 = micro_attention(q, k_cache, v_cache, unseen, 0.3)
    assert torch.isinf(l2).all() and (o2 == 0).all()
    out, lse = aggregate([(o1, l1), (o2, l2)])
    torch.testing.assert_close(out, o1)
    torch.testing.assert_close(lse, l1)
