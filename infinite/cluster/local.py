"""LocalCluster: N ranks on this machine behind the synchronous engine surface that LLM
uses (make_request / submit / step / abort_request / stats).

The calling process is not a rank: it starts ranks 0..N-1 (free ports picked
automatically, infinite.cluster.spawn) and talks to rank 0 over an
authenticated loopback connection, in typed messages (infinite.cluster.messages,
``Driver*``); rank 0's DriverBridge turns them into front-door calls.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, Listener
from typing import Any

from infinite.cluster import messages as M
from infinite.cluster.sp_chunk import layout_message
from infinite.cluster.spawn import check_local, local_rendezvous, spawn_ranks, stop_ranks
from infinite.errors import RequestError
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams

log = logging.getLogger(__name__)

_ERRORS = {"ValueError": ValueError, "TypeError": TypeError}


def _terminate(procs: list, conn_box: list) -> None:
    conn = conn_box[0] if conn_box else None
    if conn is not None:
        try:
            conn.send_bytes(M.encode(M.DriverStop()))
        except Exception:  # noqa: BLE001 - rank 0 already gone
            pass
    stop_ranks(procs)
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


class LocalCluster:
    def __init__(self, config: EngineConfig, start_timeout_s: float = 600.0) -> None:
        from infinite.runtime.engine import resolve_model_dir
        from infinite.tokenizer import load_tokenizer

        n = config.num_instances
        self.model_dir = resolve_model_dir(config.model)  # the default model is generated once, here
        config = EngineConfig(**{**config.__dict__, "model": self.model_dir})
        self.config = config
        check_local(config)
        authkey = os.urandom(16)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self._conn_box: list[Connection] = []
        log_level = logging.getLevelName(logging.getLogger("infinite").getEffectiveLevel())
        self.procs = spawn_ranks(config, local_rendezvous(n, log_level=log_level, tp_size=config.tensor_parallel_size),
                                 driver=(listener.address, authkey))
        self._finalizer = weakref.finalize(self, _terminate, self.procs, self._conn_box)
        try:
            self._conn = self._accept(listener, start_timeout_s)
        finally:
            listener.close()
        self._conn_box.append(self._conn)
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._outbox: deque[RequestOutput] = deque()
        self._replies: dict[int, M.Msg] = {}
        self._unfinished: set[str] = set()
        self._lock = threading.Lock()
        ready = self._wait_reply(-1, timeout=start_timeout_s, all_ranks=True)  # every rank must come up
        self.model_name: str = config.served_model_name or ready.model_name
        self.max_model_len: int = ready.max_model_len
        self.capacity_tokens: int = ready.capacity_tokens
        self.tokenizer = load_tokenizer(self.model_dir)

    def _accept(self, listener: Listener, timeout_s: float) -> Connection:
        """Rank 0 connects once its process is up; a rank that dies first is an error, not a hang."""
        box: list[Any] = []
        t = threading.Thread(target=lambda: box.append(_accept_or_error(listener)), daemon=True)
        t.start()
        deadline = time.monotonic() + timeout_s
        while t.is_alive():
            t.join(0.2)
            self._check_ranks(all_ranks=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not connect in {timeout_s:.0f} s")
        if isinstance(box[0], BaseException):
            raise RuntimeError(f"rank 0 could not connect: {box[0]}")
        return box[0]

    def _check_ranks(self, all_ranks: bool = False) -> None:
        """A rank that died while starting is fatal; once running, only rank 0 is: a worker that dies
        costs recomputation (its requests move to the survivors), not the run."""
        procs = self.procs if all_ranks else self.procs[:1]
        dead = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"rank {dead[0][0]} exited with code {dead[0][1]} (see its log above)")

    # ---- the connection ----------------------------------------------------------------
    def _send(self, msg: M.Msg) -> None:
        with self._lock:
            self._conn.send_bytes(M.encode(msg))

    def _pump(self, timeout: float, all_ranks: bool = False) -> bool:
        """Read one message (waiting at most timeout); False if none came."""
        if not self._conn.poll(timeout):
            self._check_ranks(all_ranks)
            return False
        msg = M.decode(self._conn.recv_bytes())
        match msg:
            case M.DriverOutput():
                self._unfinished.discard(msg.output.request_id)
                self._outbox.append(msg.output)
            case M.RequestFailure():
                self._unfinished.discard(msg.request_id)
                raise RequestError(f"request {msg.request_id} failed: {msg.message}", msg.reason)
            case M.DriverReady():
                self._replies[-1] = msg
            case M.DriverMade() | M.DriverReply() | M.DriverError():
                self._replies[msg.seq] = msg
        return True

    def _wait_reply(self, seq: int, timeout: float = 120.0, all_ranks: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        while seq not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not answer in {timeout:.0f} s")
            self._pump(0.5, all_ranks)
        msg = self._replies.pop(seq)
        if isinstance(msg, M.DriverError):
            raise _ERRORS.get(msg.kind, RuntimeError)(msg.message)
        return msg

    # ---- the engine surface LLM uses ------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        rid = request_id or f"req-{next(self._ids)}"
        seq = next(self._seq)
        self._send(M.DriverMake(seq, prompt, params, rid))
        made = self._wait_reply(seq)
        return Request(made.request_id, made.prompt_token_ids, params, max_tokens=made.max_tokens, prompt=made.prompt)

    def submit(self, req: Request) -> str:
        pin = req.data_parallel_rank
        lay = req.prefill_layout
        self._send(M.DriverAdd(req.request_id, -1 if pin is None else pin,
                               None if lay is None else layout_message(lay)))
        self._unfinished.add(req.request_id)
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
            self._send(M.DriverAbort(request_id))

    def _query(self, what: str) -> Any:
        seq = next(self._seq)
        self._send(M.DriverQuery(seq, what))
        return self._wait_reply(seq).value

    def stats(self) -> list[dict]:
        return self._query("stats")

    def cluster_status(self) -> dict:
        return self._query("status")

    def migrate(self, request_id: str, num_blocks: int, dst: int) -> None:
        """Ask the request's home to move its oldest num_blocks local blocks to dst (move_kvcache)."""
        self._send(M.DriverMove(request_id, num_blocks, dst))

    def shutdown(self) -> None:
        self._finalizer()


def _accept_or_error(listener: Listener) -> Any:
    try:
        return listener.accept()
    except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
        return e
