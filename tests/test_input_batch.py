"""The persistent batch against the same state rebuilt from scratch, and the decode fast path against
the general one."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite.kv.prefix import extend_hashes
from infinite.kv.rmanager import RBlock, RManager
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.model_runner import DecodeBuffers, prepare_decode, prepare_inputs
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams

torch.set_num_threads(1)

RANK = 0
OPS = st.lists(
    st.tuples(st.sampled_from(["grow", "grow", "remote", "remote_at", "migrate", "home", "shrink", "free",
                               "schedule", "schedule", "cache", "cache", "start_cached", "start_cached"]),
              st.integers(0, 5), st.integers(1, 6)),
    min_size=1, max_size=80,
)
DOC = extend_hashes([], list(range(64 * 4)), 4)  # names of one long prompt's blocks


def _req(i: int) -> Request:
    return Request(f"r{i}", [1, 2, 3], SamplingParams(), max_tokens=8)


def apply_op(rm: RManager, reqs: list[Request], op: str, i: int, n: int, remote_ids) -> list[Request] | None:
    """One change of the block tables (OPS); for "schedule", the requests a step would sync."""
    rid = reqs[i].request_id
    table = rm.table(rid)
    if op == "grow" and rm.num_free >= n:
        rm.allocate(rid, n)
    elif op == "remote":
        rm.append_remote(rid, [RBlock(1, next(remote_ids)) for _ in range(n)])
    elif op == "remote_at" and table:
        rm.append_remote(rid, [RBlock(2, next(remote_ids))], at=min(n, len(table)) - 1)
    elif op == "migrate" and table:
        old = [r for r in table if r.instance == RANK][:n]
        if old:
            rm.swap_out(rid, old, [RBlock(3, next(remote_ids)) for _ in old])
    elif op == "home" and table:  # some of one creditor's blocks come home
        old = [r for r in table if r.instance != RANK][:n]
        old = [r for r in old if r.instance == old[0].instance]
        if old and rm.num_free >= len(old):
            rm.replace_blocks(rid, old, [RBlock(RANK, b) for b in rm.take_free(len(old))])
    elif op == "shrink" and table and table[-1].instance == RANK:
        rm.free_tail(rid, 1)
    elif op == "free":
        rm.free_request(rid)
    elif op == "cache" and table:  # the request's first blocks are computed: they name DOC's prefix
        rm.cache_computed(rid, DOC, n)
    elif op == "start_cached" and not table:  # a new table over the cached prefix (shared blocks)
        try:
            rm.start(rid, DOC[:n], n + 1)
        except MemoryError:
            pass
    elif op == "schedule":
        held = [r for r in reqs if rm.live_table(r.request_id)[0] is not None]
        return held[i % max(1, len(held)):] + held[: n]  # a changing subset, in changing order
    return None


def _check(ib: InputBatch) -> None:
    bt, bi, nb = ib.rebuilt_from_scratch()
    n = ib.num_rows
    np.testing.assert_array_equal(ib.nb_np[:n], nb)
    for row in range(n):
        k = nb[row]
        np.testing.assert_array_equal(ib.bt_np[row, :k], bt[row, :k])
        np.testing.assert_array_equal(ib.bi_np[row, :k], bi[row, :k])
    assert not ib.nb_np[n:].any(), "rows past the batch must see no key (graph padding)"
    assert {r.request_id: i for i, r in enumerate(ib.requests)} == ib.row_of
    assert all(ib.rm.live_table(r.request_id)[0] is not None for r in ib.requests)
    # the remote blocks of each row, by creditor, equal the same grouping of the tables from scratch
    remote = ib.remote_from_scratch()
    for row in range(n):
        groups = ib.remote_groups(row)
        assert {c: (g.blocks, g.logical) for c, g in groups.items()} == remote[row]
        assert ib.has_remote(ib.requests[row].request_id) == bool(remote[row])


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_rows_equal_a_rebuild_after_any_changes(ops):
    """Joins, growth, borrowed blocks (appended or inserted), migrations, blocks coming home,
    shrinking, leaves, and tables that start from cached blocks other rows hold too, in any order:
    after each sync the rows (local tables and remote groups) hold exactly what a from-scratch build
    of the tables holds; a remote group keeps its epoch exactly while it only grew, and every group
    that went away is reported once."""
    rm = RManager(RANK, 64, 4, enable_caching=True)
    ib = InputBatch(rm, max_rows=6, max_blocks=64, device=torch.device("cpu"))
    reqs = [_req(i) for i in range(6)]
    remote_ids = iter(range(1000, 10**6))
    before: dict[tuple[str, int], tuple[int, list[int], list[int]]] = {}  # last sync's groups
    for op, i, n in ops:
        scheduled = apply_op(rm, reqs, op, i, n, remote_ids)
        if scheduled is not None:
            ib.sync(scheduled)
            _check(ib)
            before = _check_group_changes(ib, before)
    ib.sync([])
    _check(ib)
    _check_group_changes(ib, before)


def _check_group_changes(ib: InputBatch, before: dict) -> dict:
    """Epochs against the last sync's groups (same epoch <=> the old entries are a prefix of the new),
    and the reported drops against the groups that are gone."""
    now = {(r.request_id, c): (g.epoch, list(g.blocks), list(g.logical))
           for row, r in enumerate(ib.requests) for c, g in ib.remote_groups(row).items()}
    for key, (epoch, blocks, logical) in now.items():
        if key in before:
            e0, b0, l0 = before[key]
            grew = blocks[:len(b0)] == b0 and logical[:len(l0)] == l0
            assert (epoch == e0) == grew, (key, before[key], now[key])
    gone = {key for key in before if key not in now}
    assert {(rid, c) for c, rid in ib.take_remote_dropped()} == gone
    return now


def test_an_id_used_again_after_its_request_finished_gets_the_new_request():
    """A finished request's id may name a new request (vLLM allows it): between two syncs the old
    table is freed and the new one made, and the row must follow the new request, not keep the old."""
    rm = RManager(RANK, 64, 4)
    ib = InputBatch(rm, max_rows=4, max_blocks=16, device=torch.device("cpu"))
    old, other = _req(0), _req(1)
    rm.allocate(old.request_id, 3)
    rm.allocate(other.request_id, 1)
    ib.sync([old, other])
    rm.free_request(old.request_id)
    new = _req(0)
    rm.allocate(new.request_id, 2)
    ib.sync([new, other])
    assert ib.requests[ib.row_of["r0"]] is new and ib.num_rows == 2
    assert [b.block for b in ib.refs(ib.row_of["r0"])] == [b.block for b in rm.table("r0")]
    _check(ib)


def test_sync_touches_only_changed_rows():
    """A step where no table changed reads no table: the rManager reports nothing changed."""
    rm = RManager(RANK, 4096, 16)
    ib = InputBatch(rm, max_rows=4, max_blocks=4096, device=torch.device("cpu"))
    reqs = [_req(i) for i in range(3)]
    for r in reqs:
        rm.allocate(r.request_id, 1000)
    ib.sync(reqs)
    calls = []
    orig = ib._rebuild, ib._append
    ib._rebuild = lambda row: (calls.append(("rebuild", row)), orig[0](row))
    ib._append = lambda row, a, b: (calls.append(("append", row, b - a)), orig[1](row, a, b))
    ib.sync(reqs)
    assert calls == []
    rm.allocate("r1", 1)
    ib.sync(reqs)
    assert calls == [("append", 1, 1)]
    _check(ib)


def _decode_state():
    rm = RManager(RANK, 64, 4)
    ib = InputBatch(rm, max_rows=8, max_blocks=16, device=torch.device("cpu"))
    reqs = []
    for i, (plen, out) in enumerate([(5, 3), (9, 0), (2, 7)]):
        r = Request(f"r{i}", list(range(10 + i, 10 + i + plen)), SamplingParams(), max_tokens=20)
        r.output_token_ids = list(range(100 + i, 100 + i + out))
        r.num_computed_tokens = r.num_tokens - 1
        rm.allocate(r.request_id, -(-r.num_tokens // 4))
        reqs.append(r)
    ib.sync(reqs)
    return ib, reqs


def test_decode_fast_path_equals_general_path():
    ib, reqs = _decode_state()
    fast = prepare_decode(ib, DecodeBuffers(8, torch.device("cpu")))
    slow = prepare_inputs(ib, {r.request_id: 1 for r in reqs}, torch.device("cpu"))
    assert fast is not None and fast.is_decode
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    for name in ("cu_q", "q_pos", "block_tables", "block_idx", "num_blocks"):
        assert torch.equal(getattr(fast.meta, name), getattr(slow.meta, name)), name
    assert fast.max_position == slow.max_position and fast.sample_requests == slow.sample_requests


def test_decode_fast_path_pads_and_declines():
    ib, reqs = _decode_state()
    buf = DecodeBuffers(8, torch.device("cpu"))
    assert prepare_decode(ib, buf, pad_to=8) is not None
    assert buf.host[2, 3:8].tolist() == [-1] * 5 and buf.host[0, 3:8].tolist() == [0] * 5
    reqs[1].num_computed_tokens -= 2  # a prefill chunk: not a decode step
    assert prepare_decode(ib, buf) is None
