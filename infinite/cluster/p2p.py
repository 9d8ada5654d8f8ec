"""P2PTransport: control on RPC, remote MicroAttention on torch.distributed point-to-point.

Why: one RPC round trip costs 480-670 µs on loopback (the RPC machinery, not the
bytes); a gloo send/recv pair costs ~100 µs. A decode step of a long request
calls each creditor once per layer, so the data plane decides whether lending
pays. Same code on GPU with NCCL (a CUDA device picks it); the process group is
opened beside RPC under the same launcher (torchrun's env:// or a tcp:// port).

A *stream* is one (debtor, creditor, micro-batch slot): its messages are strictly
ordered, so each slot has its own process group (NCCL matches point-to-point
messages in issue order per communicator; gloo also gets distinct tags). Per
step and stream:

    debtor -> creditor   header  int64[HEADER]   (step, requests, new entries, rows, writes, ints, drops)
    debtor -> creditor   meta    int64[...]      (the requests' block diffs, dropped handles, write slots)
    per layer:
    debtor -> creditor   data    [Tc*nh*d + 2*Wc*nkv*d]  queries (+ new K/V landing there)
    creditor -> debtor   result  float32[Tc, nh, d+1]    (out, LSE); LSE NaN = the creditor failed,
                                                         +inf = it refused the step's diffs (stale)

The step's block metadata rides in the stream (once per step) instead of an
RPC, which would cost as much as the whole step's data; it is a diff against
the rows the creditor holds (messages.AttentionMeta), so its size does not
grow with the context. The creditor serves each stream on a thread of its own
and computes there (its gather buffers are per thread).

Tensor-parallel instances (``tp_size`` > 1): every rank of every group is in the
process group (data rank = instance * tp_size + tp_rank), and rank i of a debtor
group streams to rank i of its creditor groups, which hold the same heads: no
gather. Only first ranks run RPC (``rpc=False`` for the others). ``open`` also
makes each instance's two group channels (runtime/tp.py), before the model loads.
"""

from __future__ import annotations

import datetime
import logging
import queue
import threading
import time
from typing import Protocol

import torch
import torch.distributed as dist

from infinite.attention import MAMetadata
from infinite.cluster import messages as M
from infinite.cluster.rpc_transport import TorchRpcTransport
from infinite.cluster.transport import STALE_ROWS, Endpoint, Future, PeerError, StaleRows

log = logging.getLogger(__name__)

NUM_SLOTS = 2  # micro-batches a debtor interleaves
HEADER = 8
HDR, META, DATA, RES = range(4)
CLOSE_STEP, PROBE_STEP = -1, -2  # header step ids of the close handshake and of a latency probe
# A stream's groups wait for its next step without a deadline: a gloo wait that times out closes
# the pair for both directions, so a creditor idle for longer than any timeout (a debtor that
# has not borrowed for minutes) would break the peer's own sends. Every data wait passes its
# own deadline (data_timeout_s) instead.
IDLE_WAIT = datetime.timedelta(days=3650)


class AttentionEndpoint(Endpoint, Protocol):
    def attention_shape(self) -> tuple[int, int, int, int, torch.dtype]:
        """(layers, query heads, head dim, KV heads, dtype) of this rank's model."""

    def attend(self, layer: int, meta: MAMetadata, t: M.AttentionTensors) -> M.AttentionResultTensors:
        """One layer of MicroAttention over lent blocks, on the calling (stream) thread."""

    def step_metadata(self, debtor: int, step: int, meta: M.AttentionMeta, num_queries: int) -> MAMetadata:
        """A debtor step's block diffs applied -> its metadata; StaleRows when they are refused."""


def _tag(slot: int, kind: int) -> int:
    return slot * 4 + kind


class P2PTransport(TorchRpcTransport):
    def __init__(self, rank: int, world_size: int, init_method: str = "env://", data_init_method: str = "env://",
                 device: torch.device | None = None, timeout_s: float = 120.0, data_timeout_s: float = 60.0,
                 tp_size: int = 1, tp_rank: int = 0, rpc: bool = True) -> None:
        super().__init__(rank, world_size, init_method, timeout_s)
        self.data_init_method = data_init_method
        self.device = device or torch.device("cpu")
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.data_timeout = datetime.timedelta(seconds=data_timeout_s)
        self.tp_size, self.tp_rank, self.rpc = tp_size, tp_rank, rpc
        self.tp_groups: tuple | None = None  # this instance's (step, block) channels when tp_size > 1
        self._groups: list = []
        self._servers: list[threading.Thread] = []
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._lock = threading.Lock()
        self.closed = False

    # ---- start-up ----------------------------------------------------------------------------
    def data_rank(self, instance: int) -> int:
        """The process-group rank of this rank's counterpart (same heads) in ``instance``."""
        return instance * self.tp_size + self.tp_rank

    def open(self) -> None:
        """Join the process group and make its groups (every process, in the same order); idempotent."""
        if self._groups:
            return
        n = self.world_size * self.tp_size
        dist.init_process_group(self.backend, init_method=self.data_init_method, rank=self.data_rank(self.rank),
                                world_size=n, timeout=datetime.timedelta(seconds=self.timeout_s))
        # WORLD keeps the start-up deadline (a missing peer fails the start); the streams get
        # groups of their own that idle without one.
        self._groups = [dist.new_group(list(range(n)), timeout=IDLE_WAIT) for _ in range(NUM_SLOTS)]
        if self.tp_size > 1:
            # A group's ranks idle between steps as long as their first rank does (it sends keepalives).
            per = [[dist.new_group([i * self.tp_size + j for j in range(self.tp_size)], timeout=IDLE_WAIT)
                    for i in range(self.world_size)] for _ in range(2)]
            self.tp_groups = (per[0][self.rank], per[1][self.rank])

    def start(self, endpoint: AttentionEndpoint) -> None:
        self.open()
        if self.rpc:
            super().start(endpoint)
        self._endpoint = endpoint
        self._servers = []
        for debtor in range(self.world_size):
            if debtor == self.rank:
                continue
            for slot in range(NUM_SLOTS):
                t = threading.Thread(target=self._serve_stream, args=(endpoint, debtor, slot), daemon=True,
                                     name=f"p2p-serve-{debtor}.{slot}")
                t.start()
                self._servers.append(t)

    def close(self, grace_s: float = 5.0) -> None:
        """Close handshake: tell every peer's stream from us that we are done (a header with step
        -1), wait for the peers to tell ours the same, then tear the group down. A gloo receive
        cannot be cancelled (a timeout closes the whole pair), so a stream ends only by a
        message or by its peer's connection closing."""
        if self.closed:
            return
        self.closed = True
        for st in self._streams.values():
            st.stop()
        if self._groups:
            bye = self._dev(torch.full((HEADER,), CLOSE_STEP, dtype=torch.int64))
            works = []
            for peer in range(self.world_size):
                for slot in range(NUM_SLOTS):
                    if peer != self.rank:
                        try:
                            works.append(dist.isend(bye, self.data_rank(peer), self._groups[slot], _tag(slot, HDR)))
                        except Exception:  # noqa: BLE001 - that peer is gone already
                            pass
            deadline = time.monotonic() + grace_s
            for t in self._servers:
                t.join(max(0.0, deadline - time.monotonic()))
            for w in works:
                try:
                    w.wait(datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
                except Exception:  # noqa: BLE001
                    pass
        super().close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- debtor side ---------------------------------------------------------------------------
    def attention(self, dst: int, call: M.AttentionCall, tensors: M.AttentionTensors,
                  timeout: float | None = None) -> Future:
        if dst >= self.world_size:  # joined after start-up: outside the point-to-point group, on RPC
            return super().attention(dst, call, tensors, timeout)
        try:
            return self._attention(dst, call, tensors)
        except Exception as e:  # noqa: BLE001 - a send to a peer that is gone fails in the future,
            # never in the caller: the step then finishes its other streams layer by layer, in step
            fut: Future = torch.futures.Future()
            fut.set_exception(PeerError(f"sending to rank {dst} failed: {e}", "rank_lost"))
            return fut

    def _attention(self, dst: int, call: M.AttentionCall, tensors: M.AttentionTensors) -> Future:
        slot = call.key.micro_batch
        group = self._groups[slot]
        peer = self.data_rank(dst)
        sends = []
        if call.meta is not None:  # the step's first layer: header and block metadata
            ints = meta_ints(call.meta, tensors.slots)
            hdr = torch.tensor([call.key.step, len(call.meta.handles), len(call.meta.blocks),
                                tensors.q.shape[0], 0 if tensors.slots is None else tensors.slots.numel(),
                                ints.numel(), len(call.meta.drop), 0], dtype=torch.int64)
            sends.append((dist.isend(self._dev(hdr), peer, group, _tag(slot, HDR)), hdr))
            ints = self._dev(ints)
            sends.append((dist.isend(ints, peer, group, _tag(slot, META)), ints))
        parts = [tensors.q.reshape(-1)]
        if tensors.slots is not None:
            parts += [tensors.k.reshape(-1), tensors.v.reshape(-1)]
        data = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
        sends.append((dist.isend(data, peer, group, _tag(slot, DATA)), data))
        tc, nh, d = tensors.q.shape
        res = torch.empty(tc, nh, d + 1, dtype=torch.float32, device=tensors.q.device)
        recv = dist.irecv(res, peer, group, _tag(slot, RES))
        return _Answer(self._stream_state(dst, slot), sends, recv, res, tensors.q.dtype, self.data_timeout)

    def probe(self, dst: int, timeout: float | None = None) -> float:
        """Seconds of one layer of remote MicroAttention with nothing to attend: the data plane's
        own round trip (a step of every layer, on slot 0, divided by the layers)."""
        layers, nh, d, nkv, dtype = self._endpoint.attention_shape()
        meta = M.AttentionMeta([], [], [], [], [], [], [], [])
        q = torch.zeros(1, nh, d, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        futs = [self.attention(dst, M.AttentionCall(M.StepKey(self.rank, PROBE_STEP, 0), layer,
                                                    meta if layer == 0 else None), M.AttentionTensors(q))
                for layer in range(layers)]
        for f in futs:
            f.wait()
        return (time.perf_counter() - t0) / layers

    def _stream_state(self, dst: int, slot: int) -> _Stream:
        with self._lock:
            st = self._streams.get((dst, slot))
            if st is None:
                st = self._streams[(dst, slot)] = _Stream(f"p2p-wait-{dst}.{slot}")
            return st

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

    # ---- creditor side ---------------------------------------------------------------------------
    def _serve_stream(self, endpoint: AttentionEndpoint, instance: int, slot: int) -> None:
        group = self._groups[slot]
        debtor = self.data_rank(instance)
        try:
            while not self.closed:
                hdr = self._dev(torch.empty(HEADER, dtype=torch.int64))
                dist.irecv(hdr, debtor, group, _tag(slot, HDR)).wait()  # idle here between steps
                step, nreq, nentries, rows, writes, nints, ndrop = hdr[:7].tolist()
                if step == CLOSE_STEP:
                    return  # the debtor closed
                ints = self._dev(torch.empty(nints, dtype=torch.int64))
                self._recv(ints, debtor, group, _tag(slot, META))
                ma_meta: MAMetadata | Exception | None = None  # None: a probe, nothing to attend
                slots = None
                try:
                    meta, slots = parse_meta(ints.cpu(), nreq, nentries, ndrop, writes)
                    if step != PROBE_STEP:
                        ma_meta = endpoint.step_metadata(instance, step, meta, rows)
                except Exception as e:  # noqa: BLE001 - every layer of the step answers it
                    if not isinstance(e, StaleRows):
                        log.exception("rank %d: metadata of rank %d's step %d refused", self.rank, instance, step)
                    ma_meta = e
                self._serve_step(endpoint, debtor, group, slot, ma_meta, slots, rows, writes)
        except Exception as e:  # noqa: BLE001 - the debtor is gone, or the group was torn down
            if not self.closed:
                log.warning("rank %d: stream from rank %d (slot %d) ended: %s", self.rank, debtor, slot, e)

    def _serve_step(self, endpoint: AttentionEndpoint, debtor: int, group, slot: int,
                    meta: MAMetadata | Exception | None, slots: torch.Tensor | None, rows: int, writes: int
                    ) -> None:
        """Serve one step of a stream, computing on this thread: a hand-off to another thread
        and back would cost more than the message. The header's sizes are what arrives, even when
        the step's metadata was refused (the stream stays in step)."""
        layers, nh, d, nkv, dtype = endpoint.attention_shape()
        qn = rows * nh * d
        pending = None
        for layer in range(layers):
            data = torch.empty(qn + 2 * writes * nkv * d, dtype=dtype, device=self.device)
            self._recv(data, debtor, group, _tag(slot, DATA))
            t = M.AttentionTensors(data[:qn].view(rows, nh, d))
            if slots is not None:
                kv = data[qn:].view(2, writes, nkv, d)
                t.k, t.v, t.slots = kv[0], kv[1], slots
            res = torch.empty(rows, nh, d + 1, dtype=torch.float32, device=self.device)
            if meta is None:  # a probe: no request, nothing to attend
                res[..., :d] = 0.0
                res[..., d] = float("-inf")
            elif isinstance(meta, Exception):  # the step's metadata was refused: so is every layer
                res.fill_(float("inf") if isinstance(meta, StaleRows) else float("nan"))
            else:
                try:
                    out = endpoint.attend(layer, meta, t)
                    res[..., :d] = out.out
                    res[..., d] = out.lse
                except Exception:  # noqa: BLE001 - the debtor must get its answer to stay in step
                    log.exception("rank %d: MicroAttention for rank %d failed", self.rank, debtor)
                    res.fill_(float("nan"))
            if pending is not None:
                pending.wait(self.data_timeout)
            pending = dist.isend(res, debtor, group, _tag(slot, RES))
        if pending is not None:
            pending.wait(self.data_timeout)

    def _recv(self, t: torch.Tensor, src: int, group, tag: int) -> None:
        dist.irecv(t, src, group, tag).wait(self.data_timeout)


class _Stream:
    """The debtor's side of one stream: whether it broke, and a thread that settles answers for
    callers that asked to be called back (the asyncio path) instead of waiting."""

    def __init__(self, name: str) -> None:
        self.broken: BaseException | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None

    def settle_later(self, answer: _Answer) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(answer)

    def stop(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while (answer := self._jobs.get()) is not None:
            answer.settle()


class _Answer:
    """The (out, LSE) of one remote MicroAttention call, as a future: ``wait()`` receives it on the
    caller's thread (the compute thread: no hand-off); ``add_done_callback`` has the stream's
    thread receive it (gloo's point-to-point works have no futures of their own)."""

    def __init__(self, stream: _Stream, sends: list, recv, res: torch.Tensor, dtype: torch.dtype,
                 timeout: datetime.timedelta) -> None:
        self.stream = stream
        self._sends, self._recv, self._res, self._dtype, self._timeout = sends, recv, res, dtype, timeout
        self._lock = threading.Lock()
        self._settled = threading.Event()
        self._value: M.AttentionResultTensors | None = None
        self._error: BaseException | None = None
        self._callbacks: list = []

    def settle(self) -> None:
        with self._lock:
            if self._settled.is_set():
                return
            try:
                if self.stream.broken is not None:
                    raise PeerError(f"the stream is broken: {self.stream.broken}", "rank_lost")
                self._recv.wait(self._timeout)
                for work, _ in self._sends:
                    work.wait(self._timeout)
                lse = self._res[..., -1]
                flag = lse.reshape(-1)[:1].tolist()  # a creditor that fails fills the whole answer
                if flag and flag[0] != flag[0]:  # NaN
                    raise PeerError("the creditor failed to compute MicroAttention (see its log)")
                if flag and flag[0] == float("inf"):
                    raise PeerError("the creditor refused the step's block diffs (they do not continue "
                                    "what it holds): resending whole rows", STALE_ROWS)
                self._value = M.AttentionResultTensors(self._res[..., :-1].to(self._dtype), lse)  # views: no copy
            except BaseException as e:  # noqa: BLE001 - raised to whoever waits
                if not isinstance(e, PeerError):
                    self.stream.broken = e  # a gloo timeout or a lost peer closes the pair for good
                self._error = e if isinstance(e, PeerError) else PeerError(str(e), "rank_lost")
            self._settled.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def wait(self) -> M.AttentionResultTensors:
        self.settle()
        return self.value()

    def value(self) -> M.AttentionResultTensors:
        self._settled.wait()
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return self._settled.is_set()

    def add_done_callback(self, cb) -> None:
        with self._lock:
            if not self._settled.is_set():
                self._callbacks.append(cb)
                self.stream.settle_later(self)
                return
        cb(self)


def meta_ints(meta: M.AttentionMeta, slots: torch.Tensor | None) -> torch.Tensor:
    """A step's block diffs (and write slots) as one int64 tensor: handles, epochs, bases, q lens,
    q starts, counts, block ids, logical ids, dropped handles, slots. ``parse_meta`` reads it back."""
    t = torch.tensor([*meta.handles, *meta.epochs, *meta.bases, *meta.q_lens, *meta.q_starts, *meta.counts,
                      *meta.blocks, *meta.logical, *meta.drop], dtype=torch.int64)
    return torch.cat([t, slots.to(torch.int64).cpu()]) if slots is not None else t


def parse_meta(ints: torch.Tensor, nreq: int, nentries: int, ndrop: int, writes: int
               ) -> tuple[M.AttentionMeta, torch.Tensor | None]:
    """``meta_ints`` read back (ints on the host); ValueError when the sizes do not add up."""
    n, e = nreq, nentries
    if min(n, e, ndrop, writes) < 0 or ints.numel() != 6 * n + 2 * e + ndrop + writes:
        raise ValueError(f"block metadata of {ints.numel()} ints does not hold {n} requests, {e} entries, "
                         f"{ndrop} drops and {writes} writes")
    head = ints[:6 * n + 2 * e + ndrop].tolist()
    cols = [head[i * n:(i + 1) * n] for i in range(6)]
    meta = M.AttentionMeta(*cols, head[6 * n:6 * n + e], head[6 * n + e:6 * n + 2 * e], head[6 * n + 2 * e:])
    return meta, (ints[6 * n + 2 * e + ndrop:] if writes else None)
