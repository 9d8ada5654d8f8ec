"""A rank dies, leaves or joins while requests stream: the in-process cluster (infinite/cluster/inproc.py).

Real Instances, real gManager / supervisor / front door, real heartbeats; only
the transport is in-process, so a death is ``kill(rank)`` (every call to or from
it fails, its loops stop) and the tests run in seconds. Requests are greedy, so every stream must end exactly as on one
undisturbed instance, and each cumulative output must extend the one before
(nothing repeated, nothing missing).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from helpers_hf import make_hf_checkpoint
from infinite.cluster.inproc import InProcessCluster
from infinite.cluster.leave import leave
from infinite.cluster.membership import DETECTION_BOUND_S
from infinite.cluster.prefix_routing import Routed
from infinite.errors import RequestError
from infinite.runtime.config import EngineConfig
from infinite.sampling.params import SamplingParams

POOL = 12
PARAMS = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
# The long request: 200 + 160 tokens, 23 blocks; three pools of 12 (each lends up to 11) hold 34
# for one request, two hold 23, one holds 12.
LONG_PARAMS = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)


def params_of(i: int) -> SamplingParams:
    return LONG_PARAMS if i == 0 else PARAMS


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(checkpoint, prompts, each prompt's greedy tokens on one undisturbed instance)."""
    from infinite import LLM

    ckpt = str(make_hf_checkpoint(tmp_path_factory.mktemp("recovery"), "llama_gqa", max_position_embeddings=1024))
    rng = random.Random(11)
    long = [rng.randrange(3, 300) for _ in range(200)]  # more than one pool
    prompts = [long] + [[rng.randrange(3, 300) for _ in range(n)] for n in (5, 23, 9, 40, 14)]
    llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=256)
    outs = llm.generate(prompts, [params_of(i) for i in range(len(prompts))], use_tqdm=False)
    return ckpt, prompts, [o.outputs[0].token_ids for o in outs]


def config(ckpt: str) -> EngineConfig:
    return EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=POOL, threads_per_rank=1, placement_interval_s=60.0)


class Stream:
    """One request driven through the front door, every cumulative output checked as it comes."""

    def __init__(self, front, prompt: list[int], params: SamplingParams) -> None:
        self.req = front.make_request(prompt, params)
        self.tokens: list[int] = []
        self.text = ""
        self.error: RequestError | None = None
        self.task = asyncio.ensure_future(self._run(front))

    async def _run(self, front) -> None:
        try:
            async for out in front.generate(self.req):
                ids = out.outputs[0].token_ids
                assert ids[: len(self.tokens)] == self.tokens, "an output did not extend the one before"
                assert len(ids) > len(self.tokens) or out.finished
                self.tokens = list(ids)
                self.text = out.outputs[0].text
        except RequestError as e:
            self.error = e


async def wait_for(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def streams_with_a_spanning_request(front, prompts, homes_on: int | None = None):
    """Start the long prompt's stream and wait until it holds blocks on two pools or more; pick the rank
    other than 0 that holds some of its KV (its creditor, else its home); then start the other
    prompts' streams — homed on that rank when ``homes_on`` says so — and wait until each has
    tokens. -> (streams, the long request's home, the picked rank)."""
    long = Stream(front, prompts[0], LONG_PARAMS)
    rid = long.req.request_id
    await wait_for(lambda: len(front.gmanager.placement_map().get(rid, {}).get("blocks", {})) >= 2
                   and len(long.tokens) >= 1, 30, "the long request to span two ranks")
    held = front.gmanager.placement_map()[rid]["blocks"]
    home = front._homes[rid]
    picked = next((r for r in held if r not in (0, home)), home)
    route = front.gmanager.route_request
    if homes_on is not None:  # the test decides where the short requests live
        front.gmanager.route_request = lambda blocks, chain=None, pinned=None: Routed(picked)
    try:
        streams = [long] + [Stream(front, p, PARAMS) for p in prompts[1:]]
        await wait_for(lambda: all(len(s.tokens) >= 2 for s in streams), 30, "every stream to produce tokens")
    finally:
        front.gmanager.route_request = route
    return streams, home, picked


def holds_blocks_of(front, rid: str, rank: int) -> bool:
    return rank in front.gmanager.placement_map().get(rid, {}).get("blocks", {})


async def test_a_dead_rank_costs_recomputation_not_requests(case):
    ckpt, prompts, reference = case
    async with InProcessCluster(config(ckpt), 3, timeout_s=10.0) as cl:
        front = cl.front
        # The victim holds some of the long request's KV (as its creditor, or as its home) and is
        # home to the short requests.
        streams, home_of_long, victim = await streams_with_a_spanning_request(front, prompts, homes_on=True)
        assert victim != 0
        # Every short request was routed there; the ones still running when it dies are homed there
        # (a fast step can finish a short one before the kill: it needs no move then).
        assert all(front._homes.get(s.req.request_id, victim) == victim for s in streams[1:])
        homed_there = [s for s in streams if front._homes.get(s.req.request_id) == victim]
        creditor_died = victim != home_of_long and holds_blocks_of(front, streams[0].req.request_id, victim)
        print(f"\nlong request: home {home_of_long}; killing rank {victim} (its creditor: {creditor_died}), "
              f"home to {len(homed_there)} requests")
        cl.kill(victim)
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 60)
        for s, ref in zip(streams, reference):
            assert s.error is None, s.error
            assert s.tokens == ref  # greedy output as on one undisturbed instance
        health = front.health()
        assert health["status"] == "degraded" and [x["rank"] for x in health["lost"]] == [victim]
        assert sorted(st["rank"] for st in front.stats()) == sorted({0, 1, 2} - {victim})  # no stale stats
        assert homed_there and front.moved >= len(homed_there)
        if creditor_died:
            assert sum(st["recomputed"] for st in front.stats()) >= 1  # the long request, at its home
        assert all(victim not in (d["debtor"], d["creditor"]) for d in front.gmanager.debts())
        await wait_for(lambda: _idle(cl), 10, "the survivors to be idle")
        assert_nothing_held(cl)
        # Untouched by the loss, the cluster keeps serving (and a new request never goes to the dead rank).
        again = Stream(front, prompts[2], PARAMS)
        await asyncio.wait_for(again.task, 30)
        assert again.tokens == reference[2] and front.gmanager.route(1) != victim


async def test_a_silent_rank_is_declared_dead_within_the_bound(case):
    ckpt = case[0]
    async with InProcessCluster(config(ckpt), 2, timeout_s=10.0) as cl:
        sup = cl.front.supervisor
        await asyncio.sleep(0.3)
        cl.kill(1)  # no call is in flight: only the missing heartbeats can tell
        took = await wait_for(lambda: 1 not in sup.members(), DETECTION_BOUND_S + 3, "rank 1 to be declared dead")
        assert took <= DETECTION_BOUND_S + 0.5, took
        assert "no heartbeat" in sup.health()["lost"][0]["reason"]
        print(f"\ndetection of a silent rank: {took:.2f} s (bound {DETECTION_BOUND_S:.1f} s)")


async def test_a_request_no_survivor_can_hold_ends_with_a_clear_error(case):
    ckpt, prompts, reference = case
    async with InProcessCluster(config(ckpt), 2, timeout_s=10.0) as cl:
        front = cl.front
        # 23 blocks: rank 0's 12 plus 11 borrowed from rank 1 (capacity 12 + 11). Without rank 1: 12.
        big = Stream(front, prompts[0], LONG_PARAMS)
        small = Stream(front, prompts[1], PARAMS)
        await wait_for(lambda: len(big.tokens) >= 2 and len(small.tokens) >= 2, 30, "both requests to run")
        cl.kill(1)
        await asyncio.wait_for(asyncio.gather(big.task, small.task), 60)
        assert big.error is not None and big.error.reason == "rank_lost", big.error
        assert "cannot be recomputed" in str(big.error) and "23 KV blocks" in str(big.error)
        assert small.error is None and small.tokens == reference[1]
        await wait_for(lambda: _idle(cl), 10, "rank 0 to be idle")
        assert_nothing_held(cl)
        with pytest.raises(ValueError, match="at most 12 blocks"):
            front.make_request(prompts[0], LONG_PARAMS)  # new requests are judged on what is left


async def test_a_leaving_rank_drains_and_a_new_rank_joins(case):
    ckpt, prompts, reference = case
    async with InProcessCluster(config(ckpt), 3, timeout_s=10.0) as cl:
        front = cl.front
        streams, _, leaver = await streams_with_a_spanning_request(front, prompts)
        inst = cl.instances[leaver]
        code = await asyncio.wait_for(leave(inst, inst.transport, "test"), 30)
        assert code == 0
        assert inst.rm.walk() == {"table_blocks": 0, "lent_entries": 0} and inst.rm.num_lent == 0
        cl.kill(leaver)  # the process exits after leaving
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 60)
        for s, ref in zip(streams, reference):
            assert s.error is None and s.tokens == ref
        h = front.health()
        assert h["status"] == "ok" and h["target"] == 2 and "lost" not in h  # a leave is not a loss
        # A new instance joins and takes requests.
        new = await cl.add_rank()
        assert new in front.supervisor.members() and front.health()["instances"] == 3
        await wait_for(lambda: new in front.gmanager.instances, 5, "the new rank's first heartbeat")
        more = [Stream(front, p, PARAMS) for p in prompts[1:]]
        await asyncio.wait_for(asyncio.gather(*(s.task for s in more)), 60)
        assert [s.tokens for s in more] == reference[1:]
        assert cl.instances[new].counters.steps > 0  # it served some of them
        await wait_for(lambda: _idle(cl), 10, "idle")
        assert_nothing_held(cl)


def live(cl: InProcessCluster) -> list:
    return [inst for inst in cl.instances if not inst.stopping]


def _idle(cl: InProcessCluster) -> bool:
    for inst in live(cl):
        s = inst.stats()
        if s.num_running or s.num_waiting or s.table_blocks or s.lent_entries:
            return False
    return True


def assert_nothing_held(cl: InProcessCluster) -> None:
    """On every live rank: the free list is the whole pool, no table, nothing lent (walked)."""
    for inst in live(cl):
        rm = inst.rm
        assert rm.walk() == {"table_blocks": 0, "lent_entries": 0}, (inst.rank, rm.tables, rm.lent)
        assert rm.pool.num_free == rm.num_blocks and rm.num_borrowed == 0 and rm.num_lent == 0, inst.rank


# A JSON schema whose output is long (about a hundred tokens): the kill lands mid-output.
LIST_SCHEMA = {"type": "object", "properties": {"values": {"type": "array", "minItems": 30, "maxItems": 30,
                                                           "items": {"type": "integer", "minimum": 100, "maximum": 999}}},
               "required": ["values"], "additionalProperties": False}


async def test_structured_output_goes_on_with_its_grammar_after_its_home_dies():
    """The new home's matcher is advanced over the tokens already generated, so the grammar goes on
    from the middle of the output: the final text parses, validates against the schema, and is the
    undisturbed run's (greedy). A matcher started afresh would open a second JSON object mid-output."""
    import json

    import jsonschema

    from infinite import LLM

    params = SamplingParams(temperature=0.0, max_tokens=400, structured_outputs={"json": LIST_SCHEMA})
    prompt = "Thirty numbers:"
    want = LLM(dtype="float32", num_kv_blocks=64).generate([prompt], params, use_tqdm=False)[0].outputs[0]
    jsonschema.validate(json.loads(want.text), LIST_SCHEMA)
    cfg = EngineConfig(dtype="float32", num_kv_blocks=64, threads_per_rank=1, placement_interval_s=60.0)
    async with InProcessCluster(cfg, 3, timeout_s=10.0) as cl:
        front = cl.front
        route = front.gmanager.route_request
        front.gmanager.route_request = lambda blocks, chain=None, pinned=None: Routed(1)  # a home that can be killed
        try:
            s = Stream(front, prompt, params)
            await wait_for(lambda: len(s.tokens) >= 2, 30, "the structured request to produce tokens")
        finally:
            front.gmanager.route_request = route
        assert len(s.tokens) < len(want.token_ids), "the output ended before its home could be killed"
        cl.kill(1)
        await asyncio.wait_for(s.task, 60)
        assert s.error is None, s.error
        assert front.moved >= 1
        assert s.tokens == want.token_ids
        assert s.text == want.text
        jsonschema.validate(json.loads(s.text), LIST_SCHEMA)
