"""Sequence-parallel prefill in the runtime: a prompt prefilled by a group of instances, its KV
left where it was computed, decode at the home: exact against one instance."""

import asyncio
import random

import pytest
import torch

from helpers_hf import make_hf_checkpoint
from infinite import SamplingParams
from infinite.cluster.inproc import InProcessCluster
from infinite.cluster.sp_chunk import MemberBlocks
from infinite.cluster.sp_layout import striped_layout
from infinite.cluster.sp_policy import choose_exchange
from infinite.kv.rmanager import blocks_for
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine

BS = 16


def params(max_tokens=8, prompt_logprobs=3):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("sp"), "llama_gqa", max_position_embeddings=1024))


def config(ckpt, pool, **kw):
    return EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=pool, block_size=BS, **kw)


def prompt_of(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(3, 300) for _ in range(n)]


def alone(ckpt, prompt, p):
    """Tokens and prompt logprobs of ``prompt`` on one instance that holds it all."""
    ref = LLMEngine(config(ckpt, 64))
    ref.add_request(prompt, p, "ref")
    out = None
    while ref.has_unfinished_requests():
        out = [o for o in ref.step() if o.finished] or out
    return out[0]


def assert_same(got, want):
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    a, b = got.prompt_logprobs, want.prompt_logprobs
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:]):
        assert x.keys() == y.keys()
        assert max(abs(x[t] - y[t]) for t in x) < 1e-4


async def run(cluster, prompt, p, layout=None, rid=None):
    req = cluster.front.make_request(prompt, p, rid)
    req.prefill_layout = layout
    last = None
    async for out in cluster.front.generate(req):
        last = out
    return last


def assert_no_leak(cluster) -> None:
    for inst in cluster.instances:
        assert not inst.rm.lent and not inst.rm.tables and inst.rm.num_free == inst.rm.num_blocks
        assert not inst.guests.members and not inst.groups.active


# ---------------------------------------------------------------------------- pure: a member's chunks


def test_member_chunks_cover_the_prompt_but_its_last_token_once_with_slots_in_its_own_blocks():
    lay = striped_layout(203, (0, 1, 2), BS, 2)  # 13 blocks, the last partial: boundaries mid-row, rows of 6
    seen = []
    for i in range(3):
        n = lay.segment_blocks(i)
        blocks = tuple(range(100 * i, 100 * i + n))
        mb = MemberBlocks(lay, i, blocks)
        for k in range(lay.rounds):
            ch = mb.chunk(k)
            pos = ch.positions()
            assert len(ch.slots) == len(pos)
            for p, slot in zip(pos, ch.slots):
                assert slot // BS in blocks and slot % BS == p % BS
                assert mb.logical[blocks.index(slot // BS)] == p // BS  # the block holds that position
            seen += pos
    assert sorted(seen) == list(range(202))  # every position once, but the last (the home's engine's)


def test_rows_meta_reads_only_blocks_before_each_rows_last_query():
    lay = striped_layout(160, (0, 1), BS, 1)  # 10 blocks, one per member and row
    mb = MemberBlocks(lay, 1, tuple(range(50, 50 + lay.segment_blocks(1))))
    meta = mb.rows_meta([64, 96], [16, 16])
    want = [[b for b, lg in zip(mb.blocks, mb.logical) if lg <= e // BS] for e in (79, 111)]
    for r in range(2):
        n = int(meta.num_blocks[r])
        assert meta.block_tables[r, :n].tolist() == want[r]


# ---------------------------------------------------------------------------- the runtime, in process


@pytest.mark.parametrize("members,n", [((0, 1), 203), ((1, 2, 0), 250)])
async def test_group_prefill_equals_one_instance_tokens_and_prompt_logprobs(ckpt, members, n):
    prompt = prompt_of(n, seed=n)
    want = alone(ckpt, prompt, params())
    lay = striped_layout(n, members, BS, 2)  # several rounds; stripe boundaries fall mid-prompt, the last block partial
    async with InProcessCluster(config(ckpt, 40), 3) as cl:
        got = await asyncio.wait_for(run(cl, prompt, params(), lay), 120)
        assert_same(got, want)
        home = cl.instances[members[0]]
        # the KV stayed where it was computed: each member held its segment, decode ran at the home
        assert got.outputs[0].finish_reason == "length"
        held = got.extra["kv_blocks"]
        for i, r in enumerate(members):
            extra = blocks_for(n + 8, BS) - blocks_for(n, BS) if i == 0 else 0
            assert held.get(r, 0) == lay.segment_blocks(i) + extra
        rec = home.groups.records[-1]
        assert rec.outcome == "done" and rec.members == list(members)
        assert set(rec.compute_s) == set(members) and all(v > 0 for v in rec.compute_s.values())
        # what moved: per round, sp_policy.choose_exchange's choice (GQA: K/V early, queries deeper)
        modes = [choose_exchange(lay, k, home.guests.shape).mode for k in range(lay.rounds)]
        ran = {m: sum(cl.instances[r].guests.rounds_by_mode[m] for r in members) for m in ("q", "kv")}
        assert ran == {m: sum(len(members) for x in modes if x == m) for m in ("q", "kv")}
        assert n != 250 or set(modes) == {"q", "kv"}  # both exchanges, in one request
        await asyncio.sleep(0.2)
        assert_no_leak(cl)


async def test_members_serve_their_own_requests_while_in_a_group(ckpt):
    """Members 1 and 2 run requests of their own (pinned there) through the group's rounds: every
    request equals its one-instance run."""
    long, shorts = prompt_of(300, seed=7), [prompt_of(n, seed=n) for n in (20, 45, 9, 33)]
    p_short = params(max_tokens=24, prompt_logprobs=None)
    want_long = alone(ckpt, long, params())
    want_short = [alone(ckpt, s, p_short).outputs[0].token_ids for s in shorts]
    lay = striped_layout(len(long), (0, 1, 2), BS, 1)
    async with InProcessCluster(config(ckpt, 40), 3) as cl:
        async def own(i, s):
            req = cl.front.make_request(s, p_short)
            req.data_parallel_rank = 1 + i % 2
            last = None
            async for out in cl.front.generate(req):
                last = out
            return last

        got_long, *got_short = await asyncio.wait_for(asyncio.gather(
            run(cl, long, params(), lay), *(own(i, s) for i, s in enumerate(shorts))), 120)
        assert_same(got_long, want_long)
        assert [o.outputs[0].token_ids for o in got_short] == want_short
        assert cl.instances[0].groups.records[-1].outcome == "done"
        # the members did steps of their own while the group ran
        assert all(cl.instances[r].counters.steps > 0 for r in (1, 2))
        await asyncio.sleep(0.2)
        assert_no_leak(cl)


async def test_a_group_prefilled_request_preempted_at_home_is_recomputed_exactly(ckpt):
    """Preemption of the request once at home (the scheduler's own: its blocks freed, local and
    lent, and recomputed from its tokens) keeps the tokens equal."""
    prompt = prompt_of(230, seed=11)
    p = params(max_tokens=16)
    want = alone(ckpt, prompt, p)
    lay = striped_layout(len(prompt), (0, 1), BS, 2)
    async with InProcessCluster(config(ckpt, 40), 2) as cl:
        home = cl.instances[0]
        task = asyncio.ensure_future(run(cl, prompt, p, lay, rid="pre"))
        for _ in range(2000):
            req = home.engine.requests.get("pre")
            if req is not None and len(req.output_token_ids) >= 3:
                break
            await asyncio.sleep(0.005)
        assert home.rm.held_counts("pre").get(1, 0) == lay.segment_blocks(1)  # its remote blocks, as computed
        preempted = await asyncio.get_running_loop().run_in_executor(
            home.executor, home.engine.scheduler.recompute, req)
        assert preempted and req.metrics.num_preemptions == 1
        got = await asyncio.wait_for(task, 120)
        assert_same(got, want)
        await asyncio.sleep(0.2)
        assert_no_leak(cl)


async def test_a_member_that_dies_mid_prefill_costs_a_recompute_at_home_not_a_hang(ckpt):
    import threading

    prompt = prompt_of(260, seed=13)
    want = alone(ckpt, prompt, params())
    lay = striped_layout(len(prompt), (0, 1), BS, 1)
    release = threading.Event()
    async with InProcessCluster(config(ckpt, 40), 2, timeout_s=10.0) as cl:
        member = cl.instances[1].guests
        real = member._round

        def stalls(m):  # member 1 computes its first round, then stops in the second
            if m.next_round == 1:
                release.wait(30)
            return real(m)

        member._round = stalls
        task = asyncio.ensure_future(run(cl, prompt, params(), lay))
        try:
            for _ in range(2000):
                if cl.instances[1].guests.members and next(iter(member.members.values())).next_round >= 1:
                    break
                await asyncio.sleep(0.005)
            cl.kill(1)
            got = await asyncio.wait_for(task, 60)
        finally:
            release.set()
        assert_same(got, want)
        rec = cl.instances[0].groups.records[-1]
        assert rec.outcome == "recomputed"
        assert got.extra["kv_blocks"] == {0: blocks_for(len(prompt) + 8, BS)}  # prefilled again at home, alone
        home = cl.instances[0]
        await asyncio.sleep(0.2)
        assert not home.groups.active and not home.guests.members and not home.rm.tables
        assert home.rm.num_free == home.rm.num_blocks


async def test_the_gmanager_groups_a_long_prompt_by_the_policy_and_stats_show_it(ckpt):
    """The gManager groups a long prompt on an idle cluster when its cost model says the group ends
    sooner (sp_policy.choose_group on the heartbeats' view), and not when one instance is as fast,
    nor a short prompt, nor with groups off. stats() show the group, its members and the TTFT split.
    The cost models are set here, so that the choice does not depend on this machine's probe."""
    from dataclasses import replace

    from infinite.cluster.cost_model import CostModel

    prompt = prompt_of(400, seed=17)
    want = alone(ckpt, prompt, params())
    knobs = dict(group_min_prompt_tokens=256, group_min_speedup=1.2, group_min_efficiency=0.0,
                 max_num_batched_tokens=128)
    costly = CostModel(base_s=1e-4, per_request_s=1e-5, per_context_token_s=1e-8, remote_latency_s=1e-5,
                       num_layers=3, prefill_token_s=1e-3, prefill_pair_s=1e-9)  # a prompt token: 10 steps' time
    async with InProcessCluster(config(ckpt, 40, **knobs), 3) as cl:
        await asyncio.sleep(0.4)  # every instance has beaten once: the view the policy reads
        gm, front = cl.gmanager, cl.front
        gm.cost = replace(costly, prefill_token_s=1e-9)  # prefill nearly free: one instance is as fast
        assert gm.choose_group("probe", len(prompt), front.groups, front.group_shape, 128) is None
        gm.cost = costly
        plan = gm.choose_group("probe", len(prompt), front.groups, front.group_shape, 128)
        assert plan is not None and plan.alone_s >= 1.2 * plan.group_s and gm.grouped == {"probe": plan.members}
        gm.group_ended("probe")
        gm.cost = replace(costly, prefill_token_s=1e-9)
        got = await asyncio.wait_for(run(cl, prompt, params()), 120)
        assert_same(got, want)
        assert sum(inst.groups.done for inst in cl.instances) == 0 and not cl.gmanager.grouped
        cl.gmanager.cost = costly
        got = await asyncio.wait_for(run(cl, prompt, params()), 120)
        assert_same(got, want)
        home = got.extra["rank"]
        rec = cl.instances[home].groups.records[-1]
        assert rec.outcome == "done" and len(rec.members) >= 2 and rec.members[0] == home
        stats = {s["rank"]: s for s in await cl.front.fresh_stats()}  # (heartbeats may be older)
        assert stats[home]["prefill_groups"] == 1 and stats[home]["groups"][-1]["members"] == rec.members
        assert all(stats[r]["group_compute_ms"] > 0 for r in rec.members)
        assert not cl.gmanager.grouped  # ended with its first output
        short = await asyncio.wait_for(run(cl, prompt_of(100, seed=1), params()), 60)
        assert sum(inst.groups.done for inst in cl.instances) == 1 and short.outputs[0].token_ids
    async with InProcessCluster(config(ckpt, 40, prefill_groups=False, **knobs), 3) as cl:
        await asyncio.sleep(0.4)
        cl.gmanager.cost = costly
        got = await asyncio.wait_for(run(cl, prompt, params()), 120)
        assert_same(got, want)
        assert all(not inst.groups.records for inst in cl.instances)


def test_group_knobs_are_validated_once_and_reach_the_policy():
    from infinite.cli import build_parser, engine_config
    from infinite.cluster.sp_route import group_policy

    with pytest.raises(ValueError, match="group_min_speedup"):
        EngineConfig(group_min_speedup=0.5)
    with pytest.raises(ValueError, match="group_min_efficiency"):
        EngineConfig(group_min_efficiency=1.5)
    with pytest.raises(ValueError, match="group_min_prompt_tokens"):
        EngineConfig(group_min_prompt_tokens=0)
    with pytest.raises(ValueError, match="prefill_groups"):
        EngineConfig(prefill_groups="yes")
    assert not group_policy(EngineConfig(enable_lending=False)).enabled  # members lend their segments
    assert not group_policy(EngineConfig(tensor_parallel_size=2)).enabled
    pol = group_policy(EngineConfig(group_min_prompt_tokens=5000, group_min_speedup=1.5, group_min_efficiency=0.5))
    assert (pol.enabled, pol.min_prompt_tokens, pol.min_speedup, pol.min_efficiency) == (True, 5000, 1.5, 0.5)
    args = build_parser().parse_args(["serve", "--no-prefill-groups", "--group-min-prompt-tokens", "4096",
                                      "--group-min-speedup", "1.3", "--group-min-efficiency", "0.6"])
    c = engine_config(args)
    assert (c.prefill_groups, c.group_min_prompt_tokens, c.group_min_speedup, c.group_min_efficiency) == \
        (False, 4096, 1.3, 0.6)
    assert engine_config(build_parser().parse_args(["serve"])).prefill_groups is True


def test_three_ranks_prefill_a_prompt_together_exactly(ckpt):
    """Rank processes (gloo point-to-point for decode, RPC for the group's calls), one torch thread
    each: a long prompt placed on a group of the three, short requests on the members beside it;
    tokens and prompt logprobs equal one instance's, and every block comes back."""
    import time

    from infinite import LLM

    long, shorts = prompt_of(420, seed=23), [prompt_of(n, seed=n) for n in (12, 30)]
    p = params(max_tokens=10)
    want = [alone(ckpt, x, p) for x in [long, *shorts]]
    with LLM(model=ckpt, dtype="float32", num_instances=3, num_kv_blocks=40, threads_per_rank=1) as llm:
        eng = llm.engine
        reqs = []
        for i, x in enumerate([long, *shorts]):
            req = eng.make_request(x, p, f"r{i}")
            if i == 0:
                req.prefill_layout = striped_layout(len(x), (2, 0, 1), BS, 2)
            else:
                req.data_parallel_rank = i
            eng.submit(req)
            reqs.append(req.request_id)
        got = {}
        deadline = time.monotonic() + 120
        while len(got) < 3 and time.monotonic() < deadline:
            got.update({o.request_id: o for o in eng.step() if o.finished})
        for rid, w in zip(reqs, want):
            assert_same(got[rid], w)
        lay = striped_layout(len(long), (2, 0, 1), BS, 2)
        extra = blocks_for(len(long) + 10, BS) - blocks_for(len(long), BS)  # decode's blocks, at home
        assert got["r0"].extra["kv_blocks"] == {2: lay.segment_blocks(0) + extra, 0: lay.segment_blocks(1),
                                                1: lay.segment_blocks(2)}
        stats = llm.stats()
        home = next(s for s in stats if s["rank"] == 2)
        assert home["prefill_groups"] == 1 and home["groups"][-1]["members"] == [2, 0, 1]
        assert all(s["group_compute_ms"] > 0 for s in stats)
        assert all(s["used_blocks"] == s["lent_blocks"] == s["borrowed_blocks"] == 0 for s in stats)


async def test_a_bad_group_is_a_clear_error_and_an_abort_mid_prefill_leaks_nothing(ckpt):
    import threading

    from infinite.errors import RequestError

    prompt = prompt_of(260, seed=19)
    release = threading.Event()
    async with InProcessCluster(config(ckpt, 40), 2) as cl:
        with pytest.raises(RequestError, match="layout is for 100 tokens"):
            await run(cl, prompt, params(), striped_layout(100, (0, 1), BS, 1))
        with pytest.raises(RequestError, match="2 or more serving instances"):
            await run(cl, prompt, params(), striped_layout(len(prompt), (0, 5), BS, 1))
        member = cl.instances[1].guests
        real = member._round

        def stalls(m):  # member 1 stops in its second round until released
            if m.next_round == 1:
                release.wait(30)
            return real(m)

        member._round = stalls
        task = asyncio.ensure_future(run(cl, prompt, params(), striped_layout(len(prompt), (0, 1), BS, 1), "ab"))
        try:
            for _ in range(2000):
                if member.members and next(iter(member.members.values())).next_round >= 1:
                    break
                await asyncio.sleep(0.005)
            task.cancel()  # the client goes away: rank 0 aborts the request at its home
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(400):
                if not cl.instances[0].groups.active:
                    break
                await asyncio.sleep(0.01)
        finally:
            release.set()
        assert cl.instances[0].groups.records[-1].outcome == "aborted"
        for _ in range(400):
            if not any(inst.rm.lent or inst.rm.tables or inst.guests.members for inst in cl.instances):
                break
            await asyncio.sleep(0.01)
        assert_no_leak(cl)


async def test_a_group_whose_home_batch_is_full_hands_over_when_a_row_frees(ckpt):
    """The home runs max_num_seqs requests of its own when the group ends: the request waits for a
    row (no batch over its size), then decodes exactly."""
    prompt, shorts = prompt_of(230, seed=29), [prompt_of(20, seed=3), prompt_of(25, seed=4)]
    p_short = params(max_tokens=40, prompt_logprobs=None)
    want = alone(ckpt, prompt, params())
    want_short = [alone(ckpt, s, p_short).outputs[0].token_ids for s in shorts]
    async with InProcessCluster(config(ckpt, 40, max_num_seqs=2), 2) as cl:
        async def own(s):
            req = cl.front.make_request(s, p_short)
            req.data_parallel_rank = 0
            last = None
            async for out in cl.front.generate(req):
                last = out
            return last

        tasks = [asyncio.ensure_future(own(s)) for s in shorts]
        home = cl.instances[0]
        for _ in range(2000):
            if len(home.engine.scheduler.running) == 2:
                break
            await asyncio.sleep(0.005)
        got = await asyncio.wait_for(run(cl, prompt, params(), striped_layout(len(prompt), (0, 1), BS, 2)), 120)
        outs = await asyncio.gather(*tasks)
        assert_same(got, want)
        assert [o.outputs[0].token_ids for o in outs] == want_short
        assert home.groups.records[-1].outcome == "done"
        await asyncio.sleep(0.2)
        assert_no_leak(cl)


async def test_a_slow_member_delays_the_group_but_nothing_deadlocks_or_changes(ckpt):
    """Member 2 starts each round late (as a member busy with long steps of its own would): the
    others wait for its K/V, layer by layer, and the result is exact."""
    import time as _time

    prompt = prompt_of(330, seed=31)
    want = alone(ckpt, prompt, params())
    lay = striped_layout(len(prompt), (0, 1, 2), BS, 1)
    async with InProcessCluster(config(ckpt, 40), 3) as cl:
        slow = cl.instances[2].guests
        real = slow._round

        def late(m):
            _time.sleep(0.15)
            return real(m)

        slow._round = late
        got = await asyncio.wait_for(run(cl, prompt, params(), lay), 120)
        assert_same(got, want)
        rec = cl.instances[0].groups.records[-1]
        assert rec.outcome == "done" and lay.rounds >= 3
        assert rec.wait_s[0] > 0.1  # the home waited for the slow member's parts
        await asyncio.sleep(0.2)
        assert_no_leak(cl)


def test_group_candidates_follow_the_heartbeats():
    """Who may be in a group, and with what room: lendable blocks, idle (no queue, in no group),
    roles (one that borrows may not lend; one that lends may not borrow)."""
    from infinite.cluster import messages as M
    from infinite.cluster.sp_route import group_candidates

    def st(rank, **kw):
        base = dict(total_blocks=100, free_blocks=90, used_blocks=10, lent_blocks=0, borrowed_blocks=0)
        return M.InstanceStats(rank=rank, **{**base, **kw})

    stats = {0: st(0, num_running=3, tokens_held=500), 1: st(1, num_waiting=2), 2: st(2, borrowed_blocks=4),
             3: st(3, lent_blocks=5), 4: st(4)}
    cands = group_candidates(stats, [0, 1, 2, 3, 4, 9], {0: 80, 1: 70, 2: 0, 3: 60}, in_group={4})
    by = {c.rank: c for c in cands}
    assert set(by) == {0, 1, 2, 3, 4}  # 9 serves but never beat: not a candidate
    assert (by[0].batch_size, by[0].context_tokens, by[0].room_blocks, by[0].idle) == (3, 500, 80, True)
    assert not by[1].idle and not by[4].idle and by[4].room_blocks == 0
    assert not by[2].may_lend and by[2].may_borrow and by[3].may_lend and not by[3].may_borrow


def test_metrics_show_prefill_groups_and_their_ttft_split_per_instance():
    from infinite.server.metrics import ServerMetrics

    class Engine:
        def stats(self):
            return [{"rank": 0, "prefill_groups": 2, "group_recomputes": 1, "group_compute_ms": 1500.0,
                     "group_wait_ms": 250.0},
                    {"rank": 1, "prefill_groups": 0, "group_recomputes": 0, "group_compute_ms": 900.0,
                     "group_wait_ms": 0.0}]

    text = ServerMetrics(lambda: Engine(), lambda: "m").render().decode()
    assert 'infinite:prefill_groups_total{instance="0"} 2.0' in text
    assert 'infinite:prefill_group_recomputes_total{instance="0"} 1.0' in text
    assert 'infinite:prefill_group_compute_seconds_total{instance="0"} 1.5' in text
    assert 'infinite:prefill_group_wait_seconds_total{instance="0"} 0.25' in text
    assert 'infinite:prefill_group_compute_seconds_total{instance="1"} 0.9' in text
