"""ClusterEngine: the cluster seen from rank 0's front-end.

It has the surface of AsyncLLMEngine (generate / abort / stats / tokenizer …)
so the HTTP server does not care whether N is 1 or 32: it validates a
request against the whole cluster's capacity, asks the gManager for a home,
ships the request there, and streams back the outputs that the home sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from infinite.cluster import rpc
from infinite.errors import RequestError
from infinite.cluster.gmanager import GManager
from infinite.cluster.instance import Instance
from infinite.kv.rmanager import blocks_for
from infinite.outputs import RequestOutput
from infinite.runtime.request import Request
from infinite.runtime.surface import EngineFacts
from infinite.sampling.params import SamplingParams

log = logging.getLogger(__name__)

STAT_KEYS = ("rank", "total_blocks", "free_blocks", "used_blocks", "lent_blocks", "borrowed_blocks",
             "num_running", "num_waiting", "step_time_ms", "num_preemptions", "tokens_held",
             "remote_calls", "remote_wait_ms", "remote_step_ms", "remote_compute_ms", "served_calls", "served_ms",
             "migrations", "migrated_blocks")


class ClusterEngine(EngineFacts):
    def __init__(self, instance: Instance, world_size: int) -> None:
        self.instance = instance
        self.engine = self.core = instance.engine  # rank 0's engine: tokenizer and validation
        self.world_size = world_size
        cfg = instance.config
        e = self.engine
        lending = cfg.enable_lending and world_size > 1
        self.gmanager = GManager(world_size, e.block_size, e.model_config.num_layers,
                                 cfg.max_lend_fraction, lending, cfg.placement_interval_s)
        lend = self.gmanager.pcfg.lend_cap(e.rm.num_blocks) if lending else 0
        # Every rank runs the same config, so the same pool: a request can hold its home's
        # pool plus what every other instance may lend.
        e.cluster_capacity_blocks = e.rm.num_blocks + (world_size - 1) * lend
        self._queues: dict[str, asyncio.Queue] = {}
        self._last: dict[str, int] = {}
        self._homes: dict[str, int] = {}
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_aborted": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self._stopping = False

    def bind(self, loop: asyncio.AbstractEventLoop, stop_event: asyncio.Event | None = None) -> None:
        self._loop = loop
        self.stop_event = stop_event or asyncio.Event()

    # ---- what the front-end reads (tokenizer, model_name, ... from EngineFacts) ----------
    @property
    def is_running(self) -> bool:
        return not self._stopping

    def stats(self) -> list[dict]:
        """One record per instance, as its last heartbeat carried it."""
        inst = self.gmanager.instances
        own = self.instance.stats()
        out = []
        for r in range(self.world_size):
            s = own if r == self.instance.rank else inst.get(r)
            if s is not None:
                out.append({k: s[k] for k in STAT_KEYS if k in s})
        return out

    async def fresh_stats(self) -> list[dict]:
        """Ask every rank now (LLM.stats() wants exact numbers after a batch)."""
        loop = asyncio.get_running_loop()
        res = await asyncio.gather(*(rpc.to_asyncio(rpc.call_async(r, rpc.h_stats), loop)
                                     for r in range(self.world_size)))
        return [{k: s[k] for k in STAT_KEYS if k in s} for s in res]

    def cluster_status(self) -> dict:
        return {"instances": self.stats(), "debts": self.gmanager.debts(),
                "moves_issued": self.gmanager.moves_issued, "requests": self.gmanager.placement_map()}

    # ---- requests ------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if request_id is not None and request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.engine.make_request(prompt, params, request_id)

    async def generate(
        self, prompt: str | list[int] | Request, params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._stopping:
            raise RequestError("the cluster is shutting down", "shutdown")
        req = prompt if isinstance(prompt, Request) else self.make_request(prompt, params or SamplingParams(), request_id)
        rid = req.request_id
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._last[rid] = -1
        home = self.gmanager.route(blocks_for(req.num_tokens + 1, self.engine.block_size))
        self._homes[rid] = home
        self.counters["prompt_tokens"] += req.num_prompt_tokens
        finished = False
        try:
            spec = (rid, req.prompt_token_ids, req.params, req.max_tokens, req.prompt)
            await rpc.to_asyncio(rpc.call_async(home, rpc.h_add_request, spec), loop)
            while True:
                out = await q.get()
                if "error" in out.extra:
                    finished = True
                    raise RequestError(out.extra["error"], out.extra.get("error_reason", "internal"))
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self._last.pop(rid, None)
            self._homes.pop(rid, None)
            if not finished:
                self.counters["requests_aborted"] += 1
                rpc.call_async(home, rpc.h_abort, rid)

    async def abort(self, request_id: str) -> None:
        home = self._homes.get(request_id)
        if home is not None:
            rpc.call_async(home, rpc.h_abort, request_id)

    def migrate(self, request_id: str, num_blocks: int, dst: int) -> bool:
        """move_kvcache on demand (the placement loop issues the same call)."""
        home = self._homes.get(request_id)
        if home is None or home == dst:
            return False
        rpc.call_async(home, rpc.h_move, request_id, num_blocks, dst)
        return True

    def home_of(self, request_id: str) -> int | None:
        return self._homes.get(request_id)

    def on_outputs(self, rank: int, outs: list[RequestOutput]) -> None:
        """RPC thread: hand the outputs to the loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outs)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        # Outputs are cumulative; RPCs may arrive out of order, so keep only newer ones.
        for out in outs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            n = len(out.outputs[0].token_ids)
            last = self._last[out.request_id]
            if n < last or (n == last and not out.finished):
                continue
            self.counters["generation_tokens"] += max(0, n - max(last, 0))
            self._last[out.request_id] = n
            if out.finished:
                self.counters["requests_finished"] += 1
            q.put_nowait(out)

    # ---- lifecycle -------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Any rank (or a signal) asked the cluster to stop."""
        if self._loop is not None and self.stop_event is not None:
            self._loop.call_soon_threadsafe(self.stop_event.set)

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for r in range(self.world_size):
            if r != self.instance.rank:
                try:
                    rpc.call_async(r, rpc.h_stop)
                except Exception:  # noqa: BLE001 - that rank is gone already
                    pass
        self.instance.request_stop()
        if self.stop_event is not None:
            self.stop_event.set()
