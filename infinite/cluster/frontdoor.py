"""ClusterEngine: the cluster seen from rank 0's front-end.

It is an EngineFacts like AsyncLLMEngine, so the HTTP server does not care
whether N is 1 or 32: it validates a request against the whole cluster's
capacity (rank 0's engine, whose allocator knows the LendingPolicy), asks the
gManager for a home, ships the request there, and streams back the outputs
that the home sends.

It keeps each request and its newest cumulative output, so when the home dies
or leaves (the supervisor says so) the request moves to a survivor with what
it generated so far and the stream goes on; outputs from a rank that is no
longer the request's home are dropped, so nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

import msgspec

from infinite.cluster import messages as M
from infinite.cluster import recovery
from infinite.cluster.gmanager import GManager
from infinite.cluster.instance import Instance
from infinite.cluster.membership import PING_S
from infinite.cluster.prefix_routing import Routed
from infinite.cluster.sp_chunk import check_group, layout_message
from infinite.cluster.sp_policy import ExchangeShape
from infinite.cluster.sp_route import group_policy
from infinite.cluster.supervisor import Supervisor
from infinite.cluster.tp_commands import measure_group_cost
from infinite.cluster.transport import PeerError, Transport, to_asyncio
from infinite.errors import RequestError
from infinite.kv.prefix import anchors
from infinite.kv.rmanager import blocks_for
from infinite.outputs import OutputAccumulator, RequestOutput
from infinite.runtime.allocator import max_hit_blocks
from infinite.runtime.request import Request
from infinite.runtime.surface import EngineFacts
from infinite.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class ClusterEngine(EngineFacts):
    def __init__(self, instance: Instance, transport: Transport) -> None:
        self.instance = instance
        self.transport = transport
        self.core = instance.engine  # rank 0's engine: tokenizer, validation, capacity
        self.world_size = transport.world_size
        e = self.core
        prior = measure_group_cost(e) if instance.policy.enabled else None
        self.gmanager = GManager(transport, e.block_size, e.model_config.num_layers, instance.policy,
                                 instance.config.placement_interval_s, prior=prior)
        self.groups = group_policy(instance.config)
        c = e.model_config
        self.group_shape = ExchangeShape.of(c.num_heads, c.num_kv_heads, c.head_dim, e.kv.k.element_size())
        self.supervisor = Supervisor(transport, self.gmanager, range(self.world_size), instance.apply_view,
                                     self._on_rank_gone)
        self._queues: dict[str, asyncio.Queue] = {}
        self._homes: dict[str, int] = {}
        self._reqs: dict[str, Request] = {}
        # Each request's output so far, assembled from its homes' deltas: what its stream reads and
        # where a move resumes from.
        self._sofar: dict[str, OutputAccumulator] = {}
        self.moved = 0  # requests moved to a survivor (their home died or left)
        self.failed_moves = 0  # requests no survivor could hold (ended with rank_lost)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self._stopping = False

    def bind(self, loop: asyncio.AbstractEventLoop, stop_event: asyncio.Event | None = None) -> None:
        self._loop = loop
        self.stop_event = stop_event or asyncio.Event()
        self.supervisor.bind(loop)

    # ---- what the front-end reads (tokenizer, model_name, ... from EngineFacts) ----------
    @property
    def is_running(self) -> bool:
        return not self._stopping

    def stats(self) -> list[dict]:
        """One record per member, as its last heartbeat carried it (rank 0's own: now); a rank
        that is gone is not shown with stale numbers."""
        out = []
        for r in self.supervisor.members():
            s = self.instance.stats() if r == self.instance.rank else self.gmanager.instances.get(r)
            if s is not None:
                out.append(stats_dict(s))
        return out

    async def fresh_stats(self) -> list[dict]:
        """Ask every member now (LLM.stats() wants exact numbers after a batch); a member that does
        not answer (dying as we ask) is left out, not an error."""
        loop = asyncio.get_running_loop()
        ranks = self.supervisor.members()
        res = await asyncio.gather(*(to_asyncio(self.transport.stats(r, timeout=PING_S * 5), loop) for r in ranks),
                                   return_exceptions=True)
        return [stats_dict(s) for s in res if not isinstance(s, BaseException)]

    def health(self) -> dict:
        return self.supervisor.health()

    def cluster_status(self) -> dict:
        gm = self.gmanager
        return {"instances": self.stats(), "debts": self.gmanager.debts(),
                "moves_issued": self.gmanager.moves_issued, "loans_refused": self.gmanager.loans_refused,
                "requests": self.gmanager.placement_map(), "health": self.health(),
                "cost_model": {**dataclasses.asdict(self.gmanager.cost), "calibrated": self.gmanager.calibrated,
                               "probe_s": list(self.gmanager.probe_s),
                               "samples": {"local": len(gm.calib.local), "remote": len(gm.calib.remote)}},
                "placement": {"rounds": gm.rounds, "worker": gm.planner.in_process,
                              "recent": [dataclasses.asdict(r) for r in list(gm.recent_rounds)[-8:]]},
                "recovery": {"moved": self.moved, "failed": self.failed_moves,
                             "recomputed_at_home": sum(s.get("recomputed", 0) for s in self.stats())}}

    async def remove_instance(self, rank: int) -> dict:
        return await self.supervisor.drain(rank)

    # ---- requests ------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if request_id is not None and request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.core.make_request(prompt, params, request_id)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        if self._stopping:
            raise RequestError("the cluster is shutting down", "shutdown")
        rid = req.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._sofar[rid] = OutputAccumulator()
        self._reqs[rid] = req
        finished = False
        try:
            pin = req.data_parallel_rank
            lay = req.prefill_layout
            if lay is not None:
                try:
                    check_group(lay, req.num_prompt_tokens, self.core.block_size, self.supervisor.view().serving)
                except ValueError as e:
                    raise RequestError(str(e), "invalid") from e
                pin = lay.members[0]
            elif pin is None and self.groups.enabled and req.num_prompt_tokens >= self.groups.min_prompt_tokens:
                plan = self.gmanager.choose_group(rid, req.num_prompt_tokens, self.groups, self.group_shape,
                                                  self.instance.config.max_num_batched_tokens)
                if plan is not None:
                    req.prefill_layout = plan.layout
                    pin = plan.home
            if pin is not None and pin not in self.supervisor.view().serving:
                raise RequestError(f"data_parallel_rank {pin} is not a serving instance "
                                   f"(serving: {sorted(self.supervisor.view().serving)})", "invalid")
            chain = await self._prefix_chain(req)
            routed = self.gmanager.route_request(blocks_for(req.num_tokens + 1, self.core.block_size), chain, pin)
            self._send_home(rid, routed.home, routed)
            while True:
                out = await q.get()
                if isinstance(out, RequestError):
                    finished = True
                    raise out
                finished = out.finished
                if req.prefill_layout is not None:  # its prefill is over: the members may join other groups
                    self.gmanager.group_ended(rid)
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self._reqs.pop(rid, None)
            self._sofar.pop(rid, None)
            self.gmanager.group_ended(rid)
            home = self._homes.pop(rid, None)
            if not finished and home is not None:
                self.transport.abort(home, rid).add_done_callback(_quiet)

    async def _prefix_chain(self, req: Request) -> list[tuple[int, int]] | None:
        """The anchors of the request's prompt (what the router compares with the instances'
        prefix caches); None with caching off. Hashing a very long prompt runs off the loop."""
        e = self.core
        n = max_hit_blocks(req, e.block_size)
        if not e.rm.caching or n == 0:
            return None
        if req.num_tokens <= 65536:
            return anchors(req.block_names(e.block_size, n)[:n])
        names = await asyncio.get_running_loop().run_in_executor(None, req.block_names, e.block_size, n)
        return anchors(names[:n])

    def _send_home(self, rid: str, home: int, routed: Routed | None = None) -> None:
        """Ship the request (with what it generated so far, if it moves) to ``home``, with the
        router's hint when its prefix is cached elsewhere. A home that cannot be reached is
        checked by the supervisor; if it is dead the request moves on."""
        self._homes[rid] = home
        msg = recovery.resume_message(self._reqs[rid], self._sofar.get(rid))
        if routed is not None and routed.holder >= 0:
            msg = msgspec.structs.replace(msg, prefix_holder=routed.holder, prefix_blocks=routed.holder_blocks)
        lay = self._reqs[rid].prefill_layout
        if routed is not None and lay is not None:  # the first send only: a moved request is recomputed alone
            msg = msgspec.structs.replace(msg, group=layout_message(lay))
        fut = self.transport.add_request(home, msg)

        def done(f) -> None:
            try:
                f.value()
            except Exception as e:  # noqa: BLE001
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._unreachable, rid, home, e)

        fut.add_done_callback(done)

    def _unreachable(self, rid: str, home: int, err: BaseException) -> None:
        q = self._queues.get(rid)
        if q is None or self._homes.get(rid) != home:
            return
        if isinstance(err, PeerError):
            q.put_nowait(RequestError(f"rank {home} refused request {rid}: {err}", err.reason
                                      if err.reason in ("invalid", "capacity") else "internal"))
            return
        log.warning("sending %s to rank %d failed (%s): checking that rank", rid, home, err)
        self.supervisor.suspect_async(home, err)  # if it is dead, _on_rank_gone moves the request

    def _on_rank_gone(self, rank: int, lost: bool) -> None:
        """Loop thread: ``rank`` died (lost) or is leaving; move every request it was home to."""
        for rid in recovery.homed_on(self._homes, rank):
            if not lost:
                self.transport.abort(rank, rid).add_done_callback(_quiet)
            self._move(rid, rank, lost)

    def _move(self, rid: str, gone: int, lost: bool) -> None:
        q = self._queues.get(rid)
        req = self._reqs.get(rid)
        if q is None or req is None:
            return
        e = self.core
        serving = self.supervisor.view().serving
        cap = recovery.capacity_blocks(self.instance.policy, e.rm.num_blocks, len(serving) - 1) if serving else 0
        if not serving or not recovery.fits(cap, req.num_prompt_tokens, req.max_tokens, e.block_size):
            need = recovery.blocks_needed(req.num_prompt_tokens, req.max_tokens, e.block_size)
            self.failed_moves += 1
            self._homes.pop(rid, None)
            q.put_nowait(RequestError(recovery.no_room_message(rid, need, cap, [gone]), "rank_lost"))
            return
        done = len(self._sofar[rid].token_ids) if rid in self._sofar else 0
        home = self.gmanager.route(blocks_for(req.num_prompt_tokens + done + 1, e.block_size))
        self.moved += 1
        log.warning("request %s: rank %d %s; recomputing it on rank %d from %d prompt + %d generated tokens", rid,
                    gone, "is lost" if lost else "is leaving", home, req.num_prompt_tokens, done)
        self._send_home(rid, home)

    async def abort(self, request_id: str) -> None:
        home = self._homes.get(request_id)
        if home is not None:
            self.transport.abort(home, request_id).add_done_callback(_quiet)

    def migrate(self, request_id: str, num_blocks: int, dst: int) -> bool:
        """move_kvcache on demand (the placement loop issues the same call)."""
        home = self._homes.get(request_id)
        if home is None or home == dst:
            return False
        self.transport.move(home, M.MoveKV(request_id, num_blocks, dst))
        return True

    def on_outputs(self, msg: M.Outputs) -> None:
        """Transport thread: hand the outputs to the loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: M.Outputs) -> None:
        # Only the request's current home speaks for it: a rank it moved away from may still
        # have had outputs in flight.
        for f in msg.failures:
            q = self._queues.get(f.request_id)
            if q is not None and self._homes.get(f.request_id) == msg.rank:
                q.put_nowait(RequestError(f.message, f.reason))
        # Outputs are deltas; the accumulator puts them in order (messages may overtake each other).
        for out in msg.outputs:
            rid = out.request_id
            q = self._queues.get(rid)
            if q is None or self._homes.get(rid) != msg.rank:
                continue
            sofar = self._sofar[rid]
            kind = self._reqs[rid].output_kind
            for delta in sofar.add(out):
                delta.extra["rank"] = msg.rank
                if kind == "delta":
                    q.put_nowait(delta)
                elif kind == "cumulative" or delta.finished:
                    whole = sofar.cumulative()
                    req = self._reqs[rid]
                    whole.prompt, whole.prompt_token_ids = req.prompt, req.prompt_token_ids
                    whole.extra["rank"] = msg.rank
                    q.put_nowait(whole)

    # ---- lifecycle -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Any rank (or a signal) asked the cluster to stop."""
        if self._loop is not None and self.stop_event is not None:
            self._loop.call_soon_threadsafe(self.stop_event.set)

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for r in self.supervisor.members():
            if r != self.instance.rank:
                try:
                    self.transport.stop(r).add_done_callback(_quiet)
                except Exception:  # noqa: BLE001 - that rank is gone already
                    pass
        self.instance.request_stop()
        if self.stop_event is not None:
            self.stop_event.set()


def _quiet(fut) -> None:
    try:
        fut.value()
    except Exception:  # noqa: BLE001 - a rank that is gone already
        pass


def stats_dict(s: M.InstanceStats) -> dict:
    """An instance's stats as plain data (its prefill groups too)."""
    d = msgspec.structs.asdict(s)
    d["groups"] = [msgspec.structs.asdict(g) for g in s.groups]
    return d
