"""LocalCluster: N ranks on this machine behind the synchronous engine surface
that LLM uses (make_request / submit / step / abort_request / stats).

The calling process is not a rank: it spawns ranks 0..N-1 (free port picked
automatically) and talks to rank 0 over a pipe; rank 0's DriverBridge turns
pipe messages into front-door calls. Ranks watch this process and exit if it
dies, so no orphans are left behind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from infinite.errors import RequestError
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams

log = logging.getLogger(__name__)


def _terminate(procs: list, conn: Any) -> None:
    try:
        conn.send(("stop",))
    except Exception:  # noqa: BLE001 - rank 0 already gone
        pass
    stop_ranks(procs)
    try:
        conn.close()
    except Exception:  # noqa: BLE001
        pass


def spawn_ranks(config: EngineConfig, ranks: range, world_size: int, port: int, **rank0_kwargs: Any) -> list:
    """Start rank processes on this machine (spawn, daemonic, watching this process)."""
    from infinite.cluster.rank import run_rank

    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # tensorpipe's EOF chatter at shutdown
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = []
    for r in ranks:
        kwargs = dict(master_addr="127.0.0.1", master_port=port, role="worker", num_threads=threads,
                      watch_parent=True)
        if r == 0:
            kwargs.update(rank0_kwargs)
        procs.append(ctx.Process(target=run_rank, name=f"infinite-rank{r}", daemon=True,
                                 args=(r, world_size, config), kwargs=kwargs))
    for p in procs:
        p.start()
    return procs


def stop_ranks(procs: list, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


class LocalCluster:
    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0) -> None:
        from infinite.cluster.rpc import free_port
        from infinite.runtime.engine import resolve_model_dir
        from infinite.tokenizer import load_tokenizer

        self.config = config
        n = config.num_instances
        self.model_dir = resolve_model_dir(config.model)  # the default model is generated once, here
        config = EngineConfig(**{**config.__dict__, "model": self.model_dir})
        self._conn, child = mp.get_context("spawn").Pipe()
        self.procs = spawn_ranks(config, range(n), n, free_port(), role="driver", driver_conn=child)
        self._finalizer = weakref.finalize(self, _terminate, self.procs, self._conn)
        child.close()
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._outbox: deque[RequestOutput] = deque()
        self._replies: dict[int, tuple] = {}
        self._unfinished: set[str] = set()
        self._lock = threading.Lock()
        info = self._wait_reply(None, timeout=start_timeout_s, kind="ready")
        self.model_name: str = config.served_model_name or info["model_name"]
        self.max_model_len: int = info["max_model_len"]
        self.capacity_tokens: int = info["capacity_tokens"]
        self.tokenizer = load_tokenizer(self.model_dir)
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_aborted": 0}

    # ---- the pipe ----------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._lock:
            self._conn.send(msg)

    def _pump(self, timeout: float) -> bool:
        """Read one message (waiting at most timeout); False if none came."""
        if not self._conn.poll(timeout):
            dead = [p for p in self.procs if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode}")
            return False
        msg = self._conn.recv()
        kind = msg[0]
        if kind == "out":
            out: RequestOutput = msg[1]
            self._unfinished.discard(out.request_id)
            self.counters["generation_tokens"] += len(out.outputs[0].token_ids)
            self.counters["requests_finished"] += 1
            self._outbox.append(out)
        elif kind == "failed":
            self._unfinished.discard(msg[1])
            raise RuntimeError(f"request {msg[1]} failed: {msg[2]}")
        elif kind == "ready":
            self._replies[-1] = msg
        else:  # replies carry their sequence number
            self._replies[msg[1]] = msg
        return True

    def _wait_reply(self, seq: int | None, timeout: float = 120.0, kind: str | None = None) -> Any:
        key = -1 if seq is None else seq
        deadline = time.monotonic() + timeout
        while key not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not answer in {timeout:.0f} s")
            self._pump(0.5)
        msg = self._replies.pop(key)
        if msg[0] == "error":
            exc = {"ValueError": ValueError, "TypeError": TypeError}.get(msg[2], RuntimeError)
            raise exc(msg[3])
        return msg[1] if kind == "ready" else msg[2]

    # ---- the engine surface LLM uses ------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        rid = request_id or f"req-{next(self._ids)}"
        seq = next(self._seq)
        self._send(("make", seq, prompt, params, rid))
        rid, ids, max_tokens, text = self._wait_reply(seq)
        return Request(rid, ids, params, max_tokens=max_tokens, prompt=text)

    def submit(self, req: Request) -> str:
        self._send(("add", req.request_id))
        self._unfinished.add(req.request_id)
        self.counters["prompt_tokens"] += req.num_prompt_tokens
        return req.request_id

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished) or bool(self._outbox)

    def step(self) -> list[RequestOutput]:
        """Finished outputs as they arrive (blocks briefly when none is ready)."""
        if not self._outbox:
            self._pump(0.5)
        outs = list(self._outbox)
        self._outbox.clear()
        return outs

    def abort_request(self, request_id: str) -> None:
        if request_id in self._unfinished:
            self._unfinished.discard(request_id)
            self.counters["requests_aborted"] += 1
            self._send(("abort", request_id))

    def stats(self) -> list[dict]:
        seq = next(self._seq)
        self._send(("stats", seq))
        return self._wait_reply(seq)

    def cluster_status(self) -> dict:
        seq = next(self._seq)
        self._send(("status", seq))
        return self._wait_reply(seq)

    def migrate(self, request_id: str, num_blocks: int, dst: int) -> None:
        """Ask the request's home to move its oldest num_blocks local blocks to dst (move_kvcache)."""
        self._send(("move", request_id, num_blocks, dst))

    def shutdown(self) -> None:
        self._finalizer()


class DriverBridge:
    """Rank 0's end of the pipe: messages from LocalCluster become front-door calls."""

    def __init__(self, front, conn) -> None:
        self.front = front
        self.conn = conn
        self.pending: dict[str, Request] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._send_lock = threading.Lock()

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()

        def reader() -> None:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    loop.call_soon_threadsafe(self.front.request_stop)
                    return
                loop.call_soon_threadsafe(self.handle, msg)
                if msg[0] == "stop":
                    return

        threading.Thread(target=reader, name="driver-bridge", daemon=True).start()
        e = self.front.engine
        self.send(("ready", {"model_name": e.model_name, "max_model_len": e.max_model_len,
                             "capacity_tokens": e.capacity_tokens}))
        await self.front.stop_event.wait()
        for t in self.tasks.values():
            t.cancel()

    def handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "make":
            _, seq, prompt, params, rid = msg
            try:
                req = self.front.make_request(prompt, params, rid)
            except (ValueError, TypeError) as err:
                self.send(("error", seq, type(err).__name__, str(err)))
                return
            self.pending[rid] = req
            self.send(("made", seq, (rid, req.prompt_token_ids, req.max_tokens, req.prompt)))
        elif kind == "add":
            req = self.pending.pop(msg[1])
            self.tasks[req.request_id] = asyncio.ensure_future(self._drive(req))
        elif kind == "abort":
            t = self.tasks.pop(msg[1], None)
            if t is not None:
                t.cancel()
        elif kind == "stats":
            asyncio.ensure_future(self._reply(msg[1], self.front.fresh_stats()))
        elif kind == "status":
            async def status() -> dict:
                return {**self.front.cluster_status(), "instances": await self.front.fresh_stats()}

            asyncio.ensure_future(self._reply(msg[1], status()))
        elif kind == "move":
            self.front.migrate(*msg[1:])
        elif kind == "stop":
            self.front.request_stop()

    async def _reply(self, seq: int, coro) -> None:
        try:
            self.send(("reply", seq, await coro))
        except Exception as err:  # noqa: BLE001
            self.send(("error", seq, "RuntimeError", str(err)))

    async def _drive(self, req: Request) -> None:
        try:
            async for out in self.front.generate(req):
                if out.finished:
                    self.send(("out", out))
        except asyncio.CancelledError:
            pass
        except Exception as err:  # noqa: BLE001 - the driver must hear of every request's end
            if not isinstance(err, RequestError):
                log.exception("request %s failed", req.request_id)
            self.send(("failed", req.request_id, str(err)))
        finally:
            self.tasks.pop(req.request_id, None)
