"""The cluster's control plane on the in-process transport: gManager, front door, borrowing,
migration and its failure path, without spawning a process."""

import asyncio
import dataclasses
import random

import pytest
import torch

from helpers_hf import make_hf_checkpoint
from infinite import SamplingParams
from infinite.cluster import messages as M
from infinite.cluster.inproc import InProcessCluster
from infinite.cluster.lent_rows import LentRows
from infinite.cluster.remote_attention import RemoteWire, handle_of, merge_parts
from infinite.cluster.transport import StaleRows
from infinite.attention import MAMetadata, micro_attention, write_kv
from infinite.errors import RequestError
from infinite.kv.rmanager import RBlock, RManager
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.model_runner import prepare_inputs
from infinite.runtime.request import Request

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("inproc"), "llama_gqa", max_position_embeddings=1024))


def config(ckpt, pool, **kw):
    return EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=pool, block_size=16, **kw)


def lent_by_walk(inst) -> int:
    """Blocks an instance lends, counted from its lend tables (not from its counters)."""
    return sum(len(b) for b in inst.rm.lent.values())


def held_by_walk(inst) -> int:
    return sum(1 for t in inst.rm.tables.values() for ref in t if ref.instance == inst.rank)


def assert_no_leak(cluster) -> None:
    for inst in cluster.instances:
        assert lent_by_walk(inst) == 0 and held_by_walk(inst) == 0 and not inst.rm.tables
        assert inst.rm.num_free == inst.rm.num_blocks


async def run(cluster, prompt, params=GREEDY, rid=None):
    req = cluster.front.make_request(prompt, params, rid)
    last = None
    async for out in cluster.front.generate(req):
        last = out
    return last


def alone(ckpt, prompt) -> list[int]:
    """The greedy tokens of ``prompt`` on one instance that holds it all."""
    ref = LLMEngine(config(ckpt, 64))
    ref.add_request(prompt, GREEDY, "ref")
    want = None
    while ref.has_unfinished_requests():
        want = [o for o in ref.step() if o.finished] or want
    return want[0].outputs[0].token_ids


async def test_a_request_larger_than_one_pool_is_served_exactly_across_three_instances(ckpt):
    rng = random.Random(3)
    prompt = [rng.randrange(3, 300) for _ in range(300)]  # 20 blocks with its output; pools of 9
    want = alone(ckpt, prompt)
    async with InProcessCluster(config(ckpt, 9), 3) as cl:
        out = await asyncio.wait_for(run(cl, prompt), 60)
        assert out.outputs[0].token_ids == want
        assert set(out.extra["kv_blocks"]) == {0, 1, 2} and sum(out.extra["kv_blocks"].values()) == 20
        await asyncio.sleep(0.3)  # let the heartbeats report the end
        assert_no_leak(cl)
        assert cl.gmanager.debts() == []


async def test_a_creditor_that_forgot_the_rows_refuses_once_and_the_step_is_retried_exactly(ckpt):
    """A creditor loses a decoding request's rows (as if a release had crossed the step): it refuses
    the next diff, the home retries the step with whole rows, and the output is as on one instance."""
    rng = random.Random(4)
    prompt = [rng.randrange(3, 300) for _ in range(300)]
    want = alone(ckpt, prompt)
    async with InProcessCluster(config(ckpt, 9), 3) as cl:
        refused = []
        for inst in cl.instances:
            apply = inst.creditor.rows.apply

            def counting(debtor, *args, apply=apply):
                try:
                    return apply(debtor, *args)
                except StaleRows:
                    refused.append(debtor)
                    raise
            inst.creditor.rows.apply = counting
        req = cl.front.make_request(prompt, GREEDY, "long")
        out, n = None, 0
        async for out in cl.front.generate(req):
            n += 1
            if n == 3:  # decoding, with blocks on both creditors: they forget its rows
                home = cl.front._homes["long"]
                for inst in cl.instances:
                    if inst.rank != home:
                        inst.creditor.rows.drop(home, [handle_of("long")])
        assert out.outputs[0].token_ids == want
        assert refused and set(refused) == {home}
        assert set(out.extra["kv_blocks"]) == {0, 1, 2}


async def test_gmanager_borrows_in_the_policy_order_all_or_nothing(ckpt):
    cl = InProcessCluster(config(ckpt, 20, max_lend_fraction=0.5), 3)
    try:
        cl.beat()
        gm = cl.gmanager
        gm.calibrated = True  # as after its first fit: this test is about the order, not the gain
        got = gm.borrow(M.Borrow(0, "r", 15))  # 10 lendable on each of 1 and 2
        assert sorted(got.blocks) == sorted(set(got.blocks)) and len(got.blocks) == 15
        by = {c: sum(1 for r, _ in got.blocks if r == c) for c in (1, 2)}
        assert by == {1: 10, 2: 5}  # the most lendable first, then the next
        assert lent_by_walk(cl.instances[1]) == 10 and lent_by_walk(cl.instances[2]) == 5
        # too much for what is left: nothing is taken, nothing stays reserved
        assert gm.borrow(M.Borrow(0, "s", 6)).blocks == []
        assert lent_by_walk(cl.instances[2]) == 5 and lent_by_walk(cl.instances[1]) == 10
        # the debtor's request shows up in its next heartbeat; debts follow from the placement
        cl.instances[0].rm.append_remote("r", [RBlock(c, b) for c, b in got.blocks])
        cl.beat()
        assert gm.debts() == [{"debtor": 0, "creditor": 1, "blocks": 10, "requests": 1},
                              {"debtor": 0, "creditor": 2, "blocks": 5, "requests": 1}]
        # roles: a creditor does not borrow while it lends
        assert gm.borrow(M.Borrow(1, "t", 1)).blocks == []
        # giving everything back empties the ledger
        cl.instances[0].allocator.give_back("r", cl.instances[0].rm.free_request("r"))
        cl.beat()
        assert gm.debts() == [] and lent_by_walk(cl.instances[1]) == lent_by_walk(cl.instances[2]) == 0
    finally:
        await cl.stop()


async def test_gmanager_calibrates_the_transport_and_plans_moves(ckpt):
    cl = InProcessCluster(config(ckpt, 64), 2)
    try:
        gm = cl.gmanager
        rtt = gm.calibrate_transport(rounds=3)
        assert rtt > 0 and gm.cost.remote_latency_s == rtt
        # instance 0: one long request fills it and four more wait; instance 1 is idle
        inst0 = cl.instances[0]
        inst0.rm.allocate("long", 60)
        cl.beat()
        beat = inst0.heartbeat()
        stats = M.InstanceStats(**{**__import__("msgspec").structs.asdict(beat.stats),
                                   "num_running": 1, "num_waiting": 4, "waiting_blocks": 30})
        gm.on_heartbeat(M.Heartbeat(stats, [M.PlacementEntry("long", 960, {0: 60})], []))
        sent = len(cl.hub.sent)
        assert gm.plan_once() == []  # no move for throughput before the cost model is fitted
        from infinite.cluster.cost_model import MIN_REMOTE_SAMPLES, CostModel, StepSample

        # Fitted to steps that never called a creditor, the remote path's cost is still the idle
        # probe's guess: no move for throughput on it.
        gm.calib.extend(StepSample(1 + i % 4, 960, 0.01 + 0.001 * (i % 4)) for i in range(32))
        gm.calib.fitted_at = -1e9
        assert gm.plan_once() == [] and not gm.calibrated
        plain, gm.policy = gm.policy, dataclasses.replace(gm.policy, eager=True)
        gm.calib.fitted_at = -1e9
        gm._calibrate()
        assert gm.calibrated  # --eager-lending: the first fit is enough
        gm.policy, gm.calibrated = plain, False
        gm.calib.extend(StepSample(1, 960, 0.02, remote_calls=1) for _ in range(MIN_REMOTE_SAMPLES))
        gm.calib.fitted_at = -1e9
        gm._calibrate()
        assert gm.calibrated  # now the fit has seen what remote calls add
        # Many more steps without remote calls do not push the remote ones out: it stays calibrated.
        gm.calib.extend(StepSample(2, 960, 0.012) for _ in range(1000))
        gm.calib.fitted_at = -1e9
        gm._calibrate()
        assert gm.calibrated
        gm.cost = CostModel(num_layers=3)  # a fast remote path: the move pays
        moves = gm.plan_once()
        assert moves and all(m.src == 0 and m.dst == 1 and m.request_id == "long" for m in moves)
        issued = [msg for src, dst, msg in cl.hub.sent[sent:] if isinstance(msg, M.MoveKV)]
        assert issued == [M.MoveKV("long", m.num_blocks, 1) for m in moves]
        assert gm.plan_once() == []  # one move per request until a heartbeat shows it
    finally:
        await cl.stop()


def fake_running(inst, rid, blocks):
    """A request the instance holds `blocks` full local blocks of (as after its prefill)."""
    from infinite.runtime.request import Request

    req = Request(rid, list(range(3, 3 + 16 * blocks)), GREEDY, max_tokens=4)
    req.num_computed_tokens = 16 * blocks
    inst.engine.requests[rid] = req
    inst.rm.allocate(rid, blocks)
    return req


async def settle(inst, cond, timeout=10.0):
    """Run the between-steps work (apply finished transfers) until cond() holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        inst.migrator.apply_done()
        await asyncio.sleep(0.01)


async def test_migration_copies_while_decoding_and_a_failed_copy_gives_the_reservation_back(ckpt):
    cl = InProcessCluster(config(ckpt, 32), 2)
    try:
        inst0, inst1 = cl.instances
        fake_running(inst0, "r", 8)

        def broken(msg, tensors):
            raise OSError("disk on fire")

        inst1.creditor.write_blocks = broken
        inst0._migrate(M.MoveKV("r", 4, 1))
        await settle(inst0, lambda: not inst0.migrator.busy)
        await settle(inst0, lambda: lent_by_walk(inst1) == 0)  # the reservation came back
        assert inst1.rm.num_free == 32 and [ref.instance for ref in inst0.rm.table("r")] == [0] * 8
        assert inst0.counters.migrations == 0
        del inst1.creditor.write_blocks  # the real one again: the move goes through
        before = inst0.engine.kv.k[:, [ref.block for ref in inst0.rm.table("r")[:4]]].clone()
        inst0._migrate(M.MoveKV("r", 4, 1))
        assert [ref.instance for ref in inst0.rm.table("r")] == [0] * 8  # the swap waits for a step gap
        await settle(inst0, lambda: not inst0.migrator.busy)
        table = inst0.rm.table("r")
        assert [ref.instance for ref in table] == [1] * 4 + [0] * 4 and lent_by_walk(inst1) == 4
        assert torch.equal(inst1.engine.kv.k[:, [ref.block for ref in table[:4]]], before)
        assert inst0.rm.num_free == 32 - 4 and inst0.counters.migrated_blocks == 4
        # blocks come home: the creditor's copy comes back into the home's pool, its blocks are freed
        inst0._migrate(M.MoveKV("r", 4, 0, src=1))
        await settle(inst0, lambda: not inst0.migrator.busy)
        table = inst0.rm.table("r")
        assert [ref.instance for ref in table] == [0] * 8
        assert torch.equal(inst0.engine.kv.k[:, [ref.block for ref in table[:4]]], before)
        await settle(inst0, lambda: lent_by_walk(inst1) == 0)
        assert inst1.rm.num_free == 32 and inst0.rm.num_borrowed == 0
    finally:
        await cl.stop()


async def test_a_request_that_ends_during_a_copy_leaks_nothing(ckpt):
    cl = InProcessCluster(config(ckpt, 32), 2)
    try:
        inst0, inst1 = cl.instances
        fake_running(inst0, "r", 8)
        inst0._migrate(M.MoveKV("r", 4, 1))
        remote = inst0.rm.free_request("r")  # it finished before the swap
        inst0.engine.requests.pop("r")
        assert remote == []
        await settle(inst0, lambda: not inst0.migrator.busy)
        await settle(inst0, lambda: lent_by_walk(inst1) == 0)
        assert_no_leak(cl)
    finally:
        await cl.stop()


async def test_front_door_rejects_what_no_instance_can_hold_and_fails_streams_with_a_reason(ckpt):
    async with InProcessCluster(config(ckpt, 12), 2) as cl:
        with pytest.raises(ValueError, match=r"at most 23 blocks .*max_lend_fraction=0\.95"):  # 12 own + 11
            cl.front.make_request([3 + i % 290 for i in range(400)], GREEDY)
        req = cl.front.make_request([5, 6, 7], GREEDY)
        cl.front._stopping = True
        with pytest.raises(RequestError) as e:
            async for _ in cl.front.generate(req):
                pass
        assert e.value.reason == "shutdown"
        cl.front._stopping = False


def test_remote_split_and_merge_equal_attention_over_one_pool():
    """Requests' blocks spread over three pools: per-pool MicroAttention (each creditor's over the rows
    its diffs built, after writing the new K/V that land there) merged in place by AggregationAttention
    equals MicroAttention over all blocks in one pool, for decode rows and a prefill chunk whose
    queries see none of one creditor's keys."""
    torch.manual_seed(0)
    bs, nkv, nh, d = 4, 2, 4, 8
    ctx, q_lens = [13, 7, 11], [1, 1, 5]  # r0, r1 decode their last token; r2 prefills positions 6..10
    rm = RManager(0, 16, bs)
    free = {1: 0, 2: 0}
    reqs, one_tables = [], []
    for j, n in enumerate(ctx):
        rid, nblocks = f"r{j}", -(-n // bs)
        for i in range(nblocks):
            c = [1, 2, 0][(i + j) % 3] if i < nblocks - 1 or j == 2 else 0  # r2's tail block is remote
            if c == 0:
                rm.allocate(rid, 1)
            else:
                rm.append_remote(rid, [RBlock(c, free[c])])
                free[c] += 1
        one_tables.append([sum(-(-m // bs) for m in ctx[:j]) + i for i in range(nblocks)])
        req = Request(rid, list(range(n)), SamplingParams(), max_tokens=4)
        req.num_computed_tokens = n - q_lens[j]
        reqs.append(req)
    ib = InputBatch(rm, max_rows=4, max_blocks=16, device=torch.device("cpu"))
    ib.sync(reqs)
    pools = {r: (torch.zeros(16, bs, nkv, d), torch.zeros(16, bs, nkv, d)) for r in range(3)}
    one = (torch.zeros(16, bs, nkv, d), torch.zeros(16, bs, nkv, d))
    k_all, v_all = [torch.randn(n, nkv, d) for n in ctx], [torch.randn(n, nkv, d) for n in ctx]
    for j, n in enumerate(ctx):  # the KV written by earlier steps
        table = rm.table(f"r{j}")
        for p in range(n - q_lens[j]):
            ref = table[p // bs]
            for (kc, vc), blk in ((pools[ref.instance], ref.block), (one, one_tables[j][p // bs])):
                write_kv(kc, vc, k_all[j][p:p + 1], v_all[j][p:p + 1], torch.tensor([blk * bs + p % bs]))
    q = torch.randn(sum(q_lens), nh, d)
    q_starts = [n - ql for n, ql in zip(ctx, q_lens)]
    new_k = torch.cat([k[s0:] for k, s0 in zip(k_all, q_starts)])
    new_v = torch.cat([v[s0:] for v, s0 in zip(v_all, q_starts)])
    one_slots = torch.tensor([t[p // bs] * bs + p % bs for t, s0, ql in zip(one_tables, q_starts, q_lens)
                              for p in range(s0, s0 + ql)])
    write_kv(*one, new_k, new_v, one_slots)
    full = micro_attention(q, *one, MAMetadata.build(q_lens, q_starts, one_tables), d ** -0.5)[0]

    inputs = prepare_inputs(ib, {r.request_id: n for r, n in zip(reqs, q_lens)}, torch.device("cpu"))
    keep = inputs.slot_mapping >= 0  # the local writes; the remote tail's go with its creditor's part
    write_kv(*pools[0], new_k[keep], new_v[keep], inputs.slot_mapping[keep])
    local = micro_attention(q, *pools[0], inputs.meta, d ** -0.5)
    parts = RemoteWire(0).parts(ib, inputs.rows, inputs.q_lens, inputs.q_starts)
    assert [p.creditor for p in parts] == [1, 2]
    assert [p.write_rows.tolist() for p in parts] == [[2, 3], [4, 5, 6]]  # r2's positions 6,7 | 8,9,10
    results = []
    for p in parts:
        meta = LentRows(16).apply(0, 0, p.meta)
        write_kv(*pools[p.creditor], new_k[p.write_rows], new_v[p.write_rows], p.write_slots)
        results.append(micro_attention(q.index_select(0, p.rows), *pools[p.creditor], meta, d ** -0.5))
    merged = merge_parts(local, parts, results)
    assert merged is local[0]  # in place
    assert torch.allclose(merged, full, atol=1e-5)


async def test_one_request_uses_over_95_percent_of_an_idle_cluster(tmp_path):
    """The lend cap protects a creditor's own demand, not idle memory: 4 idle instances of 20
    blocks hold one request of 76 blocks (95% of 80), exactly."""
    ckpt = str(make_hf_checkpoint(tmp_path, "llama_gqa", max_position_embeddings=2048))
    rng = random.Random(7)
    prompt = [rng.randrange(3, 300) for _ in range(76 * 16 - 4)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    ref = LLMEngine(config(ckpt, 96))
    ref.add_request(prompt, params, "ref")
    want = []
    while ref.has_unfinished_requests():
        want += [o for o in ref.step() if o.finished]
    async with InProcessCluster(config(ckpt, 20), 4) as cl:
        assert cl.front.capacity_tokens >= 0.95 * 4 * 20 * 16
        out = await asyncio.wait_for(run(cl, prompt, params), 120)
        assert out.outputs[0].token_ids == want[0].outputs[0].token_ids
        assert sum(out.extra["kv_blocks"].values()) == 76 and set(out.extra["kv_blocks"]) == {0, 1, 2, 3}
        await asyncio.sleep(0.3)
        assert_no_leak(cl)


async def test_no_regret_loans_pay_or_serve_demand_no_home_can_hold(ckpt):
    """When remote calls cost more than the batch a loan admits, the gManager refuses loans for
    requests that fit their home's pool (they wait, as without lending) and still grants loans
    that a request larger than its home's pool needs."""
    from dataclasses import replace

    from infinite.cluster.cost_model import CostModel

    cl = InProcessCluster(config(ckpt, 20), 2)
    try:
        gm = cl.gmanager
        busy = cl.instances[0]
        for i in range(6):  # a busy home: six running requests
            fake_running(busy, f"r{i}", 3)
            busy.engine.scheduler.running.append(busy.engine.requests[f"r{i}"])
        cl.beat()
        assert gm.borrow(M.Borrow(0, "early", 2, request_blocks=4)).blocks == []  # nothing on a guess
        gm.calibrated = True
        gm.loans_refused = 0
        gm.cost = CostModel(base_s=4e-3, per_request_s=3e-4, per_context_token_s=2e-7, remote_latency_s=2e-3,
                            num_layers=3)
        fits_home = gm.borrow(M.Borrow(0, "short", 2, request_blocks=4, running=False))
        assert fits_home.blocks == [] and gm.loans_refused == 1
        too_big = gm.borrow(M.Borrow(0, "long", 10, request_blocks=30, running=False))
        assert len(too_big.blocks) == 10  # 30 blocks never fit a 20-block home: capacity, not throughput
        # with a fast remote path the same short loan pays
        gm.cost = replace(gm.cost, remote_latency_s=1e-6)
        assert len(gm.borrow(M.Borrow(0, "short2", 2, request_blocks=4, running=False)).blocks) == 2
    finally:
        await cl.stop()


async def test_a_full_home_asks_for_no_loan_the_gmanager_would_refuse(ckpt):
    """Until the gManager lends for throughput (its heartbeat replies say so), a request that fits
    its home's pool does not ask for a loan when the pool is full: the answer would be no, and the
    question is a blocking round trip on the step."""
    cl = InProcessCluster(config(ckpt, 8), 2)
    try:
        home = cl.instances[0]
        from infinite.runtime.request import Status

        req = fake_running(home, "r", 6)  # 6 of 8 blocks
        req.status = Status.RUNNING
        fake_running(home, "other", 2)  # the pool is full
        cl.beat()
        assert not home.allocator.lends_for_throughput  # not fitted to measured remote steps yet

        def borrows() -> int:
            return sum(isinstance(msg, M.Borrow) for _, _, msg in cl.hub.sent)

        before = borrows()
        assert not home.allocator.grow(req, 16 * 6 + 1)  # one more block: fits the pool, none free
        assert borrows() == before
        cl.gmanager.calibrated = True
        cl.beat()
        assert home.allocator.lends_for_throughput
        home.allocator.grow(req, 16 * 6 + 1)
        assert borrows() > before  # now it asks (the cost model decides)
    finally:
        await cl.stop()


async def test_requests_routed_but_not_yet_taken_in_count_as_waiting(ckpt):
    """The gManager forgets what it routed to an instance at each of its beats; a beat must
    therefore count requests still in the instance's inbox, or a burst all goes to one home."""
    cl = InProcessCluster(config(ckpt, 20), 2)
    try:
        inst = cl.instances[1]
        before = inst.stats()
        inst.enqueue(M.AddRequest("queued", list(range(3, 3 + 40)), GREEDY, max_tokens=4))
        after = inst.stats()
        assert after.num_waiting == before.num_waiting + 1
        assert after.waiting_blocks == before.waiting_blocks + 3  # 40 prompt tokens + 1, blocks of 16
        cl.beat()
        snap = cl.gmanager.snapshot()
        assert [i.waiting_blocks for i in snap.instances if i.rank == 1] == [after.waiting_blocks]
    finally:
        await cl.stop()
