"""Transport: how ranks talk. One interface, the operations the cluster needs on it.

Control (add/abort a request, borrow/reserve/release blocks, move a request's
KV, heartbeats, outputs, stats, stop) and data (one layer of remote
MicroAttention; a block copy for migration) are typed methods here, built on
one primitive, ``request(dst, msg, tensors) -> Future[(reply, tensors)]``,
that each implementation provides:

* ``TorchRpcTransport`` (infinite/cluster/rpc_transport.py): torch.distributed
  RPC (TensorPipe) between processes, under torchrun or LocalCluster;
* ``InProcessTransport`` (below): ranks that are objects in one process, for
  unit tests of the gManager, the front door and instances without spawning.

The receiving side is an ``Endpoint``: ``handle(src, msg, tensors)`` returns
the reply, or a torch Future of it when the work finishes elsewhere (the
creditor's serving thread). A handler that raises answers ``Failed``; the
caller's future then raises ``PeerError``. Every call can carry a timeout, so
a dead peer becomes an error, not a hang.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from infinite.cluster import messages as M
from infinite.errors import RequestError

Tensors = M.AttentionTensors | M.AttentionResultTensors | M.BlockTensors | None
Reply = tuple[M.Msg, Tensors]
Future = torch.futures.Future


class PeerError(RuntimeError):
    """The peer's handler raised; ``reason`` is its RequestError reason when it was one."""

    def __init__(self, message: str, reason: str = "internal") -> None:
        super().__init__(message)
        self.reason = reason


STALE_ROWS = "stale_rows"


class StaleRows(RuntimeError):
    """A creditor refused a step's block diffs: they do not continue the rows it holds (a step that
    failed midway, or rows it forgot). The step fails like any remote failure; the debtor sends
    whole rows next time (cluster/lent_rows.py)."""

    reason = STALE_ROWS


def is_stale(err: BaseException) -> bool:
    """The error is a creditor's refusal of stale diffs (retry the step), not a failure."""
    return isinstance(err, PeerError) and err.reason == STALE_ROWS


class Endpoint(Protocol):
    def handle(self, src: int, msg: M.Msg, tensors: Tensors) -> Reply | Future: ...


def failed_reply(err: BaseException) -> Reply:
    reason = err.reason if isinstance(err, (RequestError, StaleRows)) else "internal"
    return M.Failed(f"{type(err).__name__}: {err}", reason), None


def completed(value: Any) -> Future:
    fut: Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class Transport(ABC):
    rank: int
    world_size: int

    # ---- what an implementation provides -----------------------------------------------
    @abstractmethod
    def start(self, endpoint: Endpoint) -> None:
        """Join the cluster and serve ``endpoint`` to the other ranks."""

    @abstractmethod
    def request(self, dst: int, msg: M.Msg, tensors: Tensors = None, timeout: float | None = None) -> Future:
        """Send ``msg`` (and tensors) to rank ``dst``; the future holds its (reply, tensors)."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- control ---------------------------------------------------------------------------
    def add_request(self, dst: int, msg: M.AddRequest) -> Future:
        return self._call(dst, msg)

    def abort(self, dst: int, request_id: str) -> Future:
        return self._call(dst, M.AbortRequest(request_id))

    def move(self, dst: int, msg: M.MoveKV) -> Future:
        return self._call(dst, msg)

    def stop(self, dst: int) -> Future:
        return self._call(dst, M.Stop())

    def ping(self, dst: int, timeout: float | None = None) -> Future:
        return self._call(dst, M.Ping(), timeout=timeout)

    def probe(self, dst: int, timeout: float | None = None) -> float:
        """Seconds one remote MicroAttention call costs beyond its math (per layer): the cost
        model's prior for the remote latency before real calls are measured. Here: a ping."""
        t0 = time.perf_counter()
        self.ping(dst, timeout).wait()
        return time.perf_counter() - t0

    def stats(self, dst: int, timeout: float | None = None) -> Future:
        """-> InstanceStats"""
        return self._call(dst, M.StatsQuery(), timeout=timeout)

    def outputs(self, msg: M.Outputs) -> Future:
        return self._call(0, msg)

    def heartbeat(self, msg: M.Heartbeat, timeout: float | None = None) -> Future:
        """-> HeartbeatReply"""
        return self._call(0, msg, timeout=timeout)

    def borrow(self, msg: M.Borrow, timeout: float | None = None) -> Future:
        """-> Borrowed"""
        return self._call(0, msg, timeout=timeout)

    def cluster_stop(self) -> Future:
        return self._call(0, M.ClusterStop())

    def reserve(self, dst: int, msg: M.Reserve, timeout: float | None = None) -> Future:
        """-> Reserved"""
        return self._call(dst, msg, timeout=timeout)

    def release(self, dst: int, msg: M.Release, timeout: float | None = None) -> Future:
        """-> Released"""
        return self._call(dst, msg, timeout=timeout)

    def lend_prefix(self, dst: int, msg: M.LendPrefix, timeout: float | None = None) -> Future:
        """-> PrefixLent"""
        return self._call(dst, msg, timeout=timeout)

    # ---- membership (infinite/cluster/supervisor.py) ---------------------------------------------
    def join(self, msg: M.Join, timeout: float | None = None) -> Future:
        """-> ClusterView"""
        return self._call(0, msg, timeout=timeout)

    def leaving(self, msg: M.Leaving, timeout: float | None = None) -> Future:
        return self._call(0, msg, timeout=timeout)

    def left(self, msg: M.Left, timeout: float | None = None) -> Future:
        return self._call(0, msg, timeout=timeout)

    def suspect(self, msg: M.Suspect, timeout: float | None = None) -> Future:
        """-> ClusterView, once rank 0 has checked the named ranks"""
        return self._call(0, msg, timeout=timeout)

    def cluster_view(self, dst: int, view: M.ClusterView) -> Future:
        return self._call(dst, view)

    def drain(self, dst: int, msg: M.Drain) -> Future:
        return self._call(dst, msg)

    def evict(self, rank: int) -> None:
        """Rank 0: take a gone rank out of the group, so that new ranks can join (no-op here)."""

    # ---- data ------------------------------------------------------------------------------
    def attention(self, dst: int, call: M.AttentionCall, tensors: M.AttentionTensors,
                  timeout: float | None = None) -> Future:
        """One layer of MicroAttention on ``dst``'s blocks -> AttentionResultTensors (on CPU). A
        failure keeps its type (``then`` would wrap it in a RuntimeError), as on the point-to-point
        plane: the step runner tells a creditor's refusal or error from a lost peer by it."""
        return self._tensors(dst, call, tensors, timeout)

    def group_start(self, dst: int, msg: M.GroupStart, timeout: float | None = None) -> Future:
        """-> Ack once ``dst`` took its part of a prefill group (a failure if it refused)."""
        return self._call(dst, msg, None, timeout)

    def group_run(self, dst: int, msg: M.GroupRun, timeout: float | None = None) -> Future:
        """-> GroupDone, once ``dst`` has computed its segment of the group's prefill."""
        return self._call(dst, msg, None, timeout)

    def group_ask(self, dst: int, msg: M.GroupAsk, tensors: M.AttentionTensors | None,
                  timeout: float | None = None) -> Future:
        """A prefill group's call -> AttentionResultTensors (pass-Q) or BlockTensors (pass-KV),
        failures keeping their type."""
        return self._tensors(dst, msg, tensors, timeout)

    def group_close(self, dst: int, msg: M.GroupClose, timeout: float | None = None) -> Future:
        return self._call(dst, msg, None, timeout)

    def _tensors(self, dst: int, msg: M.Msg, tensors: Tensors, timeout: float | None) -> Future:
        out: Future = torch.futures.Future()

        def done(f: Future) -> None:
            try:
                value = _result_tensors(f)
            except BaseException as e:  # noqa: BLE001 - raised to whoever waits
                out.set_exception(e)
                return
            out.set_result(value)

        self.request(dst, msg, tensors, timeout).add_done_callback(done)
        return out

    def write_blocks(self, dst: int, msg: M.WriteBlocks, tensors: M.BlockTensors,
                     timeout: float | None = None) -> Future:
        return self._call(dst, msg, tensors, timeout)

    def read_blocks(self, dst: int, msg: M.ReadBlocks, timeout: float | None = None) -> Future:
        """-> BlockTensors (on CPU) of blocks lent to the caller."""
        return self.request(dst, msg, None, timeout).then(_result_tensors)

    def _call(self, dst: int, msg: M.Msg, tensors: Tensors = None, timeout: float | None = None) -> Future:
        return self.request(dst, msg, tensors, timeout).then(_reply_message)


def _reply_message(fut: Future) -> M.Msg:
    msg, _ = fut.value()
    if isinstance(msg, M.Failed):
        raise PeerError(msg.message, msg.reason)
    return msg


def _result_tensors(fut: Future) -> M.AttentionResultTensors:
    msg, tensors = fut.value()
    if isinstance(msg, M.Failed):
        raise PeerError(msg.message, msg.reason)
    return tensors


def to_asyncio(fut: Future, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Complete an asyncio future from the torch future's done-callback (thread-safe)."""
    af = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if af.done():
            return
        if error is not None:
            af.set_exception(error)
        else:
            af.set_result(value)

    def done(f: Future) -> None:
        try:
            value, error = f.value(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, e
        loop.call_soon_threadsafe(settle, value, error)

    fut.add_done_callback(done)
    return af


def settle(out: Future, value: Any) -> None:
    """Set a result unless a timeout (or anything else) settled the future first."""
    try:
        if not out.done():
            out.set_result(value)
    except RuntimeError:  # settled meanwhile
        pass


def chain(result: Reply | Future, out: Future) -> None:
    """Settle ``out`` with a handler's result, now or when its future completes."""
    if isinstance(result, torch.futures.Future):
        def done(f: Future) -> None:
            try:
                value = f.value()
            except BaseException as e:  # noqa: BLE001
                value = failed_reply(e)
            settle(out, value)

        result.add_done_callback(done)
    else:
        settle(out, result)


# --------------------------------------------------------------------------- in-process


class InProcessHub:
    """Ranks that are objects in this process. Messages are encoded and decoded as on the
    wire (so an unserialisable message fails here too); tensors pass by reference. Handlers
    run on a worker pool, as TensorPipe's workers run them, so a handler may call back."""

    def __init__(self, world_size: int, workers: int = 8) -> None:
        self.world_size = world_size
        self.endpoints: dict[int, Endpoint] = {}
        self.dead: set[int] = set()  # ranks whose calls fail as if the peer were gone
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inproc-transport")
        self.sent: list[tuple[int, int, M.Msg]] = []  # (src, dst, msg): what tests inspect

    def transport(self, rank: int) -> InProcessTransport:
        return InProcessTransport(self, rank)

    def kill(self, rank: int) -> None:
        self.dead.add(rank)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class InProcessTransport(Transport):
    def __init__(self, hub: InProcessHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self.world_size = hub.world_size

    def start(self, endpoint: Endpoint) -> None:
        self.hub.endpoints[self.rank] = endpoint

    def request(self, dst: int, msg: M.Msg, tensors: Tensors = None, timeout: float | None = None) -> Future:
        out: Future = torch.futures.Future()
        wire = M.decode(M.encode(msg))
        self.hub.sent.append((self.rank, dst, wire))
        if dst in self.hub.dead or self.rank in self.hub.dead or dst not in self.hub.endpoints:
            out.set_exception(ConnectionError(f"rank {dst} is unreachable"))
            return out
        if timeout is not None and timeout > 0:
            timer = threading.Timer(timeout, _expire, (out, dst, timeout))
            timer.daemon = True
            timer.start()
            out.add_done_callback(lambda _: timer.cancel())
        endpoint = self.hub.endpoints[dst]

        def run() -> None:
            try:
                chain(endpoint.handle(self.rank, wire, tensors), out)
            except BaseException as e:  # noqa: BLE001 - the caller hears of it
                chain(failed_reply(e), out)

        self.hub.pool.submit(run)
        return out

    def close(self) -> None:
        self.hub.endpoints.pop(self.rank, None)


def _expire(fut: Future, dst: int, timeout: float) -> None:
    if not fut.done():
        try:
            fut.set_exception(TimeoutError(f"rank {dst} did not answer in {timeout:.1f} s"))
        except RuntimeError:  # settled meanwhile
            pass


def wait_all(futs: list[Future], on_error: Callable[[int, BaseException], None] | None = None) -> list[Any]:
    """Wait for every future; a failed one gives None (and calls on_error) instead of raising."""
    out = []
    for i, f in enumerate(futs):
        try:
            out.append(f.wait())
        except Exception as e:  # noqa: BLE001
            if on_error is None:
                raise
            on_error(i, e)
            out.append(None)
    return out
