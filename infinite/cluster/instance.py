"""One instance of the cluster (one process per GPU or CPU rank).

It runs the non-attention layers for its own batch (``StepRunner`` when some
of its requests' blocks live on creditors), keeps its KV pool through the
rManager, borrows what its pool lacks (``ClusterAllocator``), and serves the
blocks it lent (``Creditor``). Threads: the event loop (control, heartbeats,
awaiting creditors), one compute thread (all model math of the own batch,
scheduling, migrations), the creditor's serving thread, and the transport's
workers (handlers called by other ranks: they only enqueue, or hand work to
the serving thread).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from infinite.cluster import messages as M
from infinite.cluster.allocator import ClusterAllocator
from infinite.cluster.counters import StepCounters
from infinite.cluster.creditor import Creditor
from infinite.cluster.migration import Migrator
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.step_runner import StepRunner
from infinite.cluster.transport import Transport
from infinite.kv.rmanager import RBlock, blocks_for
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.runtime.model_runner import LocalAttention, forward

log = logging.getLogger(__name__)

Inbox = M.AddRequest | M.AbortRequest | M.MoveKV


class Instance:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, transport: Transport,
                 timeout_s: float = 30.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.transport = transport
        self.policy = LendingPolicy.from_config(config, world_size)

        def allocator(rm):
            # Every rank runs the same config, so the same pool size.
            others = [rm.num_blocks] * (world_size - 1)
            return ClusterAllocator(rm, transport, self.policy, self.policy.request_capacity(rm.num_blocks, others),
                                    others, timeout_s)

        self.engine = LLMEngine(config, rank=rank, make_allocator=allocator)
        self.allocator: ClusterAllocator = self.engine.allocator
        self.rm = self.engine.rm
        self.counters = StepCounters()
        self.migrator = self.allocator.migrator = Migrator(self.rm, self.engine.kv, transport, self.counters, timeout_s)
        self.creditor = Creditor(self.rm, self.engine.kv, self.engine.scale, self.policy, self.counters,
                                 self.own_demand)
        self.runner = StepRunner(self.engine, transport, self.counters, timeout_s)
        self.timeout_s = timeout_s
        self._inbox: deque[Inbox] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-compute")
        self.stopping = False
        self._sent_placement: dict[str, tuple[int, tuple]] = {}
        self._step_calls = 0  # remote calls per layer of the step being run

    # ---- inbox (filled from transport threads, applied on the compute thread) ---------------
    def enqueue(self, item: Inbox) -> None:
        self._inbox.append(item)
        self._wake()

    def request_stop(self) -> None:
        self.stopping = True
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _apply_inbox(self) -> None:
        e = self.engine
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, M.AddRequest):
                try:
                    e.submit(e.build_request(item.request_id, item.prompt_token_ids, item.params, item.max_tokens,
                                             item.prompt))
                except Exception as err:  # noqa: BLE001 - surfaced to the client as a failed request
                    log.exception("rank %d: cannot add %s", self.rank, item.request_id)
                    self._send(failures=[M.RequestFailure(item.request_id, f"cannot add the request: {err}",
                                                          "invalid")])
            elif isinstance(item, M.AbortRequest):
                e.abort_request(item.request_id)
            elif isinstance(item, M.MoveKV):
                self._migrate(item)

    def _migrate(self, mv: M.MoveKV) -> None:
        """move_kvcache: start moving the request's oldest full blocks on mv.src (-1: here) to
        mv.dst; the copy runs while decoding goes on, the table swaps between two steps.
        Pushing out reserves on the creditor first (it has the last word); a refusal means
        wait for the next plan."""
        req = self.engine.requests.get(mv.request_id)
        if req is None or mv.request_id in self.migrator.busy:
            return
        src = self.rank if mv.src < 0 else mv.src
        old = self.migrator.oldest_full(mv.request_id, req.num_computed_tokens, src, mv.num_blocks)
        if not old or src == mv.dst:
            return
        if mv.dst == self.rank:  # blocks come home
            self.migrator.pull(mv.request_id, old)
            return
        if src != self.rank:
            return  # creditor to creditor is not a move this runtime makes
        try:
            got = self.transport.reserve(mv.dst, M.Reserve(self.rank, mv.request_id, len(old)),
                                         timeout=self.timeout_s).wait().blocks
        except Exception:  # noqa: BLE001
            log.exception("rank %d: reserving %d blocks on %d failed", self.rank, len(old), mv.dst)
            return
        if got:
            self.migrator.push(mv.request_id, old[:len(got)], [RBlock(mv.dst, b) for b in got])

    def own_demand(self) -> int:
        """Free blocks this instance keeps for itself (its queue, its running requests' growth)."""
        sched = self.engine.scheduler
        bs = self.engine.block_size
        waiting = sum(blocks_for(r.num_tokens + 1, bs) for r in list(sched.waiting))
        running = [(r.num_tokens, r.num_prompt_tokens + r.max_tokens, len(self.rm.table(r.request_id)))
                   for r in list(sched.running)]
        return self.policy.own_demand(waiting, running, bs)

    # ---- the step loop --------------------------------------------------------------------------
    @torch.inference_mode()
    def _begin_step(self):
        """Schedule; a step with no remote blocks runs to the end right here."""
        self._apply_inbox()
        self.migrator.apply_done()
        e = self.engine
        batch = e.scheduler.schedule()
        if not batch.requests:
            return None
        tables = [self.rm.table(r.request_id) for r in batch.requests]
        self._step_calls = 0
        if all(ref.instance == self.rank for t in tables for ref in t):
            inputs = e.prepare(batch)
            logits = forward(e.model, inputs, LocalAttention(e.kv, inputs, e.scale))
            return batch, None, e.postprocess(batch, inputs, logits)
        now = time.time()
        for req in batch.requests:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        mbs = self.runner.micro_batches(batch, tables)
        self._step_calls = sum(len(mb.parts) for mb in mbs)
        if len(mbs) == 1:
            return batch, None, self.runner.run_blocking(batch, mbs[0])
        return batch, mbs, None

    async def run(self) -> None:
        """The instance's step loop; returns when stopped."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        while not self.stopping:
            t0 = time.perf_counter()
            try:
                res = await loop.run_in_executor(self.executor, self._begin_step)
                if res is None:
                    self._wakeup.clear()
                    if self._inbox:
                        continue
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=0.05)
                    except asyncio.TimeoutError:
                        pass
                    continue
                batch, mbs, outs = res
                if mbs is not None:
                    outs = await self.runner.run(batch, mbs, self.executor)
                dt = time.perf_counter() - t0
                self.engine.last_step_time = dt
                self.counters.step_done(dt, self._step_calls)
                if outs:
                    self._send(outputs=outs)
            except Exception:  # noqa: BLE001 - keep serving; the failed step's requests are failed
                log.exception("rank %d: step failed", self.rank)
                await loop.run_in_executor(self.executor, self._fail_running, "the step failed on rank "
                                           f"{self.rank}; see its log")

    def _fail_running(self, message: str) -> None:
        e = self.engine
        failed = [r.request_id for r in list(e.scheduler.running) + list(e.scheduler.waiting)]
        for rid in failed:
            e.abort_request(rid)
        if failed:
            self._send(failures=[M.RequestFailure(rid, message, "internal") for rid in failed])

    def _send(self, outputs: list[RequestOutput] = (), failures: list[M.RequestFailure] = ()) -> None:
        fut = self.transport.outputs(M.Outputs(self.rank, list(outputs), list(failures)))
        fut.add_done_callback(_log_failure("sending outputs to rank 0"))

    def close(self) -> None:
        self.creditor.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- heartbeats -------------------------------------------------------------------------------
    def heartbeat(self) -> M.Heartbeat:
        """Free memory, batch, step time, and the placement entries that changed since the last beat."""
        stats = self.stats()
        placement = self.rm.placement()
        ctx = {r.request_id: r.num_tokens for r in list(self.engine.scheduler.running)}
        changed = []
        for rid, counts in placement.items():
            key = (ctx.get(rid, 0), tuple(sorted(counts.items())))
            if self._sent_placement.get(rid) != key:
                changed.append(M.PlacementEntry(rid, key[0], dict(counts)))
                self._sent_placement[rid] = key
        gone = [rid for rid in self._sent_placement if rid not in placement]
        for rid in gone:
            del self._sent_placement[rid]
        return M.Heartbeat(stats, changed, gone)

    def on_heartbeat_reply(self, reply: M.HeartbeatReply) -> None:
        self.allocator.borrowable = reply.borrowable
        self.allocator.loans_pay = reply.loans_pay

    def forget_sent_placement(self) -> None:
        """The last beat may not have arrived: the next one resends the whole placement."""
        self._sent_placement.clear()

    def stats(self) -> M.InstanceStats:
        e = self.engine
        rm = self.rm.stats()
        running = list(e.scheduler.running)
        waiting = list(e.scheduler.waiting)
        c = self.counters
        return M.InstanceStats(
            **rm,
            num_running=len(running),
            num_waiting=len(waiting),
            waiting_blocks=sum(blocks_for(r.num_tokens + 1, e.block_size) for r in waiting),
            tokens_held=sum(r.num_computed_tokens for r in running),
            step_time_ms=1e3 * c.mean_step_s,
            num_preemptions=e.scheduler.num_preemptions,
            steps=c.steps,
            remote_steps=c.remote_steps,
            remote_calls=c.remote_calls,
            remote_wait_ms=1e3 * c.remote_wait_s,
            remote_step_ms=1e3 * c.remote_step_s,
            remote_compute_ms=1e3 * c.remote_compute_s,
            served_calls=c.served_calls,
            served_ms=1e3 * c.served_s,
            migrations=c.migrations,
            migrated_blocks=c.migrated_blocks,
            lend_cap=self.policy.lend_cap(self.rm.num_blocks),
            torch_threads=torch.get_num_threads(),
            demand_blocks=self.own_demand(),
            remote_wait_per_call_ms=1e3 * c.recent_wait_per_call_s,
            remote_calls_per_step=c.mean_calls_per_layer,
        )


def _log_failure(what: str):
    def cb(fut) -> None:
        try:
            fut.value()
        except Exception:  # noqa: BLE001
            log.warning("%s failed", what, exc_info=True)

    return cb
