"""AsyncLLMEngine: the engine driven from an asyncio loop, for the HTTP front-end.

Steps run on one dedicated worker thread (torch releases the GIL inside ops),
so the event loop stays free to accept requests and stream tokens while a step
computes. Adds and aborts are queued and applied between steps on the loop
thread, so the scheduler is only ever touched by one thread at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from infinite.errors import RequestError
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.request import Request
from infinite.runtime.surface import EngineFacts
from infinite.sampling.params import SamplingParams

log = logging.getLogger(__name__)


def make_backend(config: EngineConfig):
    """The synchronous single-instance engine (a cluster is served by rank 0's ClusterEngine)."""
    if config.num_instances > 1:
        raise ValueError("AsyncLLMEngine runs one instance; a cluster's rank 0 serves with ClusterEngine "
                         "(infinite serve --num-instances N, or torchrun -m infinite.launch.serve)")
    from infinite.runtime.engine import LLMEngine

    return LLMEngine(config)


class AsyncLLMEngine(EngineFacts):
    def __init__(self, backend, executor: ThreadPoolExecutor) -> None:
        self.backend = self.core = backend
        self._executor = executor
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_add: list[Request] = []
        self._pending_abort: set[str] = set()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    @classmethod
    async def start(cls, config: EngineConfig) -> "AsyncLLMEngine":
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinite-step")
        backend = await asyncio.get_running_loop().run_in_executor(executor, make_backend, config)
        return cls(backend, executor)

    # ---- what the front-end reads (tokenizer, model_name, ... from EngineFacts) -----
    @property
    def is_running(self) -> bool:
        return not self._closed and self._error is None

    def stats(self) -> list[dict]:
        return self.backend.stats()

    def cluster_status(self) -> dict:
        """One instance: its stats, and no debts."""
        return {"instances": self.stats(), "debts": []}

    # ---- requests --------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate now (ValueError/TypeError with a message) so errors come before streaming."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        return self.backend.make_request(prompt, params, request_id)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise RequestError(f"the engine stopped: {self._error}", "engine_stopped")
        if self._closed:
            raise RequestError("the engine is shut down", "shutdown")
        rid = req.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._pending_add.append(req)
        self._wakeup.set()
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, RequestError):
                    raise out
                if isinstance(out, BaseException):
                    raise RequestError(f"the engine failed: {out}", "engine_stopped") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self._pending_abort.add(rid)
                self._wakeup.set()

    async def abort(self, request_id: str) -> None:
        self._pending_abort.add(request_id)
        self._wakeup.set()

    # ---- the step loop ------------------------------------------------------------------
    def _apply_pending(self) -> None:
        adds, self._pending_add = self._pending_add, []
        for req in adds:
            if req.request_id in self._pending_abort:
                self._pending_abort.discard(req.request_id)
                continue
            try:
                self.backend.submit(req)
            except Exception as e:  # noqa: BLE001 - reported to that request's stream
                q = self._queues.get(req.request_id)
                if q is not None:
                    q.put_nowait(RequestError(f"cannot add the request: {e}", "invalid"))
        aborts, self._pending_abort = self._pending_abort, set()
        for rid in aborts:
            self.backend.abort_request(rid)

    async def _run(self) -> None:
        """Steps back to back on the step thread; a step's outputs go to their streams while the
        next step computes (adds and aborts are applied between steps, on this thread)."""
        loop = asyncio.get_running_loop()
        outs: list[RequestOutput] = []
        try:
            while not self._closed:
                self._apply_pending()
                step = None
                if self.backend.has_unfinished_requests():
                    step = loop.run_in_executor(self._executor, self.backend.step)
                self._deliver(outs)
                if step is None:
                    outs = []
                    self._wakeup.clear()
                    if self._pending_add or self._pending_abort:
                        continue
                    await self._wakeup.wait()
                    continue
                outs = await step
                await asyncio.sleep(0)  # let streams flush between steps
        except Exception as e:  # the engine is broken: fail every open stream
            log.exception("engine step failed")
            self._error = e
            for q in self._queues.values():
                q.put_nowait(e)

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        try:
            await self._task
        finally:
            self._executor.shutdown(wait=False)
