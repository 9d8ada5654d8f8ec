"""The debtor side of a step: a batch whose requests hold blocks on creditors.

Each layer runs pre_attention, writes the new K/V where their blocks live,
sends every creditor its queries (one call per creditor per layer), runs the
local MicroAttention meanwhile, then merges the parts (AggregationAttention)
and runs post_attention. The batch is cut into micro-batches so that while
one waits on its creditors, the other computes.

``forward`` is the one forward pass, written as a generator that yields the
creditor futures it needs and receives their results; how it waits is the
driver's business: ``forward_blocking`` waits on the compute thread (a lone
micro-batch has nothing to overlap, and two thread hand-offs per layer
fewer), ``forward_async`` awaits on the event loop so micro-batches
interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Generator
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from infinite.attention import micro_attention
from infinite.cluster import messages as M
from infinite.cluster.counters import StepCounters
from infinite.cluster.remote_attention import RemotePart, RemoteWire, merge_parts
from infinite.cluster.transport import Future, Transport, to_asyncio, wait_all
from infinite.outputs import RequestOutput
from infinite.runtime.engine import LLMEngine
from infinite.runtime.model_runner import StepInputs, merge_logits, prepare_inputs
from infinite.runtime.scheduler import ScheduledBatch

Forward = Generator[list[Future], list[M.AttentionResultTensors], torch.Tensor]


@dataclass
class MicroBatch:
    inputs: StepInputs
    parts: list[RemotePart]
    key: M.StepKey  # names this micro-batch's metadata on its creditors


class StepRunner:
    def __init__(self, engine: LLMEngine, transport: Transport, counters: StepCounters,
                 timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.transport = transport
        self.counters = counters
        self.rank = engine.rank
        self.timeout_s = timeout_s
        self._step_ids = itertools.count()
        self.wire = RemoteWire(self.rank)  # what each creditor holds of our rows
        self._prepare_s = 0.0  # host time of the step being run, up to its micro-batches

    @staticmethod
    def creditors(mbs: list[MicroBatch]) -> list[int]:
        return sorted({p.creditor for mb in mbs for p in mb.parts})

    def micro_batches(self, batch: ScheduledBatch, since: float | None = None) -> list[MicroBatch]:
        """Requests with remote blocks apart from local-only ones (those never wait on a creditor);
        a batch that is all remote is cut in two, so one half's FFN overlaps the other's remote MA.
        O(rows x creditors + new tokens): the remote parts come from the persistent batch's groups.
        ``since``: when the step's preparation began (its host time is counted from there)."""
        t0 = time.perf_counter() if since is None else since
        e = self.engine
        ib = e.input_batch
        num_new = {r.request_id: n for r, n in zip(batch.requests, batch.num_new_tokens)}
        rows = [ib.row_of[r.request_id] for r in batch.requests]
        n = len(rows)
        remote = [i for i, r in enumerate(batch.requests) if ib.has_remote(r.request_id)]
        local = sorted(set(range(n)) - set(remote))
        if remote and local:
            groups = [remote, local]
        elif n >= 2:
            groups = [list(range(0, (n + 1) // 2)), list(range((n + 1) // 2, n))]
        else:
            groups = [list(range(n))]
        step = next(self._step_ids)
        out = []
        try:
            for gi, g in enumerate(groups):
                inputs = prepare_inputs(ib, num_new, e.device, rows=[rows[i] for i in g])
                parts = self.wire.parts(ib, inputs.rows, inputs.q_lens, inputs.q_starts)
                out.append(MicroBatch(inputs, parts, M.StepKey(self.rank, step, gi)))
            self.wire.attach_drops([p for mb in out for p in mb.parts], ib.take_remote_dropped(), ib)
        except BaseException:
            self.wire.reset(sorted({c for row in rows for c in ib.remote_groups(row)}))  # some marked sent
            raise
        if e.device.type != "cpu":
            for mb in out:
                mb.parts = [p.to(e.device) for p in mb.parts]
        self._prepare_s = time.perf_counter() - t0
        return out

    # ---- the one forward ----------------------------------------------------------------------
    def forward(self, mb: MicroBatch) -> Forward:
        """Layer by layer; yields the creditor futures of each layer, receives their results.

        A step that fails after its first layer went out still sends the remaining layers
        (zeros; results dropped): a creditor serves a step's layers in order, and a stream
        left half-way would take its next step's messages for this one's."""
        e = self.engine
        model = e.model
        sent = 0  # layers whose queries went out
        decode = mb.inputs.meta.max_q_len <= 1  # one query per request: counted apart (stats)
        try:
            h, res = model.embed(mb.inputs.input_ids), None  # [T, H]
            rot = model.rotary(mb.inputs.positions, mb.inputs.max_position)
            cache_write = mb.inputs.slot_mapping  # -1 where the token's block is on a creditor
            for layer in range(e.model_config.num_layers):
                t0 = time.perf_counter()
                q, k, v, res = model.pre_attention(layer, h, res, rot,
                                                   (e.kv.k[layer], e.kv.v[layer], cache_write))
                futs = [self.transport.attention(p.creditor, *p.call(mb.key, layer, q, k, v), timeout=self.timeout_s)
                        for p in mb.parts]
                sent = layer + 1
                local = micro_attention(q, e.kv.k[layer], e.kv.v[layer], mb.inputs.meta, e.scale)
                self.counters.remote_compute_s += time.perf_counter() - t0
                t1 = time.perf_counter()
                results = yield futs
                self.counters.remote_layer(len(futs), time.perf_counter() - t1, decode)
                t0 = time.perf_counter()
                dev = h.device
                parts = [(r.out.to(dev), r.lse.to(dev)) for r in results]
                h, res = model.post_attention(layer, merge_parts(local, mb.parts, parts), res)
                self.counters.remote_compute_s += time.perf_counter() - t0
            idx = mb.inputs.logits_indices
            if idx.numel() == 0:
                return torch.empty(0, e.model_config.vocab_size, device=h.device)
            return model.compute_logits(h.index_select(0, idx), res.index_select(0, idx))
        except BaseException:
            if 0 < sent < e.model_config.num_layers:
                self._finish_streams(mb, sent)
            raise

    def _finish_streams(self, mb: MicroBatch, first: int) -> None:
        c = self.engine.model_config
        q = torch.zeros(mb.inputs.input_ids.numel(), c.num_heads, c.head_dim, dtype=self.engine.kv.k.dtype,
                        device=self.engine.device)
        kv = torch.zeros(q.shape[0], c.num_kv_heads, c.head_dim, dtype=q.dtype, device=q.device)
        futs = [self.transport.attention(p.creditor, *p.call(mb.key, layer, q, kv, kv), timeout=self.timeout_s)
                for layer in range(first, c.num_layers) for p in mb.parts]
        wait_all(futs, on_error=lambda i, err: None)  # the step failed already; only the order matters

    # ---- drivers --------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_blocking(self, mb: MicroBatch) -> torch.Tensor:
        gen = self.forward(mb)
        results = None
        with contextlib.closing(gen):  # a failed wait closes the forward, which finishes its streams
            while True:
                done, value = _advance(gen, results)
                if done:
                    return value
                results = [f.wait() for f in value]

    async def forward_async(self, mb: MicroBatch, executor: Executor) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        gen = self.forward(mb)
        results = None
        try:
            while True:
                done, value = await loop.run_in_executor(executor, _advance_no_grad, gen, results)
                if done:
                    return value
                results = list(await asyncio.gather(*(to_asyncio(f, loop) for f in value)))
        except BaseException:
            await loop.run_in_executor(executor, gen.close)  # on the compute thread, like every hop
            raise

    def run_blocking(self, batch: ScheduledBatch, mb: MicroBatch) -> list[RequestOutput]:
        """A step of one micro-batch, start to end on the compute thread: nothing to overlap its
        waits with, and no hand-off to the event loop and back."""
        t0 = time.perf_counter()
        try:
            logits = self.forward_blocking(mb)
        except BaseException:
            self.wire.reset(self.creditors([mb]))
            raise
        t1 = time.perf_counter()
        outs = self._sample(batch, [mb], [logits])
        self._timed([mb], t1 - t0, time.perf_counter() - t1)
        return outs

    async def run(self, batch: ScheduledBatch, mbs: list[MicroBatch], executor: Executor) -> list[RequestOutput]:
        """A step of several micro-batches: they interleave on the event loop (one's remote
        MicroAttention in flight while another computes), then sampling on the compute thread."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(self.forward_async(mb, executor)) for mb in mbs]
        try:
            logits = await asyncio.gather(*tasks)
        except BaseException:
            # A micro-batch failed (a creditor gone): stop the others at their next hop, so that
            # none writes KV after the step's requests were recomputed elsewhere.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.wire.reset(self.creditors(mbs))  # they may or may not hold the step's diffs
            raise
        t1 = time.perf_counter()
        outs, post_s = await loop.run_in_executor(executor, self._timed_sample, batch, mbs, list(logits))
        self._timed(mbs, t1 - t0, time.perf_counter() - t1, post_s)
        return outs

    def _timed_sample(self, batch: ScheduledBatch, mbs: list[MicroBatch], logits: list[torch.Tensor]
                      ) -> tuple[list[RequestOutput], float]:
        t0 = time.perf_counter()
        return self._sample(batch, mbs, logits), time.perf_counter() - t0

    def _timed(self, mbs: list[MicroBatch], forward_s: float, post_wall_s: float, post_s: float | None = None
               ) -> None:
        """Account a finished step: the engine's step timers (host work: preparing and postprocessing;
        the forward with its waits on creditors apart) and the remote step's wall time."""
        post = post_wall_s if post_s is None else post_s
        decode = all(mb.inputs.is_decode for mb in mbs)
        self.engine.timing.add(decode, self._prepare_s, forward_s + post_wall_s - post, post)
        self.counters.remote_step_s += forward_s + post_wall_s

    def _sample(self, batch: ScheduledBatch, mbs: list[MicroBatch], logits: list[torch.Tensor]) -> list[RequestOutput]:
        # Sampling rows of every micro-batch first, then their prompt-logprob rows.
        merged, all_logits = merge_logits([mb.inputs for mb in mbs], logits)
        self.counters.remote_steps += 1
        return self.engine.postprocess(batch, merged, all_logits)


def _advance(gen: Forward, results: list | None) -> tuple[bool, object]:
    """One hop of the forward: (False, futures to wait on) or (True, logits)."""
    try:
        return False, gen.send(results)
    except StopIteration as stop:
        return True, stop.value


@torch.inference_mode()
def _advance_no_grad(gen: Forward, results: list | None) -> tuple[bool, object]:
    return _advance(gen, results)
