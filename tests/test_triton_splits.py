"""Graph-safe split-KV decode, mixed batches on both kernels, the prefill causal early exit.

Under the Triton interpreter (small shapes), against the float64 reference of
helpers_attention. Launch and load counts come from spies on the kernels'
launch objects and on the interpreter's load builder: counts, not timings.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers_attention import Pool, check, reference  # noqa: E402

import infinite.attention.triton as tk  # noqa: E402
from infinite.attention.metadata import MAMetadata  # noqa: E402
from infinite.attention.triton import decode, workspace  # noqa: E402
from infinite.attention.triton.tiles import tile_for  # noqa: E402


def _launches(monkeypatch, kern) -> list:
    """Grids of every launch of ``kern`` from now on."""
    grids = []
    real_on = kern.on

    def on(device):
        launcher = real_on(device)

        class Spy:
            def __getitem__(self, grid):
                grids.append(grid)
                return launcher[grid]

        return Spy()

    monkeypatch.setattr(kern, "on", on)
    return grids


def _decode_case(dtype=torch.float32, seed=0):
    """Rows of very different lengths, a row without blocks, a row without a query, a remote part
    whose blocks all lie after its query (sees nothing)."""
    gen = torch.Generator().manual_seed(seed)
    bsz, nkv, group, d = 16, 2, 4, 32
    pool = Pool(40, bsz, nkv, d, dtype, gen)
    long = pool.add(9 * bsz + 5)
    short = pool.add(3)
    mid = pool.add(2 * bsz + 1)
    later = pool.add(2 * bsz)
    q_lens = [1, 1, 1, 1, 0, 1]
    starts = [9 * bsz + 4, 2, 2 * bsz, 40, 7, 3]
    tables = [long, short, mid, [], [pool.add(bsz)[0]], later]
    logical = [list(range(len(long))), [0], list(range(len(mid))), [], [0], [5, 6]]
    meta = MAMetadata.build(q_lens, starts, tables, logical)
    q = torch.randn(sum(q_lens), nkv * group, d, generator=gen).to(dtype)
    return pool, meta, q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_each_row_splits_its_own_keys(dtype, num_splits):
    """Any split count (40 > the longest row's tiles) gives the reference, empty rows included."""
    pool, meta, q = _decode_case(dtype, num_splits)
    out, lse = decode.decode_attention(q, pool.k, pool.v, meta, 0.2, num_splits)
    check(out, lse, *reference(q, pool, meta, 0.2), dtype)
    assert torch.isinf(lse[3]).all() and torch.isinf(lse[4]).all()  # no blocks / blocks after the query


def test_one_split_writes_the_output_directly(monkeypatch):
    """S == 1: one launch, no reduce, no workspace; S > 1: one decode and one reduce launch."""
    pool, meta, q = _decode_case()
    dec = _launches(monkeypatch, decode._decode_kernel)
    red = _launches(monkeypatch, decode._reduce_kernel)
    used = []
    real = workspace.scratch
    monkeypatch.setattr(workspace, "scratch", lambda *a: used.append(a) or real(*a))
    decode.decode_attention(q, pool.k, pool.v, meta, 0.2, 1)
    assert (len(dec), len(red), len(used)) == (1, 0, 0)
    assert dec[0] == (meta.num_requests, 2, 1)
    meta.num_splits = 3  # how a graph runner fixes the split count of a bucket
    tk.micro_attention(q, pool.k, pool.v, meta, 0.2)
    assert (len(dec), len(red), len(used)) == (2, 1, 1)
    assert dec[1] == (meta.num_requests, 2, 3)


def test_split_heuristic_reads_only_host_shapes():
    """The default split count depends on the table width, not on any row's length (graph-safe)."""
    a = MAMetadata.build([1, 1], [3, 100], [[0], [1, 2, 3, 4, 5, 6, 7]])
    b = MAMetadata.build([1, 1], [900, 100], [[7, 6, 5, 4, 3, 2, 1], [0]])
    for m in (a, b):
        assert decode.default_num_splits(m, 2, 2, 16, 64, torch.device("cpu")) == decode.choose_num_splits(
            2, 2, 7 * 16, 64, 1)


def test_workspace_is_reused_and_never_freed():
    dev = torch.device("cpu")
    o1, l1 = workspace.decode_partials(dev, 4, 8, 4, 16)
    o2, l2 = workspace.decode_partials(dev, 2, 3, 4, 16)  # smaller: same memory
    assert o2.data_ptr() == o1.data_ptr() and l2.shape == (2, 3, 4)
    retired = len(workspace._RETIRED)
    big = workspace.decode_partials_numel(64, 64, 4, 16)
    workspace.reserve(dev, torch.float32, big)
    o3, _ = workspace.decode_partials(dev, 64, 64, 4, 16)
    assert o3.data_ptr() != o1.data_ptr()
    assert len(workspace._RETIRED) == retired + 1 and workspace._RETIRED[-1].data_ptr() == o1.data_ptr()
    assert workspace.allocated_bytes() >= 4 * big
    # Another thread gets its own buffer (a creditor serving beside the step loop).
    import threading

    seen = []
    th = threading.Thread(target=lambda: seen.append(workspace.decode_partials(dev, 4, 8, 4, 16)[0].data_ptr()))
    th.start()
    th.join()
    assert seen[0] != o3.data_ptr()


def test_build_names_decode_and_prefill_rows():
    m = MAMetadata.build([1, 5, 0, 1, 3], [4, 0, 2, 9, 1], [[0], [1], [], [2], [3]])
    assert m.decode_rows.tolist() == [0, 3] and m.prefill_rows.tolist() == [1, 4]
    assert m.decode_rows.dtype == m.prefill_rows.dtype == torch.int32
    assert m.max_prefill_q_len == 5 and m.max_q_len == 5
    dec, pre, longest = MAMetadata.mixed_rows([1, 5, 0, 1, 3])  # what build used, for tensor-built metadata
    assert torch.equal(dec, m.decode_rows) and torch.equal(pre, m.prefill_rows) and longest == 5
    assert MAMetadata.mixed_rows([1, 0, 1]) == (None, None, 0)
    d = MAMetadata.build([1, 1], [3, 4], [[0], [1]])
    assert d.decode_rows is None and d.prefill_rows is None and d.max_prefill_q_len == 0
    with pytest.raises(ValueError, match="strictly ascending"):
        MAMetadata.build([2], [3], [[0, 1]], [[1, 1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_runs_decode_rows_on_the_decode_kernel(monkeypatch, dtype):
    """Decode rows take the split-KV kernel through the row indirection; prefill rows the prefill
    kernel; one out/lse; results equal the reference (and the legacy all-prefill path)."""
    gen = torch.Generator().manual_seed(7)
    bsz, nkv, group, d = 16, 2, 2, 32
    pool = Pool(40, bsz, nkv, d, dtype, gen)
    # (context length, new tokens): decode over a long context, a prefill chunk, a query-less
    # row, another decode, a whole short prompt.
    reqs = [(7 * bsz + 3, 1), (3 * bsz + 5, bsz + 2), (bsz, 0), (2 * bsz, 1), (9, 9)]
    tables = [pool.add(n) for n, _ in reqs]
    meta = MAMetadata.build([nq for _, nq in reqs], [n - nq for n, nq in reqs], tables)
    q = torch.randn(meta.q_pos.shape[0], nkv * group, d, generator=gen).to(dtype)
    ref = reference(q, pool, meta, 0.3)
    dec = _launches(monkeypatch, decode._decode_kernel)
    pre = _launches(monkeypatch, tk.prefill._prefill_kernel)
    meta.num_splits = 4
    out, lse = tk.micro_attention(q, pool.k, pool.v, meta, 0.3)
    check(out, lse, *ref, dtype)
    assert dec == [(2, nkv, 4)]  # the two decode rows, 4 splits
    block_q = tk.prefill.prefill_blocks(group, tile_for("prefill", q.device, d, dtype))[0]
    assert pre == [(2, math.ceil((bsz + 2) / block_q), nkv)]  # the two prefill rows
    legacy = MAMetadata(meta.cu_q, meta.q_pos, meta.block_tables, meta.block_idx, meta.num_blocks, meta.max_q_len)
    out2, lse2 = tk.micro_attention(q, pool.k, pool.v, legacy, 0.3)
    check(out2, lse2, *ref, dtype)


def _load_count(monkeypatch) -> list[int]:
    from triton.runtime import interpreter

    n = [0]
    for name in ("create_load", "create_masked_load"):
        real = getattr(interpreter.InterpreterBuilder, name)

        def counted(self, *a, _real=real, **k):
            n[0] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(interpreter.InterpreterBuilder, name, counted)
    return n


@pytest.mark.parametrize("partial", [False, True])
def test_prefill_stops_at_the_last_visible_block(monkeypatch, partial):
    """Blocks past the queries' last position cost no loads: the same count with 2 or 40 of them
    after the visible ones (a partial list adds only its binary search's log2 loads)."""
    bsz, nkv, d = 16, 1, 16
    counts = []
    for extra in (2, 40):
        gen = torch.Generator().manual_seed(3)
        pool = Pool(64, bsz, nkv, d, torch.float32, gen)
        first = 2 if partial else 0  # a remote part holding blocks 2, 3, ... of the request
        blocks = pool.add((3 + extra) * bsz)
        logical = [list(range(first, first + len(blocks)))]
        q_start = (first + 2) * bsz + 3  # queries in the part's third block; the rest lies after them
        meta = MAMetadata.build([4], [q_start], [blocks], logical)
        q = torch.randn(4, 2, d, generator=gen)
        n = _load_count(monkeypatch)
        out, lse = tk.micro_attention(q, pool.k, pool.v, meta, 0.25)
        counts.append(n[0])
        monkeypatch.undo()
        check(out, lse, *reference(q, pool, meta, 0.25), torch.float32)
    search = 2 * math.ceil(math.log2(3 + 40)) + 2 if partial else 0
    assert counts[0] <= counts[1] <= counts[0] + search, counts


@pytest.mark.parametrize("gaps", [[0, 2, 3, 7, 8, 9], [1, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7]])
@pytest.mark.parametrize("chunk", [1, 5, 23])
def test_prefill_partial_lists_with_gaps(gaps, chunk):
    """Parts holding scattered blocks of a request (binary-searched bounds, two loop stages):
    the reference, chunks of any size ending anywhere in the request."""
    bsz, nkv, group, d = 8, 2, 2, 16
    gen = torch.Generator().manual_seed(len(gaps) * 31 + chunk)
    pool = Pool(16, bsz, nkv, d, torch.float32, gen)
    blocks = pool.add(len(gaps) * bsz)
    for end in (3 * bsz + 2, 6 * bsz + 7, (gaps[-1] + 1) * bsz):
        n = min(chunk, end)
        meta = MAMetadata.build([n, 1], [end - n, end - 1], [blocks, blocks[:2]], [gaps, gaps[:2]])
        q = torch.randn(n + 1, nkv * group, d, generator=gen)
        out, lse = tk.micro_attention(q, pool.k, pool.v, meta, 0.4)
        check(out, lse, *reference(q, pool, meta, 0.4), torch.float32)
