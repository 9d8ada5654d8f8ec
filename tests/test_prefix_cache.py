"""The prefix cache's pure parts: block names, the reference-counted pool and its eviction order,
the rManager's shared tables, and the scheduler admitting over cached prefixes. The accounting
check counts every block's holders from the tables and lent lists, apart from the pool's counts."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infinite.kv import BlockPool, RManager
from infinite.kv.prefix import (ANCHOR_STRIDE, anchor_key, anchors, deepest_held, extend_hashes, hash_block,
                                is_anchor)
from infinite.runtime.allocator import LocalAllocator, max_hit_blocks
from infinite.runtime.request import Request
from infinite.runtime.scheduler import Scheduler
from infinite.sampling.params import SamplingParams

from helpers_scheduler import run_step, run_with_aborts

BS = 4


def names(tokens, salt=None, bs=BS):
    return extend_hashes([], tokens, bs, salt)


# ---- names ----------------------------------------------------------------------------------------


def test_names_are_chained_salted_and_stable():
    a = names(list(range(12)))
    assert len(a) == 3 and len(set(a)) == 3 and all(len(h) == 16 for h in a)
    assert names(list(range(12))) == a  # the same in every process: no per-process seed
    assert names(list(range(13))) == a  # a partial block has no name
    b = names([99] + list(range(1, 12)))
    assert all(x != y for x, y in zip(a, b)), "a change in block 0 renames every later block"
    c = names(list(range(8)) + [0, 0, 0, 0])
    assert c[:2] == a[:2] and c[2] != a[2]
    salted = names(list(range(12)), salt="tenant-a")
    assert all(x != y for x, y in zip(a, salted)) and salted == names(list(range(12)), salt="tenant-a")
    assert names(list(range(12)), salt="tenant-b")[0] != salted[0]
    assert hash_block(None, [0, 1, 2, 3]) == a[0] and hash_block(a[0], [4, 5, 6, 7]) == a[1]
    # extending hashes only the new blocks, and respects upto
    h = extend_hashes([], list(range(40)), BS, upto=3)
    assert h == names(list(range(12)))
    assert extend_hashes(h, list(range(40)), BS) == names(list(range(40)))


def test_anchors_sample_the_chain():
    depths = [d for d in range(1, 40) if is_anchor(d)]
    assert depths == [1, 2, 4] + list(range(ANCHOR_STRIDE, 40, ANCHOR_STRIDE))
    hs = names(list(range(39 * BS)))
    chain = anchors(hs)
    assert [d for d, _ in chain] == depths
    held = {anchor_key(hs[d - 1]) for d in (1, 2, 4, 8)}
    assert deepest_held(chain, held) == 8
    assert deepest_held(chain, set()) == 0


# ---- the pool -------------------------------------------------------------------------------------


def test_pool_counts_references_and_keeps_freed_blocks_cached():
    pool = BlockPool(4, enable_caching=True)
    a = pool.allocate(2)
    hs = names(list(range(8)))
    assert pool.cache(a[0], hs[0], 1) and pool.cache(a[1], hs[1], 2)
    assert not pool.cache(a[0], hs[0], 1), "a block is named once"
    assert pool.lookup(hs) == a and pool.lookup(names([9] * 8)) == []
    pool.touch(a)  # a second request takes them
    pool.free(reversed(a))
    assert pool.num_free == 2 and pool.ref[a[0]] == 1
    pool.free(reversed(a))
    assert pool.num_free == 4 and pool.num_evictable == 2 and pool.lookup(hs) == a
    # plain free blocks go before cached ones; then the least recently freed cached block (the tail)
    got = pool.allocate(3)
    assert got[:2] == [2, 3] and got[2] == a[1]
    assert pool.lookup(hs) == [a[0]] and pool.evictions == 1
    pool.free([got[0]])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([got[0]])
    with pytest.raises(RuntimeError, match="cannot be shared"):
        pool.touch([got[0]])  # free and named nothing: no prefix to share


def test_pool_caches_nothing_when_off_and_reports_anchor_changes():
    off = BlockPool(2)
    b = off.allocate(1)
    assert not off.cache(b[0], names([1, 2, 3, 4])[0], 1) and off.num_cached == 0
    pool = BlockPool(8, enable_caching=True)
    hs = names(list(range(8 * BS)))
    blocks = pool.allocate(8)
    for i, b in enumerate(blocks):
        pool.cache(b, hs[i], i + 1)
    added, removed = pool.take_anchor_changes()
    assert added == sorted(anchor_key(hs[d - 1]) for d in (1, 2, 4, 8)) and removed == []
    pool.free(reversed(blocks))
    pool.allocate(5)  # evicts depths 8..4 (the tail first)
    added, removed = pool.take_anchor_changes()
    assert added == [] and removed == sorted(anchor_key(hs[d - 1]) for d in (4, 8))
    assert pool.take_anchor_changes(everything=True)[0] == sorted(anchor_key(hs[d - 1]) for d in (1, 2))
    reused = pool.allocate(3)  # the last cached blocks go; an anchor named again comes back in the diff
    pool.cache(reused[0], hs[0], 1)
    assert pool.num_cached == 1 and pool.take_anchor_changes() == ([], [anchor_key(hs[1])])


# ---- shared tables: every reference counted from the tables ------------------------------------------


def holders(rm: RManager) -> Counter:
    """References per local block, counted from the tables and lent lists (not from the pool)."""
    c: Counter = Counter()
    for table in rm.tables.values():
        c.update(ref.block for ref in table if ref.instance == rm.rank)
    for blocks in rm.lent.values():
        c.update(list(blocks))
    return c


def check_accounting(rm: RManager, named: dict[tuple[str, int], bytes]) -> None:
    """Each block's reference count equals its holders; free blocks have none; a block in use still
    holds the name it had when it was taken (never evicted under its holders); the counters add up."""
    c = holders(rm)
    pool = rm.pool
    for b in range(rm.num_blocks):
        assert pool.ref[b] == c.get(b, 0), (b, pool.ref[b], c.get(b, 0))
    assert pool.num_free == sum(1 for b in range(rm.num_blocks) if c.get(b, 0) == 0)
    for (rid, i), name in named.items():
        ref = rm.tables[rid][i]
        assert pool.name_of(ref.block) == name and pool.cached[name] == ref.block
    lent = {b for blocks in rm.lent.values() for b in blocks}
    assert rm.num_lent == len(lent)
    assert rm.num_free + rm.num_used + rm.num_lent == rm.num_blocks
    for table in rm.tables.values():
        assert len(set(table)) == len(table)


DOCS = [[random.Random(d).randrange(1000) for _ in range(6 * BS)] for d in range(3)]

OPS = st.lists(st.tuples(st.sampled_from(["start", "start", "grow", "compute", "free", "lend", "release"]),
                         st.integers(0, 7), st.integers(0, 30)), min_size=1, max_size=120)


@settings(max_examples=250, deadline=None)
@given(OPS)
def test_references_equal_holders_after_any_mix(ops):
    """Requests start over cached prefixes, grow, have their computed blocks cached, end; remote
    debtors take cached prefixes by reference and give them back; the pool evicts as it must."""
    rm = RManager(0, 24, BS, enable_caching=True)
    live: dict[str, list[int]] = {}  # request -> its tokens
    names_of: dict[str, list[bytes]] = {}
    named: dict[tuple[str, int], bytes] = {}  # (request, table index) -> name it holds (cached blocks taken)
    loans: list[tuple[int, str]] = []
    serial = iter(range(10**6))
    for op, i, n in ops:
        if op == "start":
            rid = f"r{next(serial)}"
            doc = DOCS[i % len(DOCS)]
            toks = doc[: n % len(doc) + 1] + [2000 + i] * (n % 5)
            hs = names(toks)
            try:
                got = rm.start(rid, hs, -(-len(toks) // BS))
            except MemoryError:
                assert rid not in rm.tables
                continue
            live[rid], names_of[rid] = toks, hs
            for j in range(got):
                named[(rid, j)] = hs[j]
        elif op == "grow" and live:
            rid = sorted(live)[i % len(live)]
            if rm.num_free:
                rm.allocate(rid, 1)
                live[rid] = live[rid] + [3000] * BS
                names_of[rid] = names(live[rid])
        elif op == "compute" and live:
            rid = sorted(live)[i % len(live)]
            hs = names_of[rid]
            full = min(len(hs), n)
            before = rm.num_offered(rid)
            rm.cache_computed(rid, hs, full)
            for j in range(before, min(full, len(rm.tables[rid]))):
                ref = rm.tables[rid][j]
                if rm.pool.name_of(ref.block) == hs[j]:
                    named[(rid, j)] = hs[j]
        elif op == "free" and live:
            rid = sorted(live)[i % len(live)]
            rm.free_request(rid)
            del live[rid]
            for key in [k for k in named if k[0] == rid]:
                del named[key]
        elif op == "lend":
            key = (1 + i % 2, f"remote{next(serial)}")
            got = rm.lend_cached(*key, names(DOCS[i % len(DOCS)]), lambda r: n % 8)
            if got:
                loans.append(key)
        elif op == "release" and loans:
            rm.release_lent(*loans.pop(i % len(loans)))
        check_accounting(rm, named)
    for rid in list(live):
        rm.free_request(rid)
    for key in loans:
        rm.release_lent(*key)
    assert rm.num_free == rm.num_blocks and not holders(rm)


def test_lend_cached_takes_only_what_the_lender_may_revive():
    rm = RManager(0, 8, BS, enable_caching=True)
    toks = list(range(4 * BS + 1))
    hs = names(toks)
    rm.start("a", hs, 5)
    rm.cache_computed("a", hs, 4)
    assert rm.lend_cached(1, "x", hs, lambda r: 0) == [b.block for b in rm.tables["a"][:4]], \
        "blocks in use cost no free memory: lent whatever the cap"
    rm.free_request("a")
    assert rm.num_lent == 4 and rm.num_free == 4
    rm.release_lent(1, "x")
    assert rm.pool.num_evictable == 4
    got = rm.lend_cached(2, "y", hs, lambda r: 2)
    assert len(got) == 2, "free cached blocks come out of free memory: no more than lendable"
    assert rm.num_free == 6 and rm.stats()["lent_blocks"] == 2


# ---- the scheduler over a cached prefix ---------------------------------------------------------------


def req(rid: str, prompt: list[int], max_tokens: int = 4, **kw) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **kw), max_tokens=max_tokens)


def test_admission_skips_the_cached_prefix_and_always_computes_the_last_token():
    rm = RManager(0, 32, BS, enable_caching=True)
    s = Scheduler(LocalAllocator(rm), max_num_seqs=4, max_num_batched_tokens=64)
    doc = list(range(100, 100 + 3 * BS))  # exactly 3 blocks
    a = req("a", doc)
    s.add(a)
    assert run_step(s).num_new_tokens == [3 * BS]
    while s.has_unfinished():
        run_step(s)
    b = req("b", doc)  # the same prompt: 2 blocks cached, the last block computed (its last token samples)
    s.add(b)
    assert run_step(s).num_new_tokens == [BS] and b.num_cached_tokens == 2 * BS
    while s.has_unfinished():
        run_step(s)
    c = req("c", doc + [5, 6])  # a longer prompt: the 3 full blocks, then 2 tokens
    s.add(c)
    batch = run_step(s)
    assert batch.requests == [c] and batch.num_new_tokens == [2] and c.num_cached_tokens == 3 * BS
    salted = Request("d", doc + [5, 6], SamplingParams(max_tokens=4, cache_salt="x"), max_tokens=4)
    s.add(salted)
    batch = run_step(s)
    assert batch.requests[-1] is salted and batch.num_new_tokens[-1] == len(doc) + 2
    assert salted.num_cached_tokens == 0
    assert s.prefix_hits == 5 * BS and s.prefix_queries == 2 * len(doc) + 2 * (len(doc) + 2)


def test_prompt_logprobs_compute_what_they_need():
    r = req("p", list(range(3 * BS + 1)), prompt_logprobs=1)
    r.prompt_logprobs = []
    assert max_hit_blocks(r, BS) == 0
    r.prompt_logprobs = [{}] * (2 * BS + 1)  # a preempted request scored these positions already
    assert max_hit_blocks(r, BS) == 2
    r.prompt_logprobs = [{}] * (3 * BS)  # all of them
    assert max_hit_blocks(r, BS) == 3


def test_admission_counts_shared_blocks_as_no_cost():
    """A prompt whose prefix other running requests hold is admitted into a pool whose free blocks
    hold only its own new part."""
    rm = RManager(0, 6, BS, enable_caching=True)
    s = Scheduler(LocalAllocator(rm), max_num_seqs=4, max_num_batched_tokens=64)
    doc = list(range(200, 200 + 4 * BS))
    a = req("a", doc + [1], max_tokens=3)
    s.add(a)
    run_step(s)  # a holds 5 blocks, 4 of them cached now
    b = req("b", doc + [2], max_tokens=3)
    s.add(b)
    batch = run_step(s)
    assert b in batch.requests and b.num_cached_tokens == 4 * BS and rm.num_free == 0
    assert rm.pool.ref[rm.tables["a"][0].block] == 2


def test_random_shared_workloads_finish_exactly_and_free_everything():
    """Requests over a few shared documents on tight pools (preemption, eviction, aborts): each
    finishes with its tokens, the counts equal the holders at every step, nothing leaks."""
    rng = random.Random(5)
    for trial in range(25):
        blocks = rng.randint(8, 24)
        rm = RManager(0, blocks, BS, enable_caching=True)
        s = Scheduler(LocalAllocator(rm), max_num_seqs=rng.randint(1, 5), max_num_batched_tokens=rng.randint(4, 24))
        docs = [[rng.randrange(50) for _ in range(rng.randint(1, 5 * BS))] for _ in range(2)]
        reqs = []
        for i in range(rng.randint(2, 10)):
            doc = rng.choice(docs)
            p = doc[: rng.randint(1, len(doc))] + [rng.randrange(50) for _ in range(rng.randint(0, 5))]
            p = p[: blocks * BS - 9]
            m = rng.randint(1, 6)
            reqs.append(req(f"t{trial}-{i}", p, m))
            s.add(reqs[-1])

        def check():
            c = holders(rm)
            assert all(rm.pool.ref[b] == c.get(b, 0) for b in range(blocks))
            assert rm.num_free + rm.num_used == blocks

        aborted = run_with_aborts(s, reqs, rng, check)
        assert not s.has_unfinished(), f"trial {trial} did not finish"
        assert rm.num_free == blocks and not rm.tables
        for r in reqs:
            if r.request_id not in aborted:
                assert len(r.output_token_ids) == r.max_tokens
