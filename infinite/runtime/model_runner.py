"""One forward step of a scheduled batch on one instance.

The model is run layer by layer as pre_attention -> attention -> post_attention;
attention is whatever `Attention` object the caller passes: locally it is one
MicroAttention over the local blocks (with a single part, its output is the
exact attention: no AggregationAttention is needed).

Step inputs are built from the persistent batch (``InputBatch``): rows are
the running requests in the batch's own order, a step's block metadata is a
view of rows ``0..n-1`` of the device tables, and the host work is O(tokens in
the step), never O(blocks held).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from infinite.attention import MAMetadata, micro_attention
from infinite.kv.cache import KVCache
from infinite.model.ops import KVWrite
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.request import Request


@dataclass
class PromptLogprobSpan:
    """Rows of the step's logits that score prompt tokens: logits row ``row + i`` (counted after
    the sampling rows) predicts prompt token ``first + 1 + i`` of ``request``."""

    request: Request
    first: int  # prompt position of the first row
    count: int
    row: int


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, local slots of the new tokens (-1: the block is remote)
    meta: MAMetadata  # local part
    logits_indices: torch.Tensor  # [S] index in T of the last token of each sampling request
    sample_requests: list[Request]
    q_lens: list[int]  # per row of the step
    q_starts: list[int]
    max_position: int = 0  # largest of positions (host-known: RoPE needs no device sync)
    # Rows past the sampling ones in logits_indices: prompt positions whose logprobs were asked.
    prompt_spans: list[PromptLogprobSpan] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)  # per row of the step
    rows: list[int] = field(default_factory=list)  # the InputBatch row of each step row
    padded: int | None = None  # a decode step padded to this graph size (GraphRunner runs it)

    @property
    def is_decode(self) -> bool:
        """Every row has exactly one query token and samples: a CUDA graph can run it."""
        return self.meta.max_q_len == 1 and len(self.sample_requests) == len(self.q_lens) and not self.prompt_spans


class Attention(Protocol):
    def kv_write(self, layer: int) -> KVWrite | None:
        """Where the model writes the layer's new K/V (fused with RoPE), or None."""
        ...

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class LocalAttention:
    """All blocks of every request in the batch live in this instance's pool."""

    def __init__(self, kv: KVCache, inputs: StepInputs, scale: float) -> None:
        self.kv, self.inputs, self.scale = kv, inputs, scale

    def kv_write(self, layer: int) -> KVWrite:
        return self.kv.k[layer], self.kv.v[layer], self.inputs.slot_mapping

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = micro_attention(q, self.kv.k[layer], self.kv.v[layer], self.inputs.meta, self.scale)
        return out  # [T, nh, d]


def token_at(req: Request, pos: int) -> int:
    p = len(req.prompt_token_ids)
    return req.prompt_token_ids[pos] if pos < p else req.output_token_ids[pos - p]


def prepare_inputs(
    ib: InputBatch,
    num_new: dict[str, int],
    device: torch.device,
    rows: list[int] | None = None,
) -> StepInputs:
    """Flatten the step: token ids, positions, local slots and the local MA metadata.

    ``num_new``: request id -> tokens scheduled this step (rows not in it get no query).
    ``rows``: the InputBatch rows of this step, in order (default: all of them, 0..n-1, whose
    block tables are then a view; a subset, as a cluster's micro-batch, gathers its rows)."""
    bs = ib.block_size
    rank = ib.rank
    all_rows = rows is None
    if all_rows:
        rows = list(range(ib.num_rows))
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    q_lens: list[int] = []
    q_starts: list[int] = []
    logits_idx: list[int] = []
    sample: list[Request] = []
    reqs: list[Request] = []
    prompt_rows: list[int] = []
    spans: list[PromptLogprobSpan] = []
    max_pos = 0
    for row in rows:
        req = ib.requests[row]
        reqs.append(req)
        n = num_new.get(req.request_id, 0)
        start = req.num_computed_tokens
        q_lens.append(n)
        q_starts.append(start)
        if n == 0:
            continue
        end = start + n
        table = ib.refs(row)
        if n == 1:  # decode: one token, one table lookup
            ids.append(token_at(req, start))
            pos.append(start)
            ref = table[start // bs]
            slots.append(ref.block * bs + start % bs if ref.instance == rank else -1)
        else:
            if req.num_prompt_logprobs_missing:
                # Positions [lo, hi) score prompt tokens lo+1..hi; ones scored before a preemption are skipped.
                lo = max(start, len(req.prompt_logprobs))
                hi = min(end, req.num_prompt_tokens - 1)
                if hi > lo:
                    spans.append(PromptLogprobSpan(req, lo, hi - lo, len(prompt_rows)))
                    prompt_rows.extend(range(len(ids) + lo - start, len(ids) + hi - start))
            ids.extend(req.token_slice(start, end))
            pos.extend(range(start, end))
            p = start
            while p < end:  # one range per block, not one Python step per token (long prefills)
                bi = p // bs
                hi = min(end, (bi + 1) * bs)
                ref = table[bi]
                if ref.instance == rank:
                    shift = (ref.block - bi) * bs  # slot = block * B + p % B
                    slots.extend(range(p + shift, hi + shift))
                else:
                    slots.extend([-1] * (hi - p))
                p = hi
        max_pos = max(max_pos, end - 1)
        if end == req.num_tokens:
            logits_idx.append(len(ids) - 1)
            sample.append(req)
    ib.upload()
    meta = step_metadata(ib, rows if not all_rows else None, q_lens, torch.tensor(pos, dtype=torch.int64, device=device))
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=meta.q_pos,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_idx + prompt_rows, dtype=torch.int64, device=device),
        sample_requests=sample,
        q_lens=q_lens,
        q_starts=q_starts,
        max_position=max_pos,
        prompt_spans=spans,
        requests=reqs,
        rows=rows,
    )


class DecodeBuffers:
    """Inputs of a pure decode step, [3, max_rows] int64 (token ids, positions, slots), on the host and
    on the device; one copy per step moves them. A captured CUDA graph reads the device rows as its
    static inputs, so a decode step writes its inputs exactly where every replay reads them."""

    def __init__(self, max_rows: int, device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"
        self.host_t = torch.zeros(3, max_rows, dtype=torch.int64, pin_memory=pin)
        self.host = self.host_t.numpy()
        self.dev = self.host_t if device.type == "cpu" else self.host_t.to(device)  # [3, max_rows]
        self.host[2] = -1  # padding rows write no KV
        self.cu_q = torch.arange(max_rows + 1, dtype=torch.int32, device=device)  # one query per row
        self.arange = torch.arange(max_rows, dtype=torch.int64, device=device)

        # Views of the buffers by batch size (and table width), made once: a step then creates no tensor
        # objects for its inputs. (The MAMetadata stays new per step: backends cache per-step plans on it.)
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def upload(self, width: int) -> None:
        if self.dev is not self.host_t:
            self.dev[:, :width].copy_(self.host_t[:, :width], non_blocking=True)

    def views(self, n: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, slots, cu_q, logits_indices) of an n-row decode step."""
        v = self._views.get(n)
        if v is None:
            v = self._views[n] = (self.dev[0, :n], self.dev[1, :n], self.dev[2, :n], self.cu_q[: n + 1],
                                  self.arange[:n])
        return v

    def table_views(self, ib: InputBatch, n: int, width: int) -> tuple[torch.Tensor, ...]:
        """(block_tables, block_idx, num_blocks) of rows 0..n-1, ``width`` entries wide."""
        key = (n, width)
        v = self._tables.get(key)
        if v is None:
            if len(self._tables) > 4096:
                self._tables.clear()
            v = self._tables[key] = (ib.block_tables[:n, :width], ib.block_idx[:n, :width], ib.num_blocks[:n])
        return v


def prepare_decode(ib: InputBatch, buf: DecodeBuffers, pad_to: int | None = None) -> StepInputs | None:
    """The step's inputs when every row decodes one token and samples it, and every block is local
    (the common step); None when that is not the case. Writes ``buf`` rows ``0..n-1`` (and pads
    ``n..pad_to-1`` with rows that see no key and write no KV): O(rows), a few numpy ops."""
    reqs = ib.requests
    n = len(reqs)
    toks: list[int] = []
    pos: list[int] = []
    for r in reqs:
        p = r.num_computed_tokens
        out = r.output_token_ids
        prompt = r.prompt_token_ids
        if p + 1 != len(prompt) + len(out):
            return None  # a prefill chunk, or a row without a query
        toks.append(out[-1] if out else prompt[-1])
        pos.append(p)
    h = buf.host
    h[0, :n] = toks
    h[1, :n] = pos
    posn = h[1, :n]
    bs = ib.block_size
    h[2, :n] = ib.bt_np[np.arange(n), posn // bs].astype(np.int64) * bs + posn % bs
    width = n
    if pad_to is not None and pad_to > n:
        h[0, n:pad_to] = 0
        h[1, n:pad_to] = 0
        h[2, n:pad_to] = -1
        width = pad_to
    ib.upload()
    buf.upload(width)
    ids, positions, slots, cu_q, logits_idx = buf.views(n)
    bt, bi, nb = buf.table_views(ib, n, max(1, int(ib.nb_np[:n].max())))
    meta = MAMetadata(cu_q=cu_q, q_pos=positions, block_tables=bt, block_idx=bi, num_blocks=nb, max_q_len=1)
    return StepInputs(
        input_ids=ids,
        positions=positions,
        slot_mapping=slots,
        meta=meta,
        logits_indices=logits_idx,
        sample_requests=list(reqs),
        q_lens=[1] * n,
        q_starts=pos,
        max_position=max(pos),
        requests=list(reqs),
        rows=list(range(n)),
    )


def step_metadata(ib: InputBatch, rows: list[int] | None, q_lens: list[int], positions: torch.Tensor) -> MAMetadata:
    """The local MA metadata of a step over rows ``0..len(q_lens)-1`` (``rows`` None: a view of the
    persistent tables, as wide as the step's longest row) or over the listed rows (gathered)."""
    n = len(q_lens)
    dev = ib.device
    if rows is None:
        width = max(1, int(ib.nb_np[:n].max())) if n else 1
        bt, bi, nb = ib.block_tables[:n, :width], ib.block_idx[:n, :width], ib.num_blocks[:n]
    else:
        width = max(1, int(ib.nb_np[rows].max())) if rows else 1
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        bt = ib.block_tables[:, :width].index_select(0, idx)  # [R, width]: the rows as wide as needed
        bi = ib.block_idx[:, :width].index_select(0, idx)
        nb = ib.num_blocks.index_select(0, idx)
    cu = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu[1:])
    decode_rows, prefill_rows, max_prefill = MAMetadata.mixed_rows(q_lens, dev)  # decode rows split-KV
    return MAMetadata(
        cu_q=torch.from_numpy(cu).to(dev),
        q_pos=positions,
        block_tables=bt,
        block_idx=bi,
        num_blocks=nb,
        max_q_len=max(q_lens, default=0),
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
        max_prefill_q_len=max_prefill,
    )


def merge_logits(parts: list[StepInputs], logits: list[torch.Tensor]) -> tuple[StepInputs, torch.Tensor]:
    """Micro-batches' outputs as one step's: sampling rows of all first, then prompt rows.

    Returns a StepInputs carrying only what postprocessing reads (sample_requests,
    prompt_spans) and the logits in that order."""
    samples, prompts, spans = [], [], []
    offset = 0
    for inp, lg in zip(parts, logits):
        s = len(inp.sample_requests)
        samples.append(lg[:s])
        prompts.append(lg[s:])
        spans.extend(PromptLogprobSpan(sp.request, sp.first, sp.count, sp.row + offset) for sp in inp.prompt_spans)
        offset += lg.shape[0] - s
    empty = torch.empty(0, dtype=torch.int64)
    merged = StepInputs(empty, empty, empty, parts[0].meta, empty,
                        [r for inp in parts for r in inp.sample_requests], [], [], prompt_spans=spans)
    return merged, torch.cat(samples + prompts)


@torch.inference_mode()
def forward(model, inputs: StepInputs, attention: Attention) -> torch.Tensor:
    """Run every layer; return logits [S, V] float32 of the sampling (and prompt-logprob) rows."""
    h = model.embed(inputs.input_ids)  # [T, H]
    res = None
    rot = model.rotary(inputs.positions, inputs.max_position)
    for i in range(model.config.num_layers):
        q, k, v, res = model.pre_attention(i, h, res, rot, attention.kv_write(i))  # [T,nh,d], [T,nkv,d] x2, [T,H]
        o = attention(i, q, k, v)  # [T, nh, d]
        h, res = model.post_attention(i, o, res)
    idx = inputs.logits_indices
    if idx.numel() == 0:
        return torch.empty(0, model.config.vocab_size, device=h.device)
    return model.compute_logits(h.index_select(0, idx), res.index_select(0, idx))
