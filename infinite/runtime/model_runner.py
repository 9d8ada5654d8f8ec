"""One forward step of a scheduled batch on one instance.

The model is run layer by layer as pre_attention -> attention -> post_attention;
attention is whatever `Attention` object the caller passes: locally it is
MicroAttention over the local blocks followed by AggregationAttention (even with
one part, so that spreading the KV over instances changes no math).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from infinite.attention import MAMetadata, aggregate, micro_attention, write_kv
from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RBlock, blocks_for
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
    slot_mapping: torch.Tensor  # [T] int64, local slots of the new tokens
    meta: MAMetadata  # local part
    logits_indices: torch.Tensor  # [S] index in T of the last token of each sampling request
    sample_requests: list[Request]
    q_lens: list[int]
    q_starts: list[int]
    # Rows past the sampling ones in logits_indices: prompt positions whose logprobs were asked.
    prompt_spans: list[PromptLogprobSpan] = field(default_factory=list)


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class LocalAttention:
    """All blocks of every request in the batch live in this instance's pool."""

    def __init__(self, kv: KVCache, inputs: StepInputs, scale: float) -> None:
        self.kv, self.inputs, self.scale = kv, inputs, scale

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        write_kv(kc, vc, k, v, self.inputs.slot_mapping)
        part = micro_attention(q, kc, vc, self.inputs.meta, self.scale)
        out, _ = aggregate([part])
        return out  # [T, nh, d]


def prepare_inputs(
    requests: list[Request],
    num_new_tokens: list[int],
    tables: list[list[RBlock]],
    rank: int,
    block_size: int,
    device: torch.device,
) -> StepInputs:
    """Flatten the batch: token ids, positions, local slots and the local MA metadata."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    blocks: list[list[int]] = []
    logical: list[list[int]] = []
    logits_idx: list[int] = []
    sample: list[Request] = []
    q_starts: list[int] = []
    prompt_rows: list[int] = []
    spans: list[PromptLogprobSpan] = []
    for req, n, table in zip(requests, num_new_tokens, tables):
        start = req.num_computed_tokens
        end = start + n
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
            bi = p // block_size
            hi = min(end, (bi + 1) * block_size)
            ref = table[bi]
            if ref.instance == rank:
                shift = (ref.block - bi) * block_size  # slot = block * B + p % B
                slots.extend(range(p + shift, hi + shift))
            else:
                slots.extend([-1] * (hi - p))
            p = hi
        nb = blocks_for(end, block_size)
        li: list[int] = []
        bl: list[int] = []
        for i, ref in enumerate(table[:nb]):
            if ref.instance == rank:
                li.append(i)
                bl.append(ref.block)
        logical.append(li)
        blocks.append(bl)
        q_starts.append(start)
        if end == req.num_tokens:
            logits_idx.append(len(ids) - 1)
            sample.append(req)
    meta = MAMetadata.build(num_new_tokens, q_starts, blocks, logical, device=device)
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        meta=meta,
        logits_indices=torch.tensor(logits_idx + prompt_rows, dtype=torch.int64, device=device),
        sample_requests=sample,
        q_lens=list(num_new_tokens),
        q_starts=q_starts,
        prompt_spans=spans,
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
                        [r for inp in parts for r in inp.sample_requests], [], [], spans)
    return merged, torch.cat(samples + prompts)


@torch.inference_mode()
def forward(model, inputs: StepInputs, attention: Attention) -> torch.Tensor:
    """Run every layer; return logits [S, V] float32 of the sampling requests."""
    h = model.embed(inputs.input_ids)  # [T, H]
    for i in range(model.config.num_layers):
        q, k, v = model.pre_attention(i, h, inputs.positions)  # [T,nh,d], [T,nkv,d], [T,nkv,d]
        o = attention(i, q, k, v)  # [T, nh, d]
        h = model.post_attention(i, h, o)
    if inputs.logits_indices.numel() == 0:
        return torch.empty(0, model.config.vocab_size)
    return model.compute_logits(h.index_select(0, inputs.logits_indices))
