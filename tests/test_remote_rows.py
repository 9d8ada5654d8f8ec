"""The remote path's diffs: what creditors hold of a debtor's rows against the debtor's own tables,
through any changes, failed steps and forgotten rows; the creditor's tables; the wire encoding; the
in-place merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite.attention import aggregate, aggregate_into
from infinite.cluster import messages as M
from infinite.cluster.counters import StepCounters
from infinite.cluster.creditor import Creditor
from infinite.cluster.lent_rows import FIRST_ROWS, FIRST_WIDTH, LentRows
from infinite.cluster.p2p import meta_ints, parse_meta
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.remote_attention import RemoteWire, handle_of
from infinite.cluster.transport import StaleRows
from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RBlock, RManager, blocks_for
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams

torch.set_num_threads(1)

BS = 4
CREDITORS = (1, 2, 3)
OPS = st.lists(
    st.tuples(st.sampled_from(["grow", "remote", "remote", "remote_at", "migrate", "home", "free", "step", "step",
                               "step", "fail", "forget"]),
              st.integers(0, 4), st.integers(1, 6)),
    min_size=1, max_size=60,
)


def _req(i: int) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(), max_tokens=8)


class Debtor:
    """Rank 0 with its persistent batch, and three creditors' rows, joined by the wire."""

    def __init__(self) -> None:
        self.rm = RManager(0, 64, BS)
        self.ib = InputBatch(self.rm, max_rows=5, max_blocks=64, device=torch.device("cpu"))
        self.wire = RemoteWire(0)
        self.creditors = {c: LentRows(10**6, mirrored=c == 3) for c in CREDITORS}  # 3: a GPU's uploads
        self.reqs = [_req(i) for i in range(5)]
        self.ids = iter(range(10**5))
        self.step_id = 0
        self.entries_sent = 0

    def parts(self, shift: int):
        """Every row's step: q_len 1..3 tokens ending up to ``shift`` positions before its table's end."""
        ib = self.ib
        ib.sync([r for r in self.reqs if self.rm.live_table(r.request_id)[0] is not None])
        rows, q_lens, q_starts = [], [], []
        for row in range(ib.num_rows):
            cap = len(ib.refs(row)) * BS
            n = 1 + (row + shift) % 3
            end = max(n, cap - shift)
            rows.append(row)
            q_lens.append(n)
            q_starts.append(end - n)
        parts = self.wire.parts(ib, rows, q_lens, q_starts)
        RemoteWire.attach_drops(parts, ib.take_remote_dropped(), ib)
        self.step_id += 1
        return parts, dict(zip(rows, zip(q_lens, q_starts)))

    def apply(self, parts, only: set[int] | None = None) -> None:
        for p in parts:
            if only is None or p.creditor in only:
                lent = self.creditors[p.creditor]
                meta = lent.apply(0, self.step_id, p.meta)
                self.entries_sent += len(p.meta.blocks)
                for i, h in enumerate(p.meta.handles):  # the step's gathered tables are the rows held
                    blocks, logical = lent.held(0, h)
                    k = int(meta.num_blocks[i])
                    assert k == len(blocks) and meta.block_tables[i, :k].tolist() == blocks
                    assert meta.block_idx[i, :k].tolist() == logical

    def step(self, shift: int) -> None:
        """A step as the runtime runs it: refused diffs fail it, and it is retried with whole rows."""
        parts, steps = self.parts(shift)
        try:
            self.apply(parts)
        except StaleRows:
            self.wire.reset([p.creditor for p in parts])
            parts, steps = self.parts(shift)
            self.apply(parts)
        self.check(parts, steps)

    def check(self, parts, steps) -> None:
        """Each creditor holds, for every request of the step there, exactly the debtor's blocks there
        that the step's queries can see; and no row of a request that has no blocks there."""
        ib = self.ib
        for p in parts:
            lent = self.creditors[p.creditor]
            for h in p.meta.handles:
                row = next(r for r in range(ib.num_rows) if handle_of(ib.requests[r].request_id) == h)
                q_len, start = steps[row]
                nb = blocks_for(start + q_len, BS)
                want = [(ref.block, i) for i, ref in enumerate(ib.refs(row)[:nb]) if ref.instance == p.creditor]
                held = lent.held(0, h)
                assert held is not None and list(zip(*held)) == want
        for c, lent in self.creditors.items():
            live = {handle_of(r.request_id) for row, r in enumerate(ib.requests) if c in ib.remote_groups(row)}
            held = {h for (d, h) in lent.row_of}
            assert held <= live, (c, held - live)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_creditors_hold_what_the_debtor_has_there_after_any_changes(ops):
    """Growth, borrowed blocks (appended and inserted), migrations to a creditor, leaves (whose blocks
    are released, so their rows go), steps whose diffs only some creditors applied before failing,
    and creditors that forgot rows: after every step each creditor holds exactly the debtor's blocks
    there, built from diffs alone."""
    d = Debtor()
    rm = d.rm
    for op, i, n in ops:
        rid = d.reqs[i].request_id
        table = rm.table(rid)
        if op == "grow" and rm.num_free >= n:
            rm.allocate(rid, n)
        elif op == "remote":
            rm.append_remote(rid, [RBlock(CREDITORS[n % 2], next(d.ids)) for _ in range(n)])
        elif op == "remote_at" and table:
            rm.append_remote(rid, [RBlock(2, next(d.ids))], at=min(n, len(table)) - 1)
        elif op == "migrate" and table:
            old = [r for r in table if r.instance == 0][:n]
            if old:
                rm.swap_out(rid, old, [RBlock(3, next(d.ids)) for _ in old])
        elif op == "home" and table:  # some of a creditor's blocks come home, and are released there
            c = CREDITORS[n % 3]
            old = [r for r in table if r.instance == c][:n]
            if old and rm.num_free >= len(old):
                rm.replace_blocks(rid, old, [RBlock(0, b) for b in rm.take_free(len(old))])
                if not any(r.instance == c for r in rm.table(rid)):  # none left there: its row goes
                    d.creditors[c].drop(0, [handle_of(rid)])
        elif op == "free" and table:
            for ref in rm.free_request(rid):  # the allocator releases them; each creditor then forgets
                d.creditors[ref.instance].drop(0, [handle_of(rid)])
        elif op == "step":
            d.step(n)
        elif op == "fail":  # a step failed midway: some creditors applied its diffs (or refused them)
            parts, _ = d.parts(n)
            for c in CREDITORS:
                if (n >> (c - 1)) & 1:
                    try:
                        d.apply(parts, only={c})
                    except StaleRows:
                        pass
            d.wire.reset([p.creditor for p in parts])
        elif op == "forget":  # a creditor lost the rows (say, a late release): its next diff is refused
            d.creditors[CREDITORS[n % 3]].forget_debtor(0)
    d.step(0)


def test_a_steady_decode_step_sends_no_entries_and_its_metadata_does_not_grow_with_context():
    """After a request's first step, a decode step with no new block tells each creditor nothing
    but the request's handle, epoch, base and query: the same ints at 1K and 256K tokens."""
    sizes = {}
    for tokens in (1024, 262144):
        rm = RManager(0, 64, 16)
        nb = tokens // 16
        refs = [RBlock(1 + i % 2, i) for i in range(nb - 2)]
        rm.append_remote("r", refs)
        rm.allocate("r", 2)
        req = Request("r", [0] * (tokens - 1), SamplingParams(), max_tokens=4)
        req.num_computed_tokens = tokens - 2
        ib = InputBatch(rm, max_rows=2, max_blocks=64, device=torch.device("cpu"))
        ib.sync([req])
        wire = RemoteWire(0)
        lent = {c: LentRows(nb) for c in (1, 2)}
        first = wire.parts(ib, [0], [1], [tokens - 2])
        assert sum(len(p.meta.blocks) for p in first) == nb - 2
        for p in first:
            lent[p.creditor].apply(0, 0, p.meta)
        ib.sync([req])  # nothing changed
        steady = wire.parts(ib, [0], [1], [tokens - 1])
        assert [p.meta.counts for p in steady] == [[0], [0]] and all(p.meta.bases[0] > 0 for p in steady)
        for p in steady:
            meta = lent[p.creditor].apply(0, 1, p.meta)
            assert int(meta.num_blocks[0]) == (nb - 2) // 2
        sizes[tokens] = [meta_ints(p.meta, None).numel() for p in steady]
    assert sizes[1024] == sizes[262144] == [6, 6]


def _meta(handles, epochs, bases, counts, blocks, logical, q_lens=None, q_starts=None, drop=()):
    n = len(handles)
    return M.AttentionMeta(list(handles), list(epochs), list(bases), list(q_lens or [1] * n),
                           list(q_starts or [100] * n), list(counts), list(blocks), list(logical), list(drop))


def test_lent_rows_refuse_diffs_that_do_not_continue_what_they_hold():
    lent = LentRows(32)
    lent.apply(0, 5, _meta([7], [3], [0], [2], [4, 5], [0, 2]))
    for bad in (_meta([7], [3], [1], [1], [6], [3]),  # base 1, but 2 entries held
                _meta([7], [4], [2], [1], [6], [3]),  # another epoch
                _meta([8], [3], [2], [1], [6], [3])):  # a handle it does not hold
        with pytest.raises(StaleRows):
            lent.apply(0, 6, bad)
    with pytest.raises(StaleRows, match="older"):
        lent.apply(0, 4, _meta([7], [3], [2], [1], [6], [3]))  # a step older than one applied
    assert lent.held(0, 7) == ([4, 5], [0, 2])  # refusals change nothing
    meta = lent.apply(0, 6, _meta([7], [3], [2], [1], [6], [3]))  # the continuation
    assert lent.held(0, 7) == ([4, 5, 6], [0, 2, 3])
    assert meta.block_tables.tolist() == [[4, 5, 6]] and meta.block_idx.tolist() == [[0, 2, 3]]
    lent.apply(1, 0, _meta([7], [9], [0], [1], [8], [1]))  # another debtor's handle 7 is another row
    assert lent.held(1, 7) == ([8], [1]) and lent.held(0, 7) == ([4, 5, 6], [0, 2, 3])
    meta = lent.apply(0, 7, _meta([7], [5], [0], [1], [9], [5], drop=[7]))  # replaced whole, epoch 5
    assert lent.held(0, 7) == ([9], [5]) and meta.q_pos.tolist() == [100]


def test_lent_rows_reject_malformed_diffs_with_a_clear_error():
    lent = LentRows(8)
    with pytest.raises(ValueError, match="pool"):
        lent.apply(0, 0, _meta([1], [1], [0], [1], [8], [0]))  # block 8 of a pool of 8
    with pytest.raises(ValueError, match="ascend"):
        lent.apply(0, 0, _meta([1], [1], [0], [2], [1, 2], [3, 3]))
    with pytest.raises(ValueError, match="lengths|add up"):
        lent.apply(0, 0, _meta([1], [1], [0], [3], [1, 2], [0, 1]))
    lent.apply(0, 1, _meta([1], [1], [0], [1], [1], [4]))
    with pytest.raises(ValueError, match="ascend"):  # an append must continue after the held entries
        lent.apply(0, 2, _meta([1], [1], [1], [1], [2], [4]))


@pytest.mark.parametrize("mirrored", [False, True])
def test_lent_rows_grow_and_shrink_back(mirrored):
    """Rows and width grow as debtors' requests need them; rows go on drop and forget, and with no
    row left the tables are back to their first size (memory is bounded by what is held). Mirrored:
    device tables apart from the host's, as on a GPU."""
    lent = LentRows(10**6, mirrored=mirrored)
    n_rows, width = 3 * FIRST_ROWS, 3 * FIRST_WIDTH
    for h in range(n_rows):
        lent.apply(h % 2, 0, _meta([h], [1], [0], [h + 1], range(h + 1), range(h + 1)))
    lent.apply(0, 1, _meta([0], [1], [1], [width], range(1, width + 1), range(1, width + 1)))
    assert lent.capacity[0] >= n_rows and lent.capacity[1] >= width + 1
    for h in range(n_rows):
        assert lent.held(h % 2, h) == ((list(range(width + 1)),) * 2 if h == 0 else (list(range(h + 1)),) * 2)
    meta = lent.apply(1, 1, _meta([5, 1], [1, 1], [6, 2], [0, 0], [], [], q_lens=[1, 2], q_starts=[30, 40]))
    assert meta.num_blocks.tolist() == [6, 2] and meta.block_tables.shape == (2, 6)
    assert meta.block_tables.tolist() == [list(range(6)), [0, 1, 0, 0, 0, 0]]
    assert meta.cu_q.tolist() == [0, 1, 3] and meta.q_pos.tolist() == [30, 40, 41]
    lent.forget_debtor(1)
    assert {d for d, _ in lent.row_of} == {0}
    lent.drop(0, list(range(n_rows)))
    assert not lent.row_of and lent.capacity == (FIRST_ROWS, FIRST_WIDTH)
    lent.apply(1, 0, _meta([3], [1], [0], [1], [2], [0]))  # a forgotten debtor's steps count anew
    assert lent.held(1, 3) == ([2], [0])


def test_a_creditor_forgets_a_request_s_rows_when_its_blocks_here_are_released():
    rm = RManager(1, 16, 4)
    kv = KVCache(2, 16, 4, 1, 8, torch.float32, torch.device("cpu"))
    cred = Creditor(rm, kv, 8 ** -0.5, LendingPolicy(), StepCounters())
    try:
        blocks = rm.lend(0, "a", 3)
        h = handle_of("a")
        cred.step_metadata(0, 0, _meta([h], [1], [0], [3], blocks, [0, 1, 2]), 1)
        cred.release(M.Release(0, "a", blocks[:1]))  # some of its blocks stay here: so does its row
        assert cred.rows.held(0, h) is not None
        cred.release(M.Release(0, "a", None))
        assert cred.rows.held(0, h) is None and not cred.rows.row_of
        with pytest.raises(ValueError, match="queries"):
            cred.step_metadata(0, 1, _meta([h], [1], [0], [1], [5], [0]), 2)
    finally:
        cred.close()


def test_meta_ints_round_trip_and_bad_sizes():
    meta = _meta([1, 2], [3, 4], [0, 5], [2, 1], [7, 8, 9], [0, 1, 6], q_lens=[1, 3], q_starts=[10, 20], drop=[11])
    slots = torch.tensor([40, 41, 42])
    ints = meta_ints(meta, slots)
    got, got_slots = parse_meta(ints, 2, 3, 1, 3)
    assert got == meta and got_slots.tolist() == [40, 41, 42]
    assert parse_meta(meta_ints(meta, None), 2, 3, 1, 0)[1] is None
    with pytest.raises(ValueError, match="does not hold"):
        parse_meta(ints, 2, 4, 1, 3)


def test_aggregate_into_equals_aggregate_on_its_rows():
    torch.manual_seed(1)
    t, nh, d = 6, 3, 4
    out0, lse0 = torch.randn(t, nh, d), torch.randn(t, nh)
    lse0[1] = float("-inf")  # a row with no local key
    rows = torch.tensor([1, 4, 5])
    o1, l1 = torch.randn(3, nh, d), torch.randn(3, nh)
    l1[2, 0] = float("-inf")  # and a head with no key on the creditor
    full_o1 = torch.zeros(t, nh, d).index_copy_(0, rows, o1)
    full_l1 = torch.full((t, nh), float("-inf")).index_copy_(0, rows, l1)
    want_o, want_l = aggregate([(out0, lse0), (full_o1, full_l1)])
    aggregate_into(out0, lse0, rows, o1, l1)
    assert torch.allclose(out0, want_o, atol=1e-6) and torch.allclose(lse0, want_l, atol=1e-6)
    empty_o, empty_l = torch.zeros(1, nh, d), torch.full((1, nh), float("-inf"))
    aggregate_into(empty_o, empty_l, torch.tensor([0]), torch.zeros(1, nh, d), torch.full((1, nh), float("-inf")))
    assert not empty_o.isnan().any() and torch.isinf(empty_l).all()
