"""A member of a prefill group: its segment of a long prompt, computed a round at a time on its
compute thread between its own steps, and its answers to the other members' queries.

Each round, the member runs its chunk (``sp_chunk.RoundChunk``: its stripes of the round) through
every layer with the model's own ``forward``; the chunk's K/V go to its pool, in blocks lent to
the request's home. At layer ``l`` its queries attend over (a) its own blocks (local
MicroAttention: its earlier stripes and the chunk itself, causal) and (b) each other member's
earlier positions, either by sending the queries there (pass-Q, ``GroupAsk``: the holder runs
MicroAttention over its blocks and returns (out, LSE)) or by fetching the holder's K/V of that
layer and attending over them here (pass-KV): per round, whichever ``sp_policy.choose_exchange``
says puts fewer bytes on the busiest member's link. AggregationAttention merges the parts.

**Why the group cannot deadlock.** A holder answers a query of layer ``l`` only once its own K/V
of layer ``l`` for every position the query can see is written (``GroupMember.when_written``;
the answer waits on a pending list, holding no thread). A member writes a layer's K/V for its
whole chunk in ``pre_attention``, before it asks anything at that layer. So the K/V of round
``k``, layer ``l`` on every member depends only on that member's own layers before ``l`` of round
``k`` (and its earlier rounds), which depend on answers about positions earlier than its chunk's:
by induction over (round, layer) every write happens, so every answer does. Two more rules keep
other work out of the cycle: answers run on a pool of their own (never on a compute thread, whose
round may be waiting), and an instance is in one group at a time (``start`` refuses a second):
two groups sharing two members could otherwise each wait for the other's round on the other
member. A member's own steps wait on no other compute thread (creditors answer on serving
threads), so its next round comes after at most one step of its own.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from infinite.attention import aggregate, micro_attention
from infinite.cluster import messages as M
from infinite.cluster.sp_chunk import MemberBlocks, RoundChunk, layout_from_message, rows_meta
from infinite.cluster.sp_policy import PASS_KV, PASS_Q, ExchangeShape, choose_exchange
from infinite.cluster.transport import Future, Transport, failed_reply, settle
from infinite.kv.cache import KVCache
from infinite.model.ops import KVWrite
from infinite.runtime.model_runner import StepInputs, forward
from infinite.sampling.logprobs import prompt_logprobs

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (home, request id)


class GroupMember:
    """One member's state of one group: what it computes, how far each layer is written, and the
    other members' queries waiting for it."""

    def __init__(self, msg: M.GroupStart, index: int, num_layers: int) -> None:
        self.key: Key = (msg.home, msg.request_id)
        self.plan = MemberBlocks(layout_from_message(msg.layout), index, tuple(msg.blocks))
        self.tokens = msg.tokens  # the whole prompt, by position
        self.top_k = msg.prompt_logprobs
        self.next_round = 0
        self.written = [0] * num_layers  # per layer: tokens of the segment (in its order) whose K/V are written
        self._lock = threading.Lock()
        self._pending: list[tuple[int, int, Future, object]] = []  # (layer, need, reply, run)
        self.done: Future | None = None  # set by GroupRun; settled when the last round is computed
        self.error: BaseException | None = None
        self.positions: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.compute_s = 0.0
        self.wait_s = 0.0
        self._logical: dict[int, tuple[int, ...]] = {}

    def logical_of(self, j: int) -> tuple[int, ...]:
        """Member ``j``'s blocks' indices in the request, in its segment's order (from the layout)."""
        if j not in self._logical:
            lay = self.plan.layout
            self._logical[j] = MemberBlocks(lay, j, tuple(range(lay.segment_blocks(j)))).logical
        return self._logical[j]

    @property
    def rounds(self) -> int:
        return self.plan.layout.rounds

    @property
    def finished(self) -> bool:
        return self.next_round >= self.rounds or self.error is not None

    def mark(self, layer: int, upto: int) -> list:
        """Layer ``layer`` is written up to segment offset ``upto``: the answers that may run now."""
        with self._lock:
            self.written[layer] = max(self.written[layer], upto)
            ready = [p for p in self._pending if p[0] == layer and p[1] <= upto]
            self._pending = [p for p in self._pending if not (p[0] == layer and p[1] <= upto)]
        return [p[3] for p in ready]

    def when_written(self, layer: int, need: int, reply: Future, run) -> bool:
        """True if layer ``layer`` holds ``need`` tokens already (run now); else ``run`` waits."""
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"group of {self.key[1]} failed on this member: {self.error}")
            if self.written[layer] >= need:
                return True
            self._pending.append((layer, need, reply, run))
            return False

    def fail(self, err: BaseException) -> None:
        """Give up: the queries waiting on this member fail now rather than at their timeouts."""
        with self._lock:
            self.error = err
            pending, self._pending = self._pending, []
        for _, _, reply, _ in pending:
            settle(reply, failed_reply(RuntimeError(f"prefill group member failed: {err}")))
        if self.done is not None:
            settle(self.done, failed_reply(err))


class GroupGuests:
    """An instance's part in prefill groups (its own requests' included): at most one at a time."""

    def __init__(self, rank: int, model, kv: KVCache, scale: float, transport: Transport, timeout_s: float,
                 tensor_parallel: bool = False) -> None:
        """``tensor_parallel``: the instance is a tensor-parallel group, whose forward needs its
        followers in lockstep: it takes no part in prefill groups (``start`` refuses)."""
        self.rank = rank
        self.tensor_parallel = tensor_parallel
        self.model = model
        self.kv = kv
        self.scale = scale
        self.transport = transport
        self.timeout_s = timeout_s
        self.members: dict[Key, GroupMember] = {}
        self._lock = threading.Lock()
        self._serve = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"rank{rank}-group")
        self.wake = lambda: None  # the instance's step loop: a round is ready to run
        self.compute_s = 0.0  # rounds computed, every group (stats)
        self.wait_s = 0.0  # ... waiting for the other members' parts
        c = model.config
        self.shape = ExchangeShape.of(c.num_heads, c.num_kv_heads, c.head_dim, kv.k.element_size())
        self.rounds_by_mode = {PASS_Q: 0, PASS_KV: 0}  # rounds run with each exchange (stats)

    # ---- control (transport threads) ----------------------------------------------------------
    def start(self, msg: M.GroupStart) -> None:
        if self.tensor_parallel:
            raise RuntimeError(f"rank {self.rank} is a tensor-parallel instance: it takes no part in prefill groups")
        with self._lock:
            if self.members:
                raise RuntimeError(f"rank {self.rank} is in the prefill group of {next(iter(self.members))[1]} "
                                   "already (one group per instance at a time)")
            index = msg.layout.members.index(self.rank)
            self.members[(msg.home, msg.request_id)] = GroupMember(msg, index, self.kv.k.shape[0])

    def run(self, msg: M.GroupRun) -> Future:
        m = self._member((msg.home, msg.request_id))
        m.done = torch.futures.Future()
        if m.error is not None:
            m.done.set_result(failed_reply(m.error))
        self.wake()
        return m.done

    def close(self, key: Key) -> None:
        with self._lock:
            m = self.members.pop(key, None)
        if m is not None and not m.finished:
            m.fail(RuntimeError("the group was closed"))

    def forget_home(self, home: int) -> None:
        """A home that is gone will close nothing: its groups go."""
        for key in [k for k in list(self.members) if k[0] == home]:
            self.close(key)

    def _member(self, key: Key) -> GroupMember:
        m = self.members.get(key)
        if m is None:
            raise RuntimeError(f"rank {self.rank} is in no prefill group of {key[1]} (home {key[0]})")
        return m

    def ask(self, msg: M.GroupAsk, t: M.AttentionTensors | None) -> Future:
        """Another member's queries over this member's earlier positions, answered once written."""
        m = self._member((msg.home, msg.request_id))
        max_pos = msg.q_starts[-1] + msg.q_lens[-1] - 1
        need = m.plan.needed(m.plan.index, max_pos)
        reply: Future = torch.futures.Future()

        @torch.inference_mode()
        def run() -> None:
            try:
                dev = self.kv.k.device
                kc, vc = self.kv.k[msg.layer], self.kv.v[msg.layer]
                if msg.mode == PASS_KV:  # the blocks the rows can see: those before the last row's block
                    n = bisect.bisect_right(m.plan.logical, max_pos // m.plan.layout.block_size)
                    ids = torch.tensor(m.plan.blocks[:n], dtype=torch.int64, device=dev)
                    result = (M.Ack(), M.BlockTensors(kc.index_select(0, ids), vc.index_select(0, ids)))
                else:
                    meta = m.plan.rows_meta(msg.q_starts, msg.q_lens, dev)
                    out, lse = micro_attention(t.q.to(dev), kc, vc, meta, self.scale)
                    result = (M.AttentionResult(), M.AttentionResultTensors(out, lse))
            except BaseException as e:  # noqa: BLE001 - travels back to the asker
                result = failed_reply(e)
            settle(reply, result)  # (unless the group failed meanwhile and answered it)

        if m.when_written(msg.layer, need, reply, lambda: self._serve.submit(run)):
            self._serve.submit(run)
        return reply

    # ---- compute (the instance's compute thread) ---------------------------------------------
    def ready(self) -> bool:
        """A round is there to run."""
        return any(m.done is not None and not m.finished for m in list(self.members.values()))

    def run_round(self) -> None:
        """The next round of the group this instance is in, if it has been told to run."""
        for m in list(self.members.values()):
            if m.done is None or m.finished:
                continue
            t0 = time.perf_counter()
            w0 = m.wait_s
            try:
                self._round(m)
            except BaseException as e:  # noqa: BLE001 - the home hears of it and recomputes alone
                log.warning("rank %d: prefill group of %s failed: %s", self.rank, m.key[1], e)
                m.fail(e)
                continue
            finally:
                m.compute_s += (time.perf_counter() - t0) - (m.wait_s - w0)
                self.compute_s += (time.perf_counter() - t0) - (m.wait_s - w0)
                self.wait_s += m.wait_s - w0
            if m.finished:
                settle(m.done, (M.GroupDone(self.rank, m.positions, m.logprobs, m.compute_s, m.wait_s), None))

    @torch.inference_mode()
    def _round(self, m: GroupMember) -> None:
        k = m.next_round
        ch = m.plan.chunk(k)
        m.next_round += 1
        if ch.num_tokens == 0:
            return
        dev = self.kv.k.device
        pos = ch.positions()
        t = len(pos)
        want = m.top_k is not None
        inputs = StepInputs(
            input_ids=torch.tensor([m.tokens[p] for p in pos], dtype=torch.int64, device=dev),
            positions=torch.tensor(pos, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(ch.slots, dtype=torch.int64, device=dev),
            meta=m.plan.rows_meta(ch.q_starts, ch.q_lens, dev),
            logits_indices=torch.arange(t if want else 0, dtype=torch.int64, device=dev),
            sample_requests=[], q_lens=list(ch.q_lens), q_starts=list(ch.q_starts), max_position=max(pos))
        mode = choose_exchange(m.plan.layout, k, self.shape).mode
        self.rounds_by_mode[mode] += 1
        logits = forward(self.model, inputs, _GroupAttention(self, m, ch, inputs, mode))  # [t or 0, V]
        if want:
            row = 0
            for a, n in zip(ch.q_starts, ch.q_lens):
                m.logprobs.extend(prompt_logprobs(logits[row:row + n], m.tokens, a, m.top_k))
                m.positions.extend(range(a, a + n))
                row += n

    def close_all(self) -> None:
        for key in list(self.members):
            self.close(key)
        self._serve.shutdown(wait=False, cancel_futures=True)


def _wait(fut: Future, m: GroupMember, poll_s: float = 0.05):
    """``fut``'s value, unless the group is closed meanwhile (an abort, the home gone): then raise
    at once rather than at the call's timeout."""
    done = threading.Event()
    fut.add_done_callback(lambda _: done.set())
    while not done.wait(poll_s):
        if m.error is not None:
            raise RuntimeError(f"the prefill group of {m.key[1]} ended: {m.error}")
    return fut.wait()


class _GroupAttention:
    """A round chunk's attention: its K/V written here, its queries over every member's earlier
    positions (local MicroAttention, the others' by pass-Q or pass-KV), merged by AggregationAttention."""

    def __init__(self, guests: GroupGuests, m: GroupMember, ch: RoundChunk, inputs: StepInputs, mode: str) -> None:
        self.g, self.m, self.ch, self.inputs, self.mode = guests, m, ch, inputs, mode
        max_pos = ch.q_starts[-1] + ch.q_lens[-1] - 1
        plan = m.plan
        self.holders = [(j, rank) for j, rank in enumerate(plan.layout.members)
                        if j != plan.index and plan.needed(j, max_pos) > 0]

    def kv_write(self, layer: int) -> KVWrite:
        return self.g.kv.k[layer], self.g.kv.v[layer], self.inputs.slot_mapping

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g, m, ch = self.g, self.m, self.ch
        for run in m.mark(layer, ch.seg_end):  # this layer's K/V are in the pool: the waiting answers go
            run()
        ask = M.GroupAsk(m.key[0], m.key[1], layer, list(ch.q_starts), list(ch.q_lens), self.mode)
        sent = M.AttentionTensors(q.contiguous()) if self.mode == PASS_Q else None  # [T, nh, d]
        futs = [g.transport.group_ask(rank, ask, sent, timeout=g.timeout_s) for _, rank in self.holders]
        parts = [micro_attention(q, g.kv.k[layer], g.kv.v[layer], self.inputs.meta, g.scale)]  # (out, lse)
        dev = q.device
        for (j, _), f in zip(self.holders, futs):
            t0 = time.perf_counter()
            r = _wait(f, m)
            m.wait_s += time.perf_counter() - t0
            if self.mode == PASS_Q:
                parts.append((r.out.to(dev), r.lse.to(dev)))
            else:  # the holder's K/V [n, B, nkv, d] as a pool of n blocks, in its segment's order
                n = r.k.shape[0]
                meta = rows_meta(tuple(range(n)), m.logical_of(j)[:n], m.plan.layout.block_size, ch.q_starts,
                                 ch.q_lens, dev)
                parts.append(micro_attention(q, r.k.to(dev), r.v.to(dev), meta, g.scale))
        return aggregate(parts)[0]  # [T, nh, d]
