"""ClusterEngine: the cluster seen from rank 0's front-end.

It is an EngineFacts like AsyncLLMEngine, so the HTTP server does not care
whether N is 1 or 32: it validates a request against the whole cluster's
capacity (rank 0's engine, whose allocator knows the LendingPolicy), asks the
gManager for a home, ships the request there, and streams back the outputs
that the home sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import msgspec

from infinite.cluster import messages as M
from infinite.cluster.cost_probe import measure_cost
from infinite.cluster.gmanager import GManager
from infinite.cluster.instance import Instance
from infinite.cluster.transport import Transport, to_asyncio
from infinite.errors import RequestError
from infinite.kv.rmanager import blocks_for
from infinite.outputs import RequestOutput
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
        prior = measure_cost(e.model, e.block_size, e.kv.k.dtype, e.device) if instance.policy.enabled else None
        self.gmanager = GManager(transport, e.block_size, e.model_config.num_layers, instance.policy,
                                 instance.config.placement_interval_s, prior=prior)
        self._queues: dict[str, asyncio.Queue] = {}
        self._last: dict[str, int] = {}
        self._homes: dict[str, int] = {}
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
        """One record per instance, as its last heartbeat carried it (rank 0's own: now)."""
        out = []
        for r in range(self.world_size):
            s = self.instance.stats() if r == self.instance.rank else self.gmanager.instances.get(r)
            if s is not None:
                out.append(msgspec.structs.asdict(s))
        return out

    async def fresh_stats(self) -> list[dict]:
        """Ask every rank now (LLM.stats() wants exact numbers after a batch)."""
        loop = asyncio.get_running_loop()
        res = await asyncio.gather(*(to_asyncio(self.transport.stats(r), loop) for r in range(self.world_size)))
        return [msgspec.structs.asdict(s) for s in res]

    def cluster_status(self) -> dict:
        return {"instances": self.stats(), "debts": self.gmanager.debts(),
                "moves_issued": self.gmanager.moves_issued, "loans_refused": self.gmanager.loans_refused,
                "requests": self.gmanager.placement_map()}

    # ---- requests ------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        if request_id is not None and request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.core.make_request(prompt, params, request_id)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        if self._stopping:
            raise RequestError("the cluster is shutting down", "shutdown")
        rid = req.request_id
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._last[rid] = -1
        home = self.gmanager.route(blocks_for(req.num_tokens + 1, self.core.block_size))
        self._homes[rid] = home
        finished = False
        try:
            msg = M.AddRequest(rid, req.prompt_token_ids, req.params, req.max_tokens, req.prompt)
            await to_asyncio(self.transport.add_request(home, msg), loop)
            while True:
                out = await q.get()
                if isinstance(out, RequestError):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            self._last.pop(rid, None)
            self._homes.pop(rid, None)
            if not finished:
                self.transport.abort(home, rid)

    async def abort(self, request_id: str) -> None:
        home = self._homes.get(request_id)
        if home is not None:
            self.transport.abort(home, request_id)

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
        for f in msg.failures:
            q = self._queues.get(f.request_id)
            if q is not None:
                q.put_nowait(RequestError(f.message, f.reason))
        # Outputs are cumulative; messages may arrive out of order, so keep only newer ones.
        for out in msg.outputs:
            q = self._queues.get(out.request_id)
            if q is None:
                continue
            n = len(out.outputs[0].token_ids)
            last = self._last[out.request_id]
            if n < last or (n == last and not out.finished):
                continue
            self._last[out.request_id] = n
            out.extra["rank"] = msg.rank
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
                    self.transport.stop(r)
                except Exception:  # noqa: BLE001 - that rank is gone already
                    pass
        self.instance.request_stop()
        if self.stop_event is not None:
            self.stop_event.set()
