"""One instance of the cluster (one process per GPU or CPU rank).

It runs the non-attention layers for its own batch, keeps its KV pool through
the rManager, borrows blocks from creditors when its pool runs short, and
serves MicroAttention calls for the blocks it lent. Threads: the event loop
(control, heartbeats, awaiting remote attention), one compute thread (all
model math of the own batch, scheduling, migrations), and TensorPipe's
workers (handlers called by other ranks).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from infinite.attention import micro_attention, write_kv
from infinite.cluster import rpc
from infinite.cluster.remote_attention import RemotePart, merge_parts, meta_from_payload, remote_parts
from infinite.kv.rmanager import RBlock, RManager, blocks_for
from infinite.outputs import RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.runtime.model_runner import LocalAttention, StepInputs, forward, prepare_inputs
from infinite.runtime.request import Request
from infinite.runtime.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


class SharedRManager(RManager):
    """The rManager of a cluster instance: the compute thread and RPC handlers both touch it."""

    def __init__(self, rank: int, num_blocks: int, block_size: int) -> None:
        super().__init__(rank, num_blocks, block_size)
        self._lock = threading.RLock()

    def _locked(name: str):  # noqa: N805 - builds the wrappers below
        def method(self, *args, **kwargs):
            with self._lock:
                return getattr(RManager, name)(self, *args, **kwargs)

        method.__name__ = name
        return method

    allocate = _locked("allocate")
    append_remote = _locked("append_remote")
    free_tail = _locked("free_tail")
    replace_blocks = _locked("replace_blocks")
    swap_out = _locked("swap_out")
    free_request = _locked("free_request")
    lend = _locked("lend")
    release_lent = _locked("release_lent")
    stats = _locked("stats")
    placement = _locked("placement")
    del _locked


@dataclass
class MicroBatch:
    inputs: StepInputs
    parts: list[RemotePart]
    local_rows: torch.Tensor  # [Tl] rows whose new K/V go to the local pool
    local_slots: torch.Tensor  # [Tl]
    key: tuple = ()  # (debtor rank, step, index): names this micro-batch's metadata on creditors


@dataclass
class StepCounters:
    steps: int = 0
    remote_steps: int = 0
    remote_calls: int = 0
    remote_wait_s: float = 0.0  # time a micro-batch waited on creditors after its own local work
    remote_compute_s: float = 0.0  # compute-thread time of steps that had remote parts
    remote_step_s: float = 0.0  # wall time of those steps
    served_calls: int = 0  # MicroAttention calls served for debtors
    served_s: float = 0.0  # time spent serving them
    migrations: int = 0
    migrated_blocks: int = 0
    step_times: deque = field(default_factory=lambda: deque(maxlen=32))


class Instance:
    def __init__(self, config: EngineConfig, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.config = config
        self.engine = LLMEngine(config, rank=rank)
        e = self.engine
        self.rm = SharedRManager(rank, e.rm.num_blocks, e.block_size)
        e.rm = self.rm
        e.scheduler = Scheduler(
            self.rm, config.max_num_seqs, config.max_num_batched_tokens,
            release=self._release, free_blocks=self._free_estimate, grow=self._grow,
        )
        self.lending = config.enable_lending and world_size > 1
        self.lend_cap = int(config.max_lend_fraction * self.rm.num_blocks) if self.lending else 0
        self.borrowable = 0  # blocks the rest of the cluster can still lend us (gManager's last word)
        self._inbox: deque[tuple] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-compute")
        self.serve_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rank}-serve")
        self.counters = StepCounters()
        self.stopping = False
        self._sent_placement: dict[str, tuple[int, tuple]] = {}
        self._step_meta: dict[tuple, object] = {}  # (debtor, step, micro-batch) -> MAMetadata, as creditor
        self._step_ids = itertools.count()

    # ---- capacity -------------------------------------------------------------------
    def _free_estimate(self) -> int:
        return self.rm.num_free + (self.borrowable if self.lending else 0)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Local blocks first; what the pool lacks is borrowed from creditors via the gManager."""
        rid = req.request_id
        need = self.rm.num_needed(rid, num_tokens)
        if need == 0:
            return True
        local = min(need, self.rm.num_free)
        if local:
            try:
                self.rm.allocate(rid, local)
            except MemoryError:  # a concurrent lend took them
                return False
        rest = need - local
        if rest == 0:
            return True
        if not self.lending:
            return False
        try:
            refs = rpc.call_sync(0, rpc.h_borrow, self.rank, rid, rest)
        except Exception:  # noqa: BLE001 - rank 0 unreachable: behave as a lone instance
            log.exception("rank %d: borrowing %d blocks for %s failed", self.rank, rest, rid)
            refs = []
        if not refs:
            # All or nothing: a request left waiting must not sit on blocks it cannot use.
            self.rm.free_tail(rid, local)
            self.borrowable = 0
            return False
        self.rm.append_remote(rid, [RBlock(c, b) for c, b in refs])
        self.borrowable = max(0, self.borrowable - len(refs))
        return True

    def _release(self, req: Request) -> None:
        remote = self.rm.free_request(req.request_id)
        by_creditor: dict[int, list[int]] = {}
        for ref in remote:
            by_creditor.setdefault(ref.instance, []).append(ref.block)
        # Wait for the creditors (one round trip, in parallel) so that the request's end is
        # reported only once its blocks are free everywhere.
        futs = [(c, len(b), rpc.call_async(c, rpc.h_release, self.rank, req.request_id, b))
                for c, b in by_creditor.items()]
        for c, n, fut in futs:
            try:
                fut.wait()
            except Exception:  # noqa: BLE001 - that creditor is gone; its blocks went with it
                log.warning("release of %d blocks on rank %d failed", n, c, exc_info=True)

    # ---- handlers (TensorPipe threads) --------------------------------------------------
    def reserve_for(self, debtor: int, request_id: str, n: int) -> list[int]:
        """try_move_kvcache: first come, first served; [] means refused (wait for the next plan)."""
        if not self.lending or n <= 0:
            return []
        with self.rm._lock:
            if self.rm.num_lent + n > self.lend_cap or n > self.rm.num_free:
                return []
            return self.rm.lend(debtor, request_id, n)

    def release_for(self, debtor: int, request_id: str, blocks: list[int] | None) -> int:
        try:
            return self.rm.release_lent(debtor, request_id, blocks)
        except RuntimeError:
            log.warning("rank %d: release of unknown blocks for %d/%s", self.rank, debtor, request_id)
            return 0

    def write_blocks(self, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Receive migrated blocks: k/v [L, n, B, nkv, d]."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.engine.kv.k.device)
        self.engine.kv.k.index_copy_(1, idx, k.to(self.engine.kv.k.device))
        self.engine.kv.v.index_copy_(1, idx, v.to(self.engine.kv.v.device))

    def serve_micro_attention_async(self, debtor: int, layer: int, payload: tuple) -> torch.futures.Future:
        """Debtors' MicroAttention calls run on one serving thread: its gather buffers are reused
        from layer to layer (a fresh multi-MB buffer per call costs page faults on CPU), and no
        TensorPipe worker is held while it computes."""
        fut: torch.futures.Future = torch.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self.serve_micro_attention(debtor, layer, payload))
            except BaseException as e:  # noqa: BLE001 - travels back to the debtor
                fut.set_exception(e)

        self.serve_executor.submit(run)
        return fut

    @torch.inference_mode()
    def serve_micro_attention(self, debtor: int, layer: int, payload: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        try:
            return self._serve_micro_attention(layer, payload)
        finally:
            self.counters.served_calls += 1
            self.counters.served_s += time.perf_counter() - t0

    def _serve_micro_attention(self, layer: int, payload: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        key, q, new_kv, meta_t = payload
        kv = self.engine.kv
        dev = kv.k.device
        if meta_t is not None:  # layer 0 of a step: keep the metadata for its other layers
            debtor, step = key[0], key[1]
            # A debtor's step that failed midway never sends its last layer: drop what it left.
            for old in [k for k in self._step_meta if k[0] == debtor and k[1] < step - 1]:
                del self._step_meta[old]
            meta = meta_from_payload(meta_t)
            self._step_meta[key] = _meta_to(meta, dev) if dev.type != "cpu" else meta
        meta = self._step_meta[key]
        if layer == self.engine.model_config.num_layers - 1:
            del self._step_meta[key]
        kc, vc = kv.k[layer], kv.v[layer]
        if new_kv is not None:
            k, v, slots = new_kv
            write_kv(kc, vc, k.to(dev), v.to(dev), slots.to(dev))
        out, lse = micro_attention(q.to(dev), kc, vc, meta, self.engine.scale)
        return out.cpu(), lse.cpu()

    def enqueue_add(self, spec: tuple) -> None:
        self._enqueue(("add", spec))

    def enqueue_abort(self, request_id: str) -> None:
        self._enqueue(("abort", request_id))

    def enqueue_move(self, request_id: str, num_blocks: int, dst: int) -> None:
        self._enqueue(("move", request_id, num_blocks, dst))

    def request_stop(self) -> None:
        self.stopping = True
        self._enqueue(("noop",))

    def _enqueue(self, item: tuple) -> None:
        self._inbox.append(item)
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    # ---- compute thread --------------------------------------------------------------------
    def _apply_inbox(self) -> None:
        e = self.engine
        while self._inbox:
            item = self._inbox.popleft()
            if item[0] == "add":
                rid, ids, params, max_tokens, prompt = item[1]
                try:
                    e.submit(e.build_request(rid, ids, params, max_tokens, prompt))
                except Exception as err:  # noqa: BLE001 - surfaced to the client as a failed request
                    log.exception("rank %d: cannot add %s", self.rank, rid)
                    self._send_outputs([_failed_output(rid, ids, prompt, str(err))])
            elif item[0] == "abort":
                e.abort_request(item[1])
            elif item[0] == "move":
                self._migrate(*item[1:])

    def _migrate(self, request_id: str, num_blocks: int, dst: int) -> None:
        """move_kvcache: the request's oldest local blocks go to dst, between two steps."""
        table = self.rm.table(request_id)
        old = [ref for ref in table if ref.instance == self.rank][:num_blocks]
        if not old or dst == self.rank:
            return
        try:
            got = rpc.call_sync(dst, rpc.h_reserve, self.rank, request_id, len(old))
            if not got:
                return  # refused: the gManager's view was stale; wait for the next plan
            idx = torch.tensor([r.block for r in old], dtype=torch.int64, device=self.engine.kv.k.device)
            k = self.engine.kv.k.index_select(1, idx).cpu()  # [L, n, B, nkv, d]
            v = self.engine.kv.v.index_select(1, idx).cpu()
            rpc.call_sync(dst, rpc.h_write_blocks, got, k, v)
        except Exception:  # noqa: BLE001
            log.exception("rank %d: migration of %s to %d failed", self.rank, request_id, dst)
            return
        self.rm.swap_out(request_id, old, [RBlock(dst, b) for b in got])
        self.counters.migrations += 1
        self.counters.migrated_blocks += len(old)

    @torch.inference_mode()
    def _begin_step(self):
        """Schedule and prepare; a step with no remote blocks runs to the end right here."""
        self._apply_inbox()
        e = self.engine
        t0 = time.perf_counter()
        batch = e.scheduler.schedule()
        if not batch.requests:
            return None
        tables = [self.rm.table(r.request_id) for r in batch.requests]
        if all(ref.instance == self.rank for t in tables for ref in t):
            inputs = e.prepare(batch)
            logits = forward(e.model, inputs, LocalAttention(e.kv, inputs, e.scale))
            outs = e.postprocess(batch, inputs, logits)
            self._finish_step(t0)
            return ("done", outs)
        now = time.time()
        for req in batch.requests:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        return ("remote", (batch, self._micro_batches(batch, tables), t0))

    def _micro_batches(self, batch: ScheduledBatch, tables: list[list[RBlock]]) -> list[MicroBatch]:
        """Requests with remote blocks apart from local-only ones (those never wait on a creditor);
        a batch that is all remote is cut in two, so one half's FFN overlaps the other's remote MA."""
        n = len(batch.requests)
        remote = [i for i, t in enumerate(tables) if any(ref.instance != self.rank for ref in t)]
        local = [i for i in range(n) if i not in set(remote)]
        if remote and local:
            groups = [remote, local]
        elif n >= 2:
            groups = [list(range(0, (n + 1) // 2)), list(range((n + 1) // 2, n))]
        else:
            groups = [list(range(n))]
        out = []
        step = next(self._step_ids)
        for gi, g in enumerate(groups):
            reqs = [batch.requests[i] for i in g]
            nums = [batch.num_new_tokens[i] for i in g]
            tabs = [tables[i] for i in g]
            inputs = prepare_inputs(reqs, nums, tabs, self.rank, self.engine.block_size, self.engine.device)
            parts = remote_parts(inputs.q_lens, inputs.q_starts, tabs, self.rank, self.engine.block_size)
            rows = (inputs.slot_mapping >= 0).nonzero().flatten()
            out.append(MicroBatch(inputs, parts, rows, inputs.slot_mapping.index_select(0, rows),
                                  (self.rank, step, gi)))
        return out

    def _finish_step(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.engine.last_step_time = dt
        self.counters.steps += 1
        self.counters.step_times.append(dt)

    @torch.inference_mode()
    def _layer(self, layer: int, h: torch.Tensor | None, mb: MicroBatch, prev):
        """One hop on the compute thread: finish layer-1 (AA + post_attention) with the creditors'
        results, then start `layer` (pre_attention, K/V write, send the creditors their queries,
        local MicroAttention). Returns (h, futures, local part), or (logits, None, None) at the end."""
        t0 = time.perf_counter()
        try:
            return self._layer_work(layer, h, mb, prev)
        finally:
            self.counters.remote_compute_s += time.perf_counter() - t0

    def _layer_work(self, layer: int, h: torch.Tensor | None, mb: MicroBatch, prev):
        e = self.engine
        model = e.model
        if h is None:
            h = model.embed(mb.inputs.input_ids)  # [T, H]
        if prev is not None:
            local, results = prev
            dev = h.device
            results = [(o.to(dev), l.to(dev)) for o, l in results]
            parts = mb.parts if dev.type == "cpu" else [_part_to(p, dev) for p in mb.parts]
            h = model.post_attention(layer - 1, h, merge_parts(local, parts, results))
        if layer == e.model_config.num_layers:
            idx = mb.inputs.logits_indices
            if idx.numel() == 0:
                return torch.empty(0, e.model_config.vocab_size, device=h.device), None, None
            return model.compute_logits(h.index_select(0, idx)), None, None
        q, k, v = model.pre_attention(layer, h, mb.inputs.positions)  # [T,nh,d], [T,nkv,d], [T,nkv,d]
        if mb.local_rows.numel():
            write_kv(e.kv.k[layer], e.kv.v[layer], k.index_select(0, mb.local_rows),
                     v.index_select(0, mb.local_rows), mb.local_slots)
        futs = []
        if mb.parts:
            qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
            futs = [rpc.call_async(p.creditor, rpc.h_remote_attention, self.rank, layer,
                                   p.payload(mb.key, layer, qc, kc, vc))
                    for p in mb.parts]
        local = micro_attention(q, e.kv.k[layer], e.kv.v[layer], mb.inputs.meta, e.scale)
        return h, futs, local

    # ---- the event loop side ----------------------------------------------------------------
    async def _forward_micro_batch(self, mb: MicroBatch) -> torch.Tensor:
        """Layer by layer; while this micro-batch awaits its creditors, the other one computes."""
        loop = asyncio.get_running_loop()
        h, prev = None, None
        for layer in range(self.engine.model_config.num_layers + 1):
            h, futs, local = await loop.run_in_executor(self.executor, self._layer, layer, h, mb, prev)
            if futs is None:
                return h  # logits
            self.counters.remote_calls += len(futs)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(rpc.to_asyncio(f, loop) for f in futs))
            self.counters.remote_wait_s += time.perf_counter() - t0
            prev = (local, list(results))
        raise AssertionError("unreachable: the last layer returns logits")

    def _forward_on_thread(self, mb: MicroBatch) -> torch.Tensor:
        """A lone micro-batch has no other work to overlap with its creditors' attention, so its
        layers run on the compute thread, waiting on the creditors there: two thread hand-offs
        per layer fewer than the asyncio path, and the event loop stays free all the same."""
        h, prev = None, None
        for layer in range(self.engine.model_config.num_layers + 1):
            h, futs, local = self._layer(layer, h, mb, prev)
            if futs is None:
                return h  # logits
            self.counters.remote_calls += len(futs)
            t0 = time.perf_counter()
            results = [f.wait() for f in futs]
            self.counters.remote_wait_s += time.perf_counter() - t0
            prev = (local, results)
        raise AssertionError("unreachable: the last layer returns logits")

    async def _remote_step(self, batch: ScheduledBatch, mbs: list[MicroBatch], t0: float) -> list[RequestOutput]:
        loop = asyncio.get_running_loop()
        if len(mbs) == 1:
            logits = [await loop.run_in_executor(self.executor, self._forward_on_thread, mbs[0])]
        else:
            logits = await asyncio.gather(*(self._forward_micro_batch(mb) for mb in mbs))
        merged = SimpleNamespace(sample_requests=[r for mb in mbs for r in mb.inputs.sample_requests])
        outs = await loop.run_in_executor(
            self.executor, self.engine.postprocess, batch, merged, torch.cat(list(logits))
        )
        self.counters.remote_steps += 1
        self.counters.remote_step_s += time.perf_counter() - t0
        self._finish_step(t0)
        return outs

    async def run(self) -> None:
        """The instance's step loop; returns when stopped."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._wakeup = asyncio.Event()
        while not self.stopping:
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
                kind, payload = res
                outs = payload if kind == "done" else await self._remote_step(*payload)
                if outs:
                    self._send_outputs(outs)
            except Exception:  # noqa: BLE001 - keep serving; the failed step's requests are failed
                log.exception("rank %d: step failed", self.rank)
                await loop.run_in_executor(self.executor, self._fail_running)

    def _fail_running(self) -> None:
        e = self.engine
        failed = []
        for req in list(e.scheduler.running) + list(e.scheduler.waiting):
            out = e.abort_request(req.request_id)
            if out is not None:
                out.outputs[0].finish_reason = "abort"
                failed.append(out)
        if failed:
            self._send_outputs(failed)

    def _send_outputs(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            o.extra["rank"] = self.rank
        fut = rpc.call_async(0, rpc.h_outputs, self.rank, outs)
        fut.add_done_callback(_log_failure("sending outputs to rank 0"))

    # ---- heartbeats --------------------------------------------------------------------------
    def heartbeat(self) -> dict:
        """Free memory, batch, step time, and the placement entries that changed since the last beat."""
        s = self.stats()
        placement = self.rm.placement()
        ctx = {r.request_id: r.num_tokens for r in list(self.engine.scheduler.running)}
        changed = []
        for rid, counts in placement.items():
            key = (ctx.get(rid, 0), tuple(sorted(counts.items())))
            if self._sent_placement.get(rid) != key:
                changed.append((rid, key[0], dict(counts)))
                self._sent_placement[rid] = key
        gone = [rid for rid in self._sent_placement if rid not in placement]
        for rid in gone:
            del self._sent_placement[rid]
        s["placement_changed"] = changed
        s["placement_removed"] = gone
        return s

    def forget_sent_placement(self) -> None:
        self._sent_placement.clear()

    def stats(self) -> dict:
        e = self.engine
        s = self.rm.stats()
        running = list(e.scheduler.running)
        waiting = list(e.scheduler.waiting)
        times = list(self.counters.step_times)
        s.update(
            num_running=len(running),
            num_waiting=len(waiting),
            waiting_blocks=sum(blocks_for(r.num_tokens + 1, e.block_size) for r in waiting),
            tokens_held=sum(r.num_computed_tokens for r in running),
            step_time_ms=1e3 * (sum(times) / len(times)) if times else 0.0,
            num_preemptions=e.scheduler.num_preemptions,
            steps=self.counters.steps,
            remote_steps=self.counters.remote_steps,
            remote_calls=self.counters.remote_calls,
            remote_wait_ms=1e3 * self.counters.remote_wait_s,
            remote_step_ms=1e3 * self.counters.remote_step_s,
            remote_compute_ms=1e3 * self.counters.remote_compute_s,
            served_calls=self.counters.served_calls,
            served_ms=1e3 * self.counters.served_s,
            migrations=self.counters.migrations,
            migrated_blocks=self.counters.migrated_blocks,
            lend_cap=self.lend_cap,
        )
        return s


def _log_failure(what: str):
    def cb(fut) -> None:
        try:
            fut.value()
        except Exception:  # noqa: BLE001
            log.warning("%s failed", what, exc_info=True)

    return cb


def _failed_output(rid: str, ids: list[int], prompt: str | None, message: str) -> RequestOutput:
    from infinite.outputs import CompletionOutput

    return RequestOutput(rid, prompt, ids, [CompletionOutput(0, "", [], finish_reason="abort")], True,
                         extra={"error": message})


def _meta_to(meta, dev):
    from infinite.attention import MAMetadata

    return MAMetadata(meta.cu_q.to(dev), meta.q_pos.to(dev), meta.block_tables.to(dev), meta.block_idx.to(dev),
                      meta.num_blocks.to(dev), meta.max_q_len)


def _part_to(p: RemotePart, dev) -> RemotePart:
    return RemotePart(p.creditor, p.rows.to(dev), p.meta, p.write_rows.to(dev), p.write_slots.to(dev))
