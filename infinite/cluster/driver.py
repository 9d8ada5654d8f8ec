"""Rank 0's end of LocalCluster's driver connection: pipe messages become front-door calls.

The process that called ``LLM(num_instances=N)`` is not a rank; it listens on
a loopback socket (with an auth key), and rank 0 connects to it and runs
this bridge as its front-end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from multiprocessing.connection import Client, Connection

from infinite.cluster import messages as M
from infinite.cluster.frontdoor import ClusterEngine
from infinite.cluster.sp_chunk import layout_from_message
from infinite.errors import RequestError
from infinite.runtime.request import Request

log = logging.getLogger(__name__)


async def driver_front_end(address: tuple[str, int], authkey: bytes, ready: asyncio.Future, stop: asyncio.Event) -> int:
    """A rank-0 front-end (see infinite.cluster.rank.FrontEnd) serving LocalCluster's connection."""
    conn = Client(address, authkey=authkey)
    bridge = DriverBridge(conn)
    try:
        front = await ready
    except BaseException as e:  # the cluster did not come up: say why before exiting
        bridge.send(M.DriverError(-1, "RuntimeError", f"the cluster failed to start: {type(e).__name__}: {e}"))
        raise
    await bridge.run(front, stop)
    return 0


class DriverBridge:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.front: ClusterEngine | None = None
        self.pending: dict[str, Request] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._send_lock = threading.Lock()

    def send(self, msg: M.Msg) -> None:
        with self._send_lock:
            self.conn.send_bytes(M.encode(msg))

    async def run(self, front: ClusterEngine, stop: asyncio.Event) -> None:
        self.front = front
        loop = asyncio.get_running_loop()

        def reader() -> None:
            while True:
                try:
                    msg = M.decode(self.conn.recv_bytes())
                except (EOFError, OSError):
                    loop.call_soon_threadsafe(front.request_stop)
                    return
                loop.call_soon_threadsafe(self.handle, msg)
                if isinstance(msg, M.DriverStop):
                    return

        threading.Thread(target=reader, name="driver-bridge", daemon=True).start()
        e = front.core
        self.send(M.DriverReady(front.model_name, e.max_model_len, e.capacity_tokens))
        await stop.wait()
        for t in self.tasks.values():
            t.cancel()

    def handle(self, msg: M.Msg) -> None:
        front = self.front
        match msg:
            case M.DriverMake():
                try:
                    req = front.make_request(msg.prompt, msg.params, msg.request_id)
                except (ValueError, TypeError) as err:
                    self.send(M.DriverError(msg.seq, type(err).__name__, str(err)))
                    return
                self.pending[req.request_id] = req
                self.send(M.DriverMade(msg.seq, req.request_id, req.prompt_token_ids, req.max_tokens, req.prompt))
            case M.DriverAdd():
                req = self.pending.pop(msg.request_id)
                req.output_kind = "final_only"  # the offline LLM reads finished outputs only
                req.data_parallel_rank = None if msg.data_parallel_rank < 0 else msg.data_parallel_rank
                req.prefill_layout = None if msg.group is None else layout_from_message(msg.group)
                self.tasks[req.request_id] = asyncio.ensure_future(self._drive(req))
            case M.DriverAbort():
                t = self.tasks.pop(msg.request_id, None)
                if t is not None:
                    t.cancel()
            case M.DriverQuery():
                asyncio.ensure_future(self._reply(msg.seq, msg.what))
            case M.DriverMove():
                front.migrate(msg.request_id, msg.num_blocks, msg.dst)
            case M.DriverStop():
                front.request_stop()

    async def _reply(self, seq: int, what: str) -> None:
        try:
            stats = await self.front.fresh_stats()
            value = stats if what == "stats" else {**self.front.cluster_status(), "instances": stats}
            self.send(M.DriverReply(seq, value))
        except Exception as err:  # noqa: BLE001
            self.send(M.DriverError(seq, "RuntimeError", str(err)))

    async def _drive(self, req: Request) -> None:
        try:
            async for out in self.front.generate(req):
                if out.finished:
                    self.send(M.DriverOutput(out))
        except asyncio.CancelledError:
            pass
        except Exception as err:  # noqa: BLE001 - the driver must hear of every request's end
            if not isinstance(err, RequestError):
                log.exception("request %s failed", req.request_id)
                err = RequestError(f"{type(err).__name__}: {err}", "internal")
            self.send(M.RequestFailure(req.request_id, err.message, err.reason))
        finally:
            self.tasks.pop(req.request_id, None)
