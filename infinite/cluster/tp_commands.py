"""What a tensor-parallel instance's first rank tells its group beyond local steps (runtime/tp.py):
steps with remote blocks (``REMOTE``) and the cost probe (``PROBE``).

A step with remote blocks runs the same micro-batches on every rank of the group; rank i calls
rank i of each creditor group (the same heads, so no gather) with its own queries, over its
own point-to-point streams (cluster/p2p.py). The block metadata every rank sends its creditor
comes from the first rank, with the micro-batches: O(rows + the step's remote blocks), what the
data plane sends the creditor anyway.

Why lockstep: every layer of every micro-batch meets the group's all-reduces, so every rank
must advance the micro-batches in one order (StepRunner.run's asyncio interleave follows
whichever creditor answers first: an order that differs from rank to rank). And a rank whose
creditor fails cannot stop halfway, or the others would wait at the next all-reduce: a failed
call's part counts as empty (out 0, LSE -inf), the forward completes on every rank, and the
group agrees afterwards (one all-reduce) whether the step failed.
"""

from __future__ import annotations

import time

import torch

from infinite.cluster import messages as M
from infinite.cluster.cost_model import CostModel
from infinite.cluster.cost_probe import measure_cost
from infinite.cluster.p2p import meta_ints, parse_meta
from infinite.cluster.remote_attention import RemotePart
from infinite.cluster.step_runner import MicroBatch, StepRunner
from infinite.cluster.transport import STALE_ROWS, PeerError, is_stale
from infinite.model.parallel import TPGroup
from infinite.outputs import RequestOutput
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.scheduler import ScheduledBatch
from infinite.runtime.tp import PROBE, REMOTE, PayloadReader, PayloadWriter, TPLeader, get_step, put_step

# a step's outcome on one rank; the group takes the worst (a refusal of stale diffs: retried with whole rows)
OK, STALE, CREDITOR_FAILED, UNREACHABLE = 0, 1, 2, 3


def put_remote(w: PayloadWriter, mbs: list[MicroBatch]) -> None:
    w.ints([len(mbs)])
    for mb in mbs:
        put_step(w, mb.inputs)
        w.ints([mb.key.debtor, mb.key.step, mb.key.micro_batch, len(mb.parts)])
        for p in mb.parts:
            w.ints([p.creditor, p.rows.numel(), len(p.meta.handles), len(p.meta.blocks), len(p.meta.drop)])
            w.tensor(p.rows)
            w.array(meta_ints(p.meta, None).numpy())
            w.ints([p.write_rows.numel()])
            w.tensor(p.write_rows)
            w.tensor(p.write_slots)


def get_remote(r: PayloadReader, ib: InputBatch) -> list[MicroBatch]:
    """The micro-batches ``put_remote`` wrote, their block metadata from the mirrored tables."""
    mbs = []
    for _ in range(r.int()):
        inputs = get_step(r, ib)
        debtor, step, slot, nparts = (int(x) for x in r.ints(4))
        parts = []
        for _ in range(nparts):
            creditor, nrows, nreq, nentries, ndrop = (int(x) for x in r.ints(5))
            rows = r.tensor(nrows)
            meta, _ = parse_meta(torch.from_numpy(r.array()), nreq, nentries, ndrop, 0)
            nw = r.int()
            parts.append(RemotePart(creditor, rows, meta, r.tensor(nw), r.tensor(nw)))
        mbs.append(MicroBatch(inputs, parts, M.StepKey(debtor, step, slot)))
    return mbs


def outcome(err: BaseException) -> int:
    """A creditor that refused the step's diffs, one that computed and failed (PeerError of its own), or
    one that gave no answer."""
    if is_stale(err):
        return STALE
    return CREDITOR_FAILED if isinstance(err, PeerError) and err.reason != "rank_lost" else UNREACHABLE


@torch.inference_mode()
def lockstep(runner: StepRunner, mbs: list[MicroBatch], group: TPGroup
             ) -> tuple[list[torch.Tensor | None], int, BaseException | None]:
    """Every micro-batch's forward, hop by hop in one fixed order (one's remote calls in flight while
    the next computes) -> (logits per micro-batch, the group's outcome, this rank's first error)."""
    gens = [runner.forward(mb) for mb in mbs]
    futs: list = [None] * len(mbs)
    out: list = [None] * len(mbs)
    live = list(range(len(mbs)))
    code, error = OK, None
    c = runner.engine.model_config
    while live:
        for i in list(live):
            results = None
            if futs[i] is not None:
                results = []
                for part, f in zip(mbs[i].parts, futs[i]):
                    try:
                        results.append(f.wait())
                    except Exception as e:  # noqa: BLE001 - the part is empty; the group decides at the end
                        code, error = max(code, outcome(e)), error or e
                        n = part.rows.numel()
                        results.append(M.AttentionResultTensors(
                            torch.zeros(n, c.num_heads, c.head_dim, dtype=runner.engine.kv.k.dtype,
                                        device=runner.engine.device),
                            torch.full((n, c.num_heads), float("-inf"), device=runner.engine.device)))
            try:
                futs[i] = gens[i].send(results)
            except StopIteration as stop:
                out[i] = stop.value
                live.remove(i)
    return out, group.all_max(code), error


def run_remote(runner: StepRunner, tp: TPLeader, batch: ScheduledBatch, mbs: list[MicroBatch]) -> list[RequestOutput]:
    """The first rank's step with remote blocks: the group gets the micro-batches, all run them in
    lockstep, the first rank samples. Raises (nothing sampled) when any rank's creditor failed."""
    t0 = time.perf_counter()
    tp.send_step(REMOTE, lambda w: put_remote(w, mbs))
    logits, code, err = lockstep(runner, mbs, tp.group)
    if code != OK:
        runner.wire.reset(StepRunner.creditors(mbs))  # they may or may not hold the step's diffs
        if err is not None and outcome(err) == code:
            raise err
        raise PeerError("a creditor of another rank of this tensor-parallel group failed",
                        {UNREACHABLE: "rank_lost", STALE: STALE_ROWS}.get(code, "internal"))
    t1 = time.perf_counter()
    outs = runner._sample(batch, mbs, logits)  # the one way a step with remote blocks samples
    runner._timed(mbs, t1 - t0, time.perf_counter() - t1)
    return outs


def follow_remote(runner: StepRunner, ib: InputBatch, group: TPGroup):
    """The REMOTE handler of the group's other ranks."""
    def handle(r: PayloadReader) -> None:
        lockstep(runner, get_remote(r, ib), group)
    return handle


def measure_group_cost(engine) -> CostModel:
    """The cost probe on an instance's own model; a tensor-parallel group's ranks all run it (its
    forwards hold the group's collectives)."""
    if engine.tp is not None:
        engine.tp.send(PROBE)
    return measure_cost(engine.model, engine.block_size, engine.kv.k.dtype, engine.device)


def follow_probe(worker):
    """The PROBE handler of the group's other ranks."""
    return lambda _: measure_cost(worker.model, worker.block_size, worker.kv.k.dtype, worker.device)
