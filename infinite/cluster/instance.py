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
from infinite.cluster import recovery
from infinite.cluster.device_timer import device_timer
from infinite.cluster.instance_view import InstanceView
from infinite.cluster.membership import PING_S, short_error
from infinite.cluster.migration import Migrator
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.sp_home import GroupPrefills
from infinite.cluster.sp_member import GroupGuests
from infinite.cluster.step_runner import StepRunner
from infinite.cluster.tp_commands import run_remote
from infinite.cluster.transport import PeerError, Transport, is_stale, to_asyncio
from infinite.kv.rmanager import RBlock, blocks_for
from infinite.model.parallel import GroupError
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.runtime.request import Request, Status
from infinite.runtime.tp import TPLeader

log = logging.getLogger(__name__)

Inbox = M.AddRequest | M.AbortRequest | M.MoveKV

STEP_RETRIES = 3  # a remote step that fails with every peer alive is retried this often, then its requests fail


class Instance:
    def __init__(self, config: EngineConfig, rank: int, world_size: int, transport: Transport,
                 timeout_s: float = 30.0, tp: TPLeader | None = None) -> None:
        """``tp``: this is the first rank of a tensor-parallel instance (cluster/tp_rank.py)."""
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.transport = transport
        self.policy = LendingPolicy.from_config(config, world_size)

        def allocator(rm):
            # Every rank runs the same config, so the same pool size; the view resizes it as ranks come and go.
            others = [rm.num_blocks] * (world_size - 1)
            return ClusterAllocator(rm, transport, self.policy, self.policy.request_capacity(rm.num_blocks, others),
                                    others, timeout_s)

        self.engine = LLMEngine(config, rank=rank, make_allocator=allocator, tp=tp)
        self.allocator: ClusterAllocator = self.engine.allocator
        self.rm = self.engine.rm
        self.counters = StepCounters()
        self.migrator = self.allocator.migrator = Migrator(self.rm, self.engine.kv, transport, self.counters, timeout_s)
        self.creditor = Creditor(self.rm, self.engine.kv, self.engine.scale, self.policy, self.counters,
                                 self.own_demand)
        self.runner = StepRunner(self.engine, transport, self.counters, timeout_s)
        # prefill groups: this instance's part in one (as a member, its own requests' included), and
        # its own requests prefilled by one (docs/distributed.md "Prefill groups")
        self.guests = GroupGuests(rank, self.engine.model, self.engine.kv, self.engine.scale, transport, timeout_s,
                                  tensor_parallel=tp is not None)
        self.guests.wake = self._wake
        self.groups = GroupPrefills(rank, self.engine, self.allocator, transport, self.guests, timeout_s,
                                    lambda: self.allocator.lost)
        self.timeout_s = timeout_s
        self._inbox: deque[Inbox] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-compute")
        self.stopping = False
        self._resend_placement = True  # the next beat carries every request's placement (the first, or after a lost beat)
        self.step_timer = device_timer(config.torch_device())  # a step's time is the device's (synchronized)
        self._step_context = 0  # tokens held (blocks in use x block size) when the step being run began
        self._resend_prefixes = False  # the next heartbeat carries every prefix anchor (the last was lost)
        self._step_calls = 0  # remote calls per layer of the step being run
        self.view = InstanceView(self)
        self.draining = False  # leaving the cluster: takes no new request
        self.leave_reason: str | None = None  # set when asked to leave (SIGTERM, the admin endpoint)
        self.exit_code = 0  # non-zero when this rank stops because it lost the cluster

    # ---- inbox (filled from transport threads, applied on the compute thread) ---------------
    def enqueue(self, item: Inbox) -> None:
        if isinstance(item, M.AbortRequest) and item.request_id in self.groups.active:
            # its group's round may be waiting on this compute thread: end it now, the abort follows
            self.guests.close((self.rank, item.request_id))
        self._inbox.append(item)
        self._wake()

    def request_stop(self) -> None:
        self.stopping = True
        self._wake()

    def request_leave(self, reason: str) -> None:
        """Any thread: leave the cluster gracefully; the rank's main runs the drain (leave.py)."""
        if self.leave_reason is None:
            self.leave_reason = reason

    def apply_view(self, view: M.ClusterView) -> None:
        """Any thread: rank 0's membership changed; applied between two steps."""
        if self.view.offer(view):
            self._wake()

    def fence(self, reason: str) -> None:
        """The cluster has declared this rank gone (its work was recomputed elsewhere): stop."""
        if not self.stopping:
            log.error("rank %d: %s: stopping", self.rank, reason)
            self.exit_code = 1
            self.request_stop()

    def _wake(self) -> None:
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _apply_inbox(self) -> None:
        e = self.engine
        self.view.apply()
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, M.AddRequest):
                if self.draining:
                    continue  # rank 0 moves every request homed here once it hears we are leaving
                try:
                    req = e.build_request(item.request_id, item.prompt_token_ids, item.params, item.max_tokens,
                                          item.prompt)
                    req.output_kind = "delta"  # homes send rank 0 what is new; rank 0 assembles (FrontDoor)
                    recovery.restore_progress(req, item)
                    if item.prefix_holder >= 0 and item.prefix_holder != self.rank:
                        req.prefix_hint = (item.prefix_holder, item.prefix_blocks)
                    if item.group is None or not self.groups.begin(req, item.group):
                        e.submit(req)
                except Exception as err:  # noqa: BLE001 - surfaced to the client as a failed request
                    log.exception("rank %d: cannot add %s", self.rank, item.request_id)
                    self._send(failures=[M.RequestFailure(item.request_id, f"cannot add the request: {err}",
                                                          "invalid")])
            elif isinstance(item, M.AbortRequest):
                if not self.groups.abort(item.request_id):
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
        """Free blocks this instance keeps for itself (its queue, its running requests' growth).
        The queue counts up to its first request larger than the whole pool (LendingPolicy.
        queue_demand): only loans can run that one, and first come first served, nothing behind it
        starts first; if every instance kept its pool for such a queue none would lend and none
        would run (tests/test_liveness.py, tests/test_policy.py)."""
        sched = self.engine.scheduler
        bs = self.engine.block_size
        waiting = self.policy.queue_demand((blocks_for(r.num_tokens + 1, bs) for r in list(sched.waiting)),
                                           self.rm.num_blocks)
        running = [(r.num_tokens, r.num_prompt_tokens + r.max_tokens, self.rm.num_held(r.request_id))
                   for r in list(sched.running)]
        return self.policy.own_demand(waiting, running, bs)

    # ---- the step loop --------------------------------------------------------------------------
    @torch.inference_mode()
    def _begin_step(self):
        """Schedule; a step with no remote blocks runs to the end right here."""
        self._apply_inbox()
        self.groups.poll()
        self.migrator.apply_done()
        e = self.engine
        t0 = time.perf_counter()
        batch = e.scheduler.schedule()
        if not batch.requests:
            if e.tp is not None:
                e.tp.idle()
            return None
        e.timing.schedule_s += time.perf_counter() - t0
        self._step_context = (self.rm.num_blocks - self.rm.num_free) * self.engine.block_size
        self._step_calls = 0
        t1 = time.perf_counter()
        e.input_batch.sync(batch.requests)
        if self.rm.num_borrowed == 0 or not any(e.input_batch.has_remote(r.request_id) for r in batch.requests):
            return batch, None, e.execute(batch)
        mbs = self.runner.micro_batches(batch, since=t1)
        self._step_calls = sum(len(mb.parts) for mb in mbs)
        if len(mbs) == 1 or e.tp is not None:
            try:
                if e.tp is not None:  # the group runs the micro-batches in lockstep (tp_commands.py)
                    return batch, None, run_remote(self.runner, e.tp, batch, mbs)
                return batch, None, self.runner.run_blocking(batch, mbs[0])
            except Exception as err:
                raise RemoteStepFailed(mbs, err) from err
        return batch, mbs, None

    async def run(self) -> None:
        """The instance's step loop; returns when stopped."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        failures = 0
        while not self.stopping:
            try:
                if self.guests.ready():  # a round of the prefill group this instance is in, between own steps
                    await loop.run_in_executor(self.executor, self.guests.run_round)
                self.step_timer.start()
                res = await loop.run_in_executor(self.executor, self._begin_step)
                if res is None:
                    self._wakeup.clear()
                    if self._inbox or self.guests.ready():
                        continue
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout=0.05)
                    except asyncio.TimeoutError:
                        pass
                    continue
                batch, mbs, outs = res
                if mbs is not None:
                    try:
                        outs = await self.runner.run(batch, mbs, self.executor)
                    except Exception as err:
                        raise RemoteStepFailed(mbs, err) from err
                dt = self.step_timer.elapsed()
                self.engine.last_step_time = dt
                self.counters.step_done(dt, self._step_calls, batch_size=len(batch.requests),
                                        context_tokens=self._step_context,
                                        decode=all(n == 1 for n in batch.num_new_tokens))
                if outs:
                    self._send(outputs=outs)
                failures = 0
            except Exception as err:  # noqa: BLE001 - keep serving
                if isinstance(err, GroupError) or isinstance(getattr(err, "cause", None), GroupError):
                    # a rank of this tensor-parallel instance is gone: the instance is; the cluster
                    # recomputes its requests on the survivors
                    self.fence(f"its tensor-parallel group failed ({short_error(err)})")
                    break
                failures += 1
                if isinstance(err, RemoteStepFailed) and is_stale(err.cause) and failures < STEP_RETRIES:
                    log.info("rank %d: %s", self.rank, err.cause)
                    continue  # the next step sends the creditors whole rows
                remote = isinstance(err, RemoteStepFailed) and _peer_unreachable(err.cause)
                if remote and await self._survive(err.cause, err.creditors, failures):
                    continue  # the next step recomputes what the lost rank held (or simply retries)
                log.exception("rank %d: step failed", self.rank)
                reason = "timeout" if remote else "internal"
                await loop.run_in_executor(self.executor, self._fail_running, "the step failed on rank "
                                           f"{self.rank}; see its log", reason)

    async def _survive(self, err: BaseException, ranks: list[int], failures: int) -> bool:
        """A remote step failed without an answer from a creditor (gone, or stalled past the
        timeout): rank 0 checks the creditors; a dead one leaves the cluster and its blocks'
        requests are recomputed at the next step. True if the step's requests live on."""
        loop = asyncio.get_running_loop()
        log.warning("rank %d: a remote step failed (%s); asking rank 0 to check ranks %s", self.rank,
                    short_error(err), ranks)
        try:
            msg = M.Suspect(self.rank, ranks, short_error(err))
            view = await to_asyncio(self.transport.suspect(msg, timeout=PING_S * len(ranks) + 5.0), loop)
        except Exception:  # noqa: BLE001 - rank 0 unreachable too: this rank will stop on its own
            log.warning("rank %d: rank 0 did not answer the suspicion", self.rank, exc_info=True)
            return False
        self.apply_view(view)
        if set(ranks) & set(view.lost) or failures < STEP_RETRIES:
            return True
        return False

    def _fail_running(self, message: str, reason: str = "internal") -> None:
        e = self.engine
        failed = [r.request_id for r in list(e.scheduler.running) + list(e.scheduler.waiting)]
        for rid in failed:
            e.abort_request(rid)
        if failed:
            self._send(failures=[M.RequestFailure(rid, message, reason) for rid in failed])

    def send_failures(self, failures: list[M.RequestFailure]) -> None:
        self._send(failures=failures)

    def _send(self, outputs: list[RequestOutput] = (), failures: list[M.RequestFailure] = ()) -> None:
        fut = self.transport.outputs(M.Outputs(self.rank, list(outputs), list(failures)))
        fut.add_done_callback(_log_failure("sending outputs to rank 0"))

    def close(self) -> None:
        if self.engine.tp is not None and self.exit_code == 0:
            try:
                self.engine.tp.stop()  # the group's other ranks exit with us
            except Exception:  # noqa: BLE001 - a rank of the group is gone already
                log.warning("rank %d: stopping its tensor-parallel group failed", self.rank, exc_info=True)
        self.creditor.close()
        self.guests.close_all()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- heartbeats -------------------------------------------------------------------------------
    def heartbeat(self) -> M.Heartbeat:
        """Counters, the decode steps measured since the last beat, and the placement entries that
        changed since then: O(requests that changed + batch), never O(blocks held) — the counts
        are kept on change by the rManager, no table is walked or copied."""
        full, self._resend_placement = self._resend_placement, False
        changed, removed = self.rm.placement_changes(everything=full)
        reqs = self.engine.requests
        entries = [M.PlacementEntry(rid, _context(reqs.get(rid)), counts) for rid, counts in changed.items()]
        everything, self._resend_prefixes = self._resend_prefixes, False
        added, gone = self.rm.take_anchor_changes(everything)  # the prefix cache's anchors, as a diff
        return M.Heartbeat(self.stats(walk=self._idle()), entries, removed, self.counters.take_decode_steps(), full,
                           added, gone, everything)

    def _idle(self) -> bool:
        """Nothing queued, running or arriving: a walk of the tables then finds only leaks."""
        sched = self.engine.scheduler
        return not sched.running and not sched.waiting and not self._inbox

    def on_heartbeat_reply(self, reply: M.HeartbeatReply) -> None:
        self.allocator.borrowable = reply.borrowable
        self.allocator.loans_pay = reply.loans_pay
        self.allocator.lends_for_throughput = reply.lends_for_throughput
        if reply.evicted:
            self.fence("rank 0 says this rank was removed from the cluster (declared dead)")
        elif reply.view is not None:
            self.apply_view(reply.view)

    def forget_sent_placement(self) -> None:
        """The last beat may not have arrived: the next one resends the whole placement (and every
        prefix anchor)."""
        self._resend_placement = True
        self._resend_prefixes = True

    def stats(self, walk: bool = True) -> M.InstanceStats:
        """Counters (O(batch + queue), kept on change), plus the walked tallies of the tables and
        lent lists when ``walk`` (O(tables): a heartbeat walks only when idle)."""
        e = self.engine
        rm = self.rm.stats()
        running = list(e.scheduler.running)
        waiting = list(e.scheduler.waiting)
        # requests routed here that the step loop has not taken in yet count as waiting: the
        # gManager forgets what it routed here at each beat, so a beat that missed them would
        # make this instance look emptier than it is and draw a burst's requests to it
        arrived = [i for i in list(self._inbox) if isinstance(i, M.AddRequest)]
        c = self.counters
        return M.InstanceStats(
            **rm,
            num_running=len(running),
            num_waiting=len(waiting) + len(arrived),
            waiting_blocks=sum(blocks_for(r.num_tokens + 1, e.block_size) for r in waiting)
            + sum(blocks_for(len(i.prompt_token_ids) + len(i.output_token_ids) + 1, e.block_size) for i in arrived),
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
            decode_remote_calls=c.decode_remote_calls,
            decode_remote_wait_ms=1e3 * c.decode_remote_wait_s,
            decode_served_calls=c.decode_served_calls,
            decode_served_ms=1e3 * c.decode_served_s,
            migrations=c.migrations,
            migrated_blocks=c.migrated_blocks,
            lend_cap=self.policy.lend_cap(self.rm.num_blocks),
            torch_threads=torch.get_num_threads(),
            demand_blocks=self.own_demand(),
            remote_wait_per_call_ms=1e3 * c.recent_wait_per_call_s,
            remote_calls_per_step=c.mean_calls_per_layer,
            recomputed=self.view.recomputed,
            prefill_groups=self.groups.done,
            group_recomputes=self.groups.fallbacks,
            group_compute_ms=1e3 * self.guests.compute_s,
            group_wait_ms=1e3 * self.guests.wait_s,
            groups=[r.stat() for r in list(self.groups.records)],
            **e.prefix_stats(),
            prefix_cache_remote_hits=self.allocator.prefix_loan_tokens,
            prefix_copies=self.allocator.prefix_copies,
            **(self.rm.walk() if walk else {}),
        )


def _context(req: Request | None) -> int:
    """A placement entry's context: the tokens of a running request (0 while it waits)."""
    return req.num_tokens if req is not None and req.status is Status.RUNNING else 0


class RemoteStepFailed(Exception):
    """A step with blocks on creditors failed; ``creditors`` are the ranks it called."""

    def __init__(self, mbs: list, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.creditors = sorted({p.creditor for mb in mbs for p in mb.parts})
        self.cause = cause


def _peer_unreachable(err: BaseException) -> bool:
    """A creditor gave no answer (gone, or stalled past the timeout) rather than an error of its own:
    a transport failure, or a point-to-point stream that broke (PeerError "rank_lost")."""
    return not isinstance(err, PeerError) or err.reason == "rank_lost"


def _log_failure(what: str):
    def cb(fut) -> None:
        try:
            fut.value()
        except Exception:  # noqa: BLE001
            log.warning("%s failed", what, exc_info=True)

    return cb
