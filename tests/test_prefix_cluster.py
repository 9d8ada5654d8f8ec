"""The prefix cache across a cluster (in-process transport): a prompt whose prefix is cached on another
instance uses those blocks in place, lent by reference and attended by remote MicroAttention, with
the same tokens as recomputing it; the router sends a request where its prefix is unless that
instance is busy; a holder that dies costs recomputation, not the request; nothing leaks."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from helpers_hf import make_hf_checkpoint
from infinite import SamplingParams
from infinite.cluster.inproc import InProcessCluster
from infinite.cluster.prefix_routing import PrefixIndex, PrefixRouting, Routed, choose_home, copy_pays
from infinite.kv.prefix import anchors, extend_hashes
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine

torch.set_num_threads(1)

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("pfxcl"), "llama_gqa", max_position_embeddings=1024))


def config(ckpt, pool=48, **kw) -> EngineConfig:
    return EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=pool, block_size=BS, threads_per_rank=1,
                        placement_interval_s=60.0, **kw)


def reference(ckpt, prompts, params=GREEDY):
    eng = LLMEngine(config(ckpt, 128, enable_prefix_caching=False))
    for i, p in enumerate(prompts):
        eng.add_request(p, params, f"ref{i}")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[f"ref{i}"] for i in range(len(prompts))]


async def run(cl, prompt, params=GREEDY, home=None):
    req = cl.front.make_request(prompt, params)
    req.data_parallel_rank = home
    last = None
    async for out in cl.front.generate(req):
        last = out
    return last


def same(a, b) -> None:
    ca, cb = a.outputs[0], b.outputs[0]
    assert ca.token_ids == cb.token_ids
    for la, lb in zip(ca.logprobs, cb.logprobs):
        assert la.keys() == lb.keys() and max(abs(la[t] - lb[t]) for t in la) < 1e-5


def holders_agree(inst) -> None:
    """Every block's reference count equals its holders counted from the tables and lent lists."""
    rm = inst.rm
    count = [0] * rm.num_blocks
    for table in rm.tables.values():
        for ref in table:
            if ref.instance == rm.rank:
                count[ref.block] += 1
    for blocks in rm.lent.values():
        for b in blocks:
            count[b] += 1
    assert count == rm.pool.ref, inst.rank


def assert_no_leak(cl) -> None:
    for inst in cl.instances:
        if inst.stopping:
            continue
        rm = inst.rm
        assert not rm.tables and not rm.lent and rm.num_lent == 0 and rm.num_borrowed == 0, inst.rank
        assert rm.num_free == rm.num_blocks and not any(rm.pool.ref), inst.rank


async def settle(cl, cond, timeout=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.05)


async def test_a_prefix_cached_on_another_instance_serves_in_place_exactly(ckpt):
    rng = random.Random(7)
    doc = [rng.randrange(3, 300) for _ in range(100)]  # 6 full blocks
    prompts = [doc + [rng.randrange(3, 300) for _ in range(k)] for k in (5, 9, 21)]
    want = reference(ckpt, prompts)
    async with InProcessCluster(config(ckpt), 2) as cl:
        first = await asyncio.wait_for(run(cl, prompts[0], home=1), 60)  # the document is cached on 1
        gm = cl.gmanager
        chain = anchors(extend_hashes([], doc, BS))
        await settle(cl, lambda: gm.prefixes.depths(chain, [0, 1]) == {0: 0, 1: 4})  # anchors: to within a stride
        second = await asyncio.wait_for(run(cl, prompts[1], home=0), 60)  # at home on 0: 1's blocks in place
        assert second.num_cached_tokens == 6 * BS
        assert second.extra["kv_blocks"] == {1: 6, 0: 2}, "the prefix stayed on 1, the rest was computed on 0"
        s0 = cl.instances[0].stats()
        assert s0.prefix_cache_remote_hits == 6 * BS and cl.instances[1].stats().lent_blocks == 0
        # both ask at once: one on the holder (local hit), one on the other (remote hit); both exact
        third, fourth = await asyncio.wait_for(asyncio.gather(run(cl, prompts[2], home=0),
                                                              run(cl, prompts[2], home=1)), 60)
        # at least the document (the holder lends the longest run it has: more if the other request
        # computed its question's block first)
        assert third.num_cached_tokens >= 6 * BS and fourth.num_cached_tokens >= 6 * BS
        for out, ref in zip((first, second, third, fourth), want + want[2:]):
            same(out, ref)
        assert first.num_cached_tokens == 0
        await settle(cl, lambda: all(not i.rm.tables and not i.rm.lent for i in cl.instances))
        for inst in cl.instances:
            holders_agree(inst)
        assert_no_leak(cl)
        await settle(cl, lambda: gm.debts() == [])  # the ledger hears of it at the next heartbeats


async def test_shared_blocks_lent_to_running_requests_are_counted_once_and_never_evicted(ckpt):
    """Several requests at home on 0 hold rank 1's cached prefix at once while rank 1's own requests
    use it too and new prompts fill rank 1's pool: the shared blocks stay put (reference counts
    equal their holders at every moment), every output is exact, and all of it comes back."""
    rng = random.Random(8)
    doc = [rng.randrange(3, 300) for _ in range(96)]  # 6 blocks
    qs = [doc + [rng.randrange(3, 300) for _ in range(3 + i)] for i in range(4)]
    fill = [[rng.randrange(3, 300) for _ in range(120)] for _ in range(3)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    want = reference(ckpt, qs + fill, params)
    async with InProcessCluster(config(ckpt, pool=40), 2) as cl:
        await asyncio.wait_for(run(cl, qs[0], params, home=1), 60)
        gm = cl.gmanager
        chain = anchors(extend_hashes([], doc, BS))
        await settle(cl, lambda: gm.prefixes.depths(chain, [1])[1] == 4)
        held = set()

        async def watch():
            while True:
                for inst in cl.instances:
                    holders_agree(inst)
                held.update(b for blocks in cl.instances[1].rm.lent.values() for b in blocks)
                await asyncio.sleep(0.01)

        w = asyncio.ensure_future(watch())
        try:
            outs = await asyncio.wait_for(asyncio.gather(
                *(run(cl, q, params, home=0) for q in qs[1:]), run(cl, qs[0], params, home=1),
                *(run(cl, f, params, home=1) for f in fill)), 120)
        finally:
            w.cancel()
        for out, ref in zip(outs, want[1:4] + want[:1] + want[4:]):
            same(out, ref)
        assert [o.num_cached_tokens for o in outs[:3]] == [6 * BS] * 3 and held
        await settle(cl, lambda: all(not i.rm.tables and not i.rm.lent for i in cl.instances))
        assert_no_leak(cl)


async def test_a_prefix_holder_that_dies_costs_recomputation_not_the_request(ckpt):
    rng = random.Random(9)
    doc = [rng.randrange(3, 300) for _ in range(120)]
    q = doc + [rng.randrange(3, 300) for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)
    want = reference(ckpt, [q], params)[0]
    async with InProcessCluster(config(ckpt), 2, timeout_s=10.0) as cl:
        await asyncio.wait_for(run(cl, doc + [5], SamplingParams(max_tokens=1), home=1), 60)
        gm = cl.gmanager
        await settle(cl, lambda: gm.prefixes.depths(anchors(extend_hashes([], doc, BS)), [1])[1] >= 4)
        task = asyncio.ensure_future(run(cl, q, params, home=0))
        await settle(cl, lambda: any(ref.instance == 1 for t in cl.instances[0].rm.tables.values() for ref in t))
        await asyncio.sleep(0.2)  # some decode steps with the prefix on rank 1
        cl.kill(1)
        out = await asyncio.wait_for(task, 60)
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert cl.instances[0].stats().recomputed >= 1
        assert 1 not in gm.prefixes._by_rank  # the dead rank's prefixes are forgotten
        await settle(cl, lambda: not cl.instances[0].rm.tables)
        assert_no_leak(cl)


async def test_the_router_sends_a_request_where_its_prefix_is(ckpt):
    rng = random.Random(10)
    doc = [rng.randrange(3, 300) for _ in range(100)]
    async with InProcessCluster(config(ckpt), 2) as cl:
        await asyncio.wait_for(run(cl, doc + [3], SamplingParams(max_tokens=1), home=1), 60)
        gm = cl.gmanager
        await settle(cl, lambda: gm.prefixes.depths(anchors(extend_hashes([], doc, BS)), [1])[1] == 4)
        outs = [await asyncio.wait_for(run(cl, doc + [4 + i], SamplingParams(max_tokens=2)), 60) for i in range(3)]
        assert [o.extra["rank"] for o in outs] == [1, 1, 1]
        assert all(o.num_cached_tokens == 6 * BS for o in outs)


async def test_a_short_prefix_read_by_a_long_generation_is_copied_home(ckpt):
    """When the home has measured both a remote call and a block copy, and the request will step long
    enough that its remote calls would cost more than copying, the lent prefix is pulled into the
    home's pool while it runs (the table swaps between two steps) and cached there: the next request
    at that home hits locally. Tokens are unchanged."""
    rng = random.Random(11)
    doc = [rng.randrange(3, 300) for _ in range(64)]  # 4 blocks
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    qs = [doc + [rng.randrange(3, 300) for _ in range(3)] for _ in range(2)]
    want = reference(ckpt, qs, params)
    async with InProcessCluster(config(ckpt), 2) as cl:
        await asyncio.wait_for(run(cl, doc + [5], SamplingParams(max_tokens=1), home=1), 60)
        gm = cl.gmanager
        await settle(cl, lambda: gm.prefixes.depths(anchors(extend_hashes([], doc, BS)), [1])[1] == 4)
        c = cl.instances[0].counters
        c.recent_wait_per_call_s, c.copy_s_per_block = 1e-3, 1e-3  # as measured: 40 x 3 x 1 ms > 4 x 1 ms
        first = await asyncio.wait_for(run(cl, qs[0], params, home=0), 60)
        assert first.num_cached_tokens == 4 * BS and first.extra["kv_blocks"] == {0: 7}, first.extra
        assert cl.instances[0].stats().prefix_copies == 1
        second = await asyncio.wait_for(run(cl, qs[1], params, home=0), 60)
        assert second.num_cached_tokens == 4 * BS
        assert cl.instances[0].stats().prefix_cache_remote_hits == 4 * BS, "the second hit was local"
        same(first, want[0])
        same(second, want[1])
        await settle(cl, lambda: all(not i.rm.tables and not i.rm.lent for i in cl.instances))
        assert_no_leak(cl)


# ---- the pure parts ---------------------------------------------------------------------------------


def test_prefix_index_follows_the_heartbeat_diffs():
    idx = PrefixIndex()
    hs = extend_hashes([], list(range(20 * BS)), BS)
    chain = anchors(hs)
    keys = [k for _, k in chain]
    idx.apply(0, keys[:3], [])  # depths 1, 2, 4
    idx.apply(1, keys, [])
    assert idx.depths(chain, [0, 1, 2]) == {0: 4, 1: 16, 2: 0}
    idx.apply(1, [], keys[-1:])  # it evicted its deepest blocks
    assert idx.depths(chain, [1]) == {1: 8}
    idx.apply(0, keys[:1], [], everything=True)  # a resend after a lost beat replaces everything
    assert idx.depths(chain, [0]) == {0: 1} and idx.num_anchors(0) == 1
    idx.drop(1)
    assert idx.depths(chain, [0, 1]) == {0: 1, 1: 0} and all(1 not in r for r in idx.holders.values())


def test_choose_home_prefers_the_holder_unless_it_is_busy():
    cfg = PrefixRouting(busy_margin=4, busy_ratio=2)
    assert choose_home(0, {0: 0, 1: 0}, {}) == Routed(0)
    assert choose_home(0, {0: 1, 1: 3}, {1: 6}, cfg) == Routed(1)  # a little busier: still the holder
    assert choose_home(0, {0: 1, 1: 9}, {1: 6}, cfg) == Routed(0, 1, 6)  # busy: elsewhere, with a hint
    assert choose_home(1, {0: 1, 1: 9, 2: 0}, {1: 6, 2: 2}, cfg) == Routed(2, 1, 6)
    assert choose_home(0, {0: 0, 1: 9}, {0: 6, 1: 6}, cfg) == Routed(0)  # the deepest holders tie: less loaded
    assert choose_home(1, {0: 1, 1: 0}, {0: 8, 1: 8}, cfg) == Routed(1)
    # memory: the holder's free blocks after its queue must hold what it has not cached
    assert choose_home(0, {0: 0, 1: 1}, {1: 6}, cfg, room={0: 50, 1: 4}, need=10) == Routed(1)
    assert choose_home(0, {0: 0, 1: 1}, {1: 6}, cfg, room={0: 50, 1: 3}, need=10) == Routed(0, 1, 6)
    assert choose_home(1, {0: 2, 1: 1}, {1: 6}, cfg, room={0: 50, 1: 3}, need=10) == Routed(0, 1, 6)
    assert choose_home(0, {0: 0}, {0: 6}, cfg, room={0: 0}, need=10) == Routed(0)  # nowhere else to go
    with pytest.raises(ValueError):
        choose_home(5, {0: 0}, {})


def test_copy_pays_for_short_prefixes_read_long_and_never_unmeasured():
    assert copy_pays(4, 100, 32, 1e-4, 1e-3)  # 0.32 s of remote calls > 4 ms of copying
    assert not copy_pays(512, 16, 32, 1e-4, 1e-3)  # a long document read by a short answer stays
    assert not copy_pays(4, 100, 32, 0.0, 1e-3) and not copy_pays(4, 100, 32, 1e-4, 0.0)
    assert not copy_pays(0, 100, 32, 1e-4, 1e-3)
