"""Triton MA / AA / KV-write kernels under the Triton interpreter against float64 references.

The interpreter needs TRITON_INTERPRET=1 before `triton` is first imported (its
own tl.max / tl.sum helpers are decorated at import), hence the first lines.
Shapes stay small: every program runs as numpy in this process.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers_attention import Pool, check, reference  # noqa: E402

from infinite.attention import torch_ops  # noqa: E402
from infinite.attention.metadata import MAMetadata  # noqa: E402
from infinite.attention.triton import (  # noqa: E402
    aggregate,
    decode_attention,
    micro_attention,
    write_kv,
)
from infinite.attention.triton._jit import interpreter_ready  # noqa: E402
from infinite.attention.triton.decode import choose_num_splits  # noqa: E402


def test_interpreter_is_active():
    # If another module imported triton before this one, every test below would be meaningless.
    assert interpreter_ready(), "triton was imported before TRITON_INTERPRET=1 was set"


CASES = [  # (block size, GQA ratio, head dim, dtype)
    (16, 1, 64, torch.float32),
    (32, 4, 128, torch.float32),
    (16, 8, 128, torch.float32),
    (32, 1, 128, torch.bfloat16),
    (16, 4, 64, torch.bfloat16),
    (32, 8, 64, torch.bfloat16),
]


@pytest.mark.parametrize("bsz,group,d,dtype", CASES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_matches_reference(bsz, group, d, dtype, num_splits):
    gen = torch.Generator().manual_seed(bsz * 1000 + group * 10 + d + (num_splits or 0))
    nkv = 2
    pool = Pool(24, bsz, nkv, d, dtype, gen)
    lengths = [1, bsz + 3, 3 * bsz - 5, 4 * bsz + 7]  # ragged, not multiples of the block size
    tables = [pool.add(n) for n in lengths]
    meta = MAMetadata.build([1] * len(lengths), [n - 1 for n in lengths], tables)
    q = torch.randn(len(lengths), nkv * group, d, generator=gen).to(dtype)
    scale = d**-0.5
    out, lse = decode_attention(q, pool.k, pool.v, meta, scale, num_splits=num_splits)
    check(out, lse, *reference(q, pool, meta, scale), dtype)


def test_split_heuristic_fills_the_gpu_only_when_needed():
    # One 1M-token request on 132 SMs with 8 KV heads: 33 splits -> 264 programs.
    assert choose_num_splits(1, 8, 1 << 20, 64, 132) == 33
    # A big batch already fills the GPU: no split, no reduce step.
    assert choose_num_splits(256, 8, 1 << 15, 64, 132) == 1
    # Never more splits than key tiles.
    assert choose_num_splits(1, 1, 100, 64, 132) == 2


@pytest.mark.parametrize("bsz,group,d,dtype", CASES)
def test_prefill_matches_reference(bsz, group, d, dtype):
    gen = torch.Generator().manual_seed(bsz * 77 + group * 5 + d)
    nkv = 2 if group < 8 else 1
    pool = Pool(24, bsz, nkv, d, dtype, gen)
    # (context length, new query tokens at its end): chunk over a cached prefix, a whole prompt,
    # a decode row in the mixed batch, a chunk that starts mid-block.
    reqs = [(2 * bsz + 9, 11), (bsz - 3, bsz - 3), (bsz + 1, 1), (3 * bsz + 2, bsz + 4)]
    tables = [pool.add(n) for n, _ in reqs]
    meta = MAMetadata.build([nq for _, nq in reqs], [n - nq for n, nq in reqs], tables)
    q = torch.randn(meta.q_pos.shape[0], nkv * group, d, generator=gen).to(dtype)
    scale = d**-0.5
    out, lse = micro_attention(q, pool.k, pool.v, meta, scale)
    check(out, lse, *reference(q, pool, meta, scale), dtype)


@pytest.mark.parametrize("d", [64, 8])  # 8: tiny test models; padded to the 16-wide dot
def test_matches_torch_path(d):
    # Drop-in check: same inputs through both backends, float32, with all keys written.
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(12, 16, 2, d, generator=gen)
    v_cache = torch.randn(12, 16, 2, d, generator=gen)
    for q_lens, starts in [([1, 1, 1], [40, 3, 95]), ([1, 20, 7], [60, 0, 30])]:
        meta = MAMetadata.build(q_lens, starts, [[0, 5, 7, 2], [9, 1], [3, 4, 6, 8, 10, 11]])
        q = torch.randn(sum(q_lens), 8, d, generator=gen)
        out, lse = micro_attention(q, k_cache, v_cache, meta, 0.125)
        ref_out, ref_lse = torch_ops.micro_attention(q, k_cache, v_cache, meta, 0.125)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aggregate_matches_float64_merge(dtype):
    gen = torch.Generator().manual_seed(11)
    p, t, nh, d = 4, 5, 6, 64
    outs = [torch.randn(t, nh, d, generator=gen).to(dtype) for _ in range(p)]
    lses = [torch.randn(t, nh, generator=gen) * 4 for _ in range(p)]
    lses[1][0] = float("-inf")  # one part saw nothing for token 0
    outs[1][0] = 0
    for j in range(p):  # token 2, head 3: no part saw anything
        lses[j][2, 3] = float("-inf")
        outs[j][2, 3] = 0
    out, lse = aggregate(list(zip(outs, lses)))
    ls = torch.stack(lses).double()  # [P, T, nh]
    ref_lse = torch.logsumexp(ls, 0)
    w = torch.exp(ls - torch.where(torch.isinf(ref_lse), 0, ref_lse))
    ref_out = (w[..., None] * torch.stack(outs).double()).sum(0)
    check(out, lse, ref_out, ref_lse, dtype)


# No shrinking: under the interpreter it would turn one failure into minutes.
@settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate])
@given(
    bsz=st.sampled_from([16, 32]),
    group=st.sampled_from([1, 4, 8]),
    length=st.integers(2, 150),
    num_q=st.integers(1, 9),
    cuts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_split_blocks_merged_by_aggregate_equal_whole(bsz, group, length, num_q, cuts, seed):
    """Attention over any split of a request's blocks, merged by AA, equals attention over all of them."""
    gen = torch.Generator().manual_seed(seed)
    d, nkv = 64, 1
    num_q = min(num_q, length)
    pool = Pool(-(-length // bsz) + 1, bsz, nkv, d, torch.float32, gen)
    blocks = pool.add(length)
    q = torch.randn(num_q, group * nkv, d, generator=gen)
    start, scale = length - num_q, 1 / math.sqrt(d)
    whole = MAMetadata.build([num_q], [start], [blocks])
    bounds = sorted({0, len(blocks), *(int(c * len(blocks)) for c in cuts)})
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        meta = MAMetadata.build([num_q], [start], [blocks[lo:hi]], logical=[list(range(lo, hi))])
        parts.append(micro_attention(q, pool.k, pool.v, meta, scale))
    out, lse = aggregate(parts)
    check(out, lse, *reference(q, pool, whole, scale), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_index_copy(dtype):
    gen = torch.Generator().manual_seed(5)
    n, bsz, nkv, d, t = 6, 16, 4, 64, 21
    k_cache = torch.randn(n, bsz, nkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(n, bsz, nkv, d, generator=gen).to(dtype)
    k = torch.randn(t, nkv, d, generator=gen).to(dtype)
    v = torch.randn(t, nkv, d, generator=gen).to(dtype)
    slots = torch.randperm(n * bsz, generator=gen)[:t]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    torch_ops.write_kv(ref_k, ref_v, k, v, slots)
    write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # float32 rows into the cache dtype: the interpreter rounds to bf16 by truncation (GPU: to
    # nearest), so allow one bf16 ulp.
    k32, v32 = torch.randn(t, nkv, d, generator=gen), torch.randn(t, nkv, d, generator=gen)
    write_kv(k_cache, v_cache, k32, v32, slots)
    torch_ops.write_kv(ref_k, ref_v, k32, v32, slots)
    ulp = 2**-7 if dtype == torch.bfloat16 else 0.0
    assert torch.allclose(k_cache.float(), ref_k.float(), rtol=ulp, atol=0)
    assert torch.allclose(v_cache.float(), ref_v.float(), rtol=ulp, atol=0)
    # Negative slots (padding) are skipped.
    before = k_cache.clone()
    write_kv(k_cache, v_cache, k[:2], v[:2], torch.tensor([-1, -1]))
    assert torch.equal(k_cache, before)


def test_bad_inputs_raise_clear_errors():
    k_cache = torch.randn(4, 16, 2, 64)
    meta = MAMetadata.build([1], [3], [[0]])
    with pytest.raises(ValueError, match="do not fit"):
        micro_attention(torch.randn(1, 3, 64), k_cache, k_cache, meta, 0.125)
    with pytest.raises(TypeError, match="dtype"):
        micro_attention(torch.randn(1, 4, 64).bfloat16(), k_cache, k_cache, meta, 0.125)
    with pytest.raises(ValueError, match="meta does not describe q"):
        micro_attention(torch.randn(2, 4, 64), k_cache, k_cache, meta, 0.125)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k_cache, k_cache, torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(torch.randn(1, 4, 64), k_cache, k_cache, meta, 0.125, num_splits=0)
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
