"""The CPU fast paths of infinite.attention.torch_ops: query tiling, empty rows, the per-step plan cache."""

from __future__ import annotations

import pytest
import torch

from infinite.attention import MAMetadata, torch_ops


def dense(q, k, v, q_pos, k_pos, scale):
    """q [n,nh,d], k/v [S,nkv,d] at positions k_pos [S] -> out [n,nh,d], lse [n,nh] float64 (0 / -inf if empty)."""
    g = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,shd->hns", q.double(), kk) * scale
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [nh, n]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse.double())[..., None])
    return torch.einsum("hns,shd->nhd", p, vv), lse.T


def _cache(n_blocks, bsz, nkv, d, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n_blocks, bsz, nkv, d, generator=gen).to(dtype),
            torch.randn(n_blocks, bsz, nkv, d, generator=gen).to(dtype))


def _keys(cache, blocks, logical, bsz):
    """Dense keys [S, nkv, d] and their positions [S] of the given physical/logical blocks."""
    k = cache[torch.tensor(blocks)].reshape(-1, *cache.shape[2:])
    pos = (torch.tensor(logical)[:, None] * bsz + torch.arange(bsz)).reshape(-1)
    return k, pos


@pytest.mark.parametrize("mask_elems", [1, 100, 1 << 24])
def test_prefill_tiles_equal_untiled(monkeypatch, mask_elems):
    """Query tiles of any size (down to one query) give the dense result."""
    monkeypatch.setattr(torch_ops, "_MASK_ELEMS", mask_elems)
    bsz, nh, nkv, d = 8, 6, 2, 16
    kc, vc = _cache(16, bsz, nkv, d, 1)
    blocks, n, start = [3, 9, 1, 12, 5], 21, 18  # 39 tokens, the last 21 are the new queries
    meta = MAMetadata.build([n], [start], [blocks])
    q = torch.randn(n, nh, d, generator=torch.Generator().manual_seed(2))
    out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.25)
    k, kpos = _keys(kc, blocks, range(5), bsz)
    v, _ = _keys(vc, blocks, range(5), bsz)
    ref_o, ref_l = dense(q, k, v, torch.arange(start, start + n), kpos, 0.25)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_elems", [16, 1 << 22])
def test_prefill_queries_that_see_no_key_in_this_part(monkeypatch, mask_elems):
    """A part holding only later blocks: early queries get out 0 / lse -inf, later ones the dense result.

    With tiny tiles whole tiles see no key (the skipped-keys path); with one tile, single rows do.
    """
    monkeypatch.setattr(torch_ops, "_MASK_ELEMS", mask_elems)
    bsz, nh, nkv, d = 8, 4, 1, 8
    kc, vc = _cache(8, bsz, nkv, d, 3)
    meta = MAMetadata.build([1, 30], [40, 0], [[6, 2], [6, 2]], [[3, 4], [2, 3]])  # keys 16..31 for row 1
    q = torch.randn(31, nh, d, generator=torch.Generator().manual_seed(4))
    out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.3)
    assert torch.isinf(lse[1:17]).all() and (lse[1:17] < 0).all() and (out[1:17] == 0).all()
    k, kpos = _keys(kc, [6, 2], [2, 3], bsz)
    v, _ = _keys(vc, [6, 2], [2, 3], bsz)
    ref_o, ref_l = dense(q[17:], k, v, torch.arange(16, 30), kpos, 0.3)
    torch.testing.assert_close(out[17:].double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[17:].double(), ref_l, rtol=1e-5, atol=1e-5)
    # row 0 (decode at position 40) sees logical blocks 3, 4 = positions 24..39
    k0, kpos0 = _keys(kc, [6, 2], [3, 4], bsz)
    v0, _ = _keys(vc, [6, 2], [3, 4], bsz)
    ref_o, ref_l = dense(q[:1], k0, v0, torch.tensor([40]), kpos0, 0.3)
    torch.testing.assert_close(out[:1].double(), ref_o, rtol=1e-5, atol=1e-5)


def test_prefill_blocks_out_of_logical_order(monkeypatch):
    """The torch path does not rely on ascending block_idx (no key skipping then): still the dense result.

    MAMetadata.build refuses such rows (the Triton prefill kernel relies on the order), so the
    metadata is made by hand here."""
    monkeypatch.setattr(torch_ops, "_MASK_ELEMS", 64)
    bsz, nh, nkv, d = 4, 4, 2, 8
    kc, vc = _cache(8, bsz, nkv, d, 11)
    blocks, logical = [5, 0, 7, 2], [3, 0, 2, 1]
    with pytest.raises(ValueError, match="strictly ascending"):
        MAMetadata.build([12], [4], [blocks], [logical])
    i32 = dict(dtype=torch.int32)
    meta = MAMetadata(cu_q=torch.tensor([0, 12], **i32), q_pos=torch.arange(4, 16),
                      block_tables=torch.tensor([blocks], **i32), block_idx=torch.tensor([logical], **i32),
                      num_blocks=torch.tensor([4], **i32), max_q_len=12)
    q = torch.randn(12, nh, d, generator=torch.Generator().manual_seed(12))
    out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.3)
    k, kpos = _keys(kc, blocks, logical, bsz)
    v, _ = _keys(vc, blocks, logical, bsz)
    ref_o, ref_l = dense(q, k, v, torch.arange(4, 16), kpos, 0.3)
    torch.testing.assert_close(out.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


def test_prefill_row_with_no_block_here():
    kc, vc = _cache(4, 8, 2, 8, 5)
    meta = MAMetadata.build([3, 1], [0, 9], [[], [1, 2]])
    q = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(6))
    out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.3)
    assert torch.isneginf(lse[:3]).all() and (out[:3] == 0).all()
    assert torch.isfinite(lse[3]).all()


def test_plan_follows_in_place_metadata_changes():
    """The cached per-step plan must not outlive an in-place edit of the metadata or a new block size."""
    bsz, nh, nkv, d = 8, 4, 2, 8
    kc, vc = _cache(6, bsz, nkv, d, 7)
    meta = MAMetadata.build([1, 1], [20, 9], [[4, 0, 5], [2, 3]])
    q = torch.randn(2, nh, d, generator=torch.Generator().manual_seed(8))
    first = torch_ops.micro_attention(q, kc, vc, meta, 0.5)
    meta.q_pos.sub_(5)  # both queries now see fewer keys
    second = torch_ops.micro_attention(q, kc, vc, meta, 0.5)
    k, kpos = _keys(kc, [4, 0, 5], range(3), bsz)
    v, _ = _keys(vc, [4, 0, 5], range(3), bsz)
    ref_o, ref_l = dense(q[:1], k, v, torch.tensor([15]), kpos, 0.5)
    assert not torch.allclose(first[1][0], second[1][0])
    torch.testing.assert_close(second[0][:1].double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[1][:1].double(), ref_l, rtol=1e-5, atol=1e-5)
    # the same metadata on a pool with another block size (4): positions move, so must the mask
    kc4, vc4 = kc.view(12, 4, nkv, d), vc.view(12, 4, nkv, d)
    meta4 = MAMetadata.build([1], [6], [[3, 1]])
    torch_ops.micro_attention(q[:1], kc, vc, meta4, 0.5)
    o4, l4 = torch_ops.micro_attention(q[:1], kc4, vc4, meta4, 0.5)
    k, kpos = _keys(kc4, [3, 1], range(2), 4)
    v, _ = _keys(vc4, [3, 1], range(2), 4)
    ref_o, ref_l = dense(q[:1], k, v, torch.tensor([6]), kpos, 0.5)
    torch.testing.assert_close(o4.double(), ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l4.double(), ref_l, rtol=1e-5, atol=1e-5)


def test_decode_low_precision_cache_and_padding_rows():
    """bf16 cache and queries: out in bf16, lse float32; rows of different lengths padded in one batch."""
    bsz, nh, nkv, d = 4, 4, 2, 8
    kc, vc = _cache(10, bsz, nkv, d, 9, torch.bfloat16)
    tables = [[7], [1, 8, 2], [0, 9]]
    starts = [2, 10, 5]
    meta = MAMetadata.build([1, 1, 1], starts, tables)
    q = torch.randn(3, nh, d, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.4)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    for i, (blocks, p) in enumerate(zip(tables, starts)):
        k, kpos = _keys(kc, blocks, range(len(blocks)), bsz)
        v, _ = _keys(vc, blocks, range(len(blocks)), bsz)
        ref_o, ref_l = dense(q[i:i + 1], k, v, torch.tensor([p]), kpos, 0.4)
        torch.testing.assert_close(out[i:i + 1].double(), ref_o, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(lse[i:i + 1].double(), ref_l, rtol=1e-4, atol=1e-4)


def test_plan_cache_is_not_pickled_or_copied():
    import copy
    import pickle

    kc, vc = _cache(4, 8, 2, 8, 13)
    meta = MAMetadata.build([1], [5], [[1]])
    torch_ops.micro_attention(torch.randn(1, 4, 8), kc, vc, meta, 0.3)
    assert "_torch_ops_plan" in meta.__dict__
    for other in (pickle.loads(pickle.dumps(meta)), copy.deepcopy(meta)):
        assert "_torch_ops_plan" not in other.__dict__
        assert torch.equal(other.block_tables, meta.block_tables) and other.max_q_len == meta.max_q_len


def test_concurrent_calls_on_one_metadata_agree():
    """Cluster executors may run MA on the same metadata from several threads: no shared gather buffer."""
    from concurrent.futures import ThreadPoolExecutor

    kc1, vc1 = _cache(40, 8, 2, 8, 14)
    kc2, vc2 = _cache(40, 8, 2, 8, 15)
    meta = MAMetadata.build([1] * 6, [30, 9, 17, 25, 3, 39], [[i * 5 + j for j in range(5)] for i in range(6)])
    q = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(16))
    ref1 = torch_ops.micro_attention(q, kc1, vc1, meta, 0.3)
    ref2 = torch_ops.micro_attention(q, kc2, vc2, meta, 0.3)
    caches = [(kc1, vc1, ref1), (kc2, vc2, ref2)] * 40

    def one(item):
        kc, vc, ref = item
        out, lse = torch_ops.micro_attention(q, kc, vc, meta, 0.3)
        return torch.equal(out, ref[0]) and torch.equal(lse, ref[1])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one, caches))
