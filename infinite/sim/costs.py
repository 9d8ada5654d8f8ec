"""Roofline step costs of a tensor-parallel instance, remote MicroAttention and migration.

Pure arithmetic on a ``GpuSpec`` and a ``ModelSpec``; the engine feeds it
what a step does (tokens, context read, attention work per location) and
gets seconds back. Why a roofline: decode is bound by bytes read (weights
once per step, the KV cache of every request), prefill by FLOPs; each part
costs ``max(bytes / bandwidth, FLOPs / peak)`` at the device's achieved
rates. A tensor-parallel group of ``tp`` devices splits weights, heads and
FLOPs ``tp`` ways and pays two ring all-reduces of the hidden state per
layer. Attention a request runs on a creditor costs the debtor one message
per layer and creditor (latency + query/partial bytes + KV written there,
over NVLink inside a node, InfiniBand across nodes) plus the creditor's own
attention time, and it overlaps with the debtor's local attention (both are
awaited together). See docs/sim.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from infinite.sim.gpus import GpuSpec
from infinite.sim.models import ModelSpec

__all__ = ["InstanceHW", "RemotePart", "StepCost", "step_cost", "decode_coeffs", "migration_time", "kv_pool_blocks",
           "weights_fit"]


@dataclass(frozen=True)
class InstanceHW:
    """One instance: ``tp`` devices of one kind running one model; ``nodes`` its devices' nodes."""

    gpu: GpuSpec
    model: ModelSpec
    tp: int
    nodes: tuple[int, ...]
    pp: int = 1  # pipeline stages (one per node), each a TP group of ``tp`` devices
    # per-token coefficients, derived once
    _attn_byte_s: float = field(init=False, repr=False, compare=False)
    _attn_pair_s: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"InstanceHW.tp and pp must be >= 1, got {self.tp}, {self.pp}")
        if not self.nodes:
            raise ValueError("InstanceHW.nodes must name at least one node")
        m = self.model
        object.__setattr__(self, "_attn_byte_s", m.kv_bytes_per_token_layer / (self.tp * self.gpu.bw))
        object.__setattr__(self, "_attn_pair_s", 4 * m.num_heads * m.head_dim / (self.tp * self.gpu.attn_flops))

    @property
    def spans_nodes(self) -> bool:
        """Whether the TP group's all-reduces cross nodes (pipeline stages each sit in one node)."""
        return len(self.nodes) > 1 and self.pp == 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp

    def microbatches(self, requests: int) -> int:
        """Micro-batches a pipeline keeps in flight: one per stage, at most one per request (vLLM
        schedules a request into one micro-batch at a time, so a lone request gains nothing)."""
        return max(1, min(self.pp, requests))

    def handoff_s(self, tokens: float) -> float:
        """Pipeline: a micro-batch's hidden states cross each of the pp-1 stage boundaries (InfiniBand)."""
        if self.pp == 1:
            return 0.0
        g, m = self.gpu, self.model
        return (self.pp - 1) * (g.inter_latency_s + tokens * m.hidden * m.dtype_bytes / g.inter_bw)

    def same_node(self, other: InstanceHW) -> bool:
        """Whether messages between the two instances stay on NVLink (both within one and the same node)."""
        return len(self.nodes) == 1 and self.nodes == other.nodes

    # ---- parts of a step ---------------------------------------------------------------------
    def linear_s(self, tokens: int, sampled: int) -> float:
        """QKV/O projections, MLP and LM head of a step: weights read once, FLOPs per token."""
        m, g = self.model, self.gpu
        read = (m.num_layers * m.layer_params + m.vocab * m.hidden) * m.dtype_bytes / self.tp
        flops = (2 * m.num_layers * m.layer_params * tokens + 2 * m.vocab * m.hidden * sampled) / self.tp
        return max(read / g.bw, flops / g.flops)

    def attention_s(self, read_tokens: float, pairs: float) -> float:
        """One layer of attention over ``read_tokens`` tokens of KV with ``pairs`` (query, key) pairs."""
        return max(read_tokens * self._attn_byte_s, pairs * self._attn_pair_s)

    def allreduce_s(self, tokens: int) -> float:
        """One all-reduce of ``tokens`` hidden states across the group (0 without TP).

        Latency: NCCL's ring (2(tp-1) hops) inside a node; across nodes the cheaper of the ring and
        a tree (log-depth hops inside and across nodes). Bandwidth: a ring moves 2(tp-1)/tp of the
        data over the slowest link."""
        if self.tp == 1 or tokens == 0:
            return 0.0
        g, m = self.gpu, self.model
        steps = 2 * (self.tp - 1)
        if self.spans_nodes:
            ring = steps * g.ring_hop_inter_s
            per_node = max(1, min(self.tp, g.gpus_per_node))
            tree = 2 * (math.ceil(math.log2(per_node)) * g.ring_hop_intra_s
                        + math.ceil(math.log2(len(self.nodes))) * g.ring_hop_inter_s)
            lat, bw = min(ring, tree), g.inter_bw
        else:
            lat, bw = steps * g.ring_hop_intra_s, g.intra_bw
        return g.allreduce_base_s + lat + steps / self.tp * tokens * m.hidden * m.dtype_bytes / bw

    def base_s(self, tokens: int, sampled: int) -> float:
        """Everything in a step but attention: host work, per-layer overheads and all-reduces, linear layers."""
        g, L = self.gpu, self.model.num_layers
        return (g.step_overhead_s + g.request_overhead_s * sampled + L * (g.layer_overhead_s + 2 * self.allreduce_s(tokens))
                + self.linear_s(tokens, sampled))

    @property
    def decode_token_s(self) -> float:
        """One layer of decode attention per context token (read and pairs are equal in decode)."""
        return max(self._attn_byte_s, self._attn_pair_s)


@dataclass(frozen=True, slots=True)
class RemotePart:
    """What one step asks of one creditor: queries sent, KV written there, attention it runs."""

    creditor: InstanceHW
    same_node: bool
    query_tokens: int
    write_tokens: int
    read_tokens: float
    pairs: float


@dataclass(frozen=True)
class StepCost:
    seconds: float
    remote_layer_s: float  # slowest creditor's part of one layer, as the debtor waits for it
    served_s: tuple[float, ...]  # GPU seconds each creditor (in the order given) spends on this step
    local_layer_s: float = 0.0  # the local attention of one layer (what the remote part overlaps with)


def remote_layer_s(debtor: InstanceHW, part: RemotePart) -> tuple[float, float]:
    """(debtor's wait, creditor's attention) for one layer of one creditor's share of a step."""
    m = debtor.model
    lat, bw = debtor.gpu.link(part.same_node)
    nbytes = (part.query_tokens * (m.query_bytes + m.partial_bytes) + part.write_tokens * m.kv_bytes_per_token_layer)
    work = part.creditor.attention_s(part.read_tokens, part.pairs)
    return lat + nbytes / (debtor.tp * bw) + work, work


def decode_coeffs(hw: InstanceHW, requests: int) -> tuple[float, float]:
    """(everything but attention, seconds per layer per local context token) of a step in which
    ``requests`` requests decode one token each: step = base + L·max(g·context, slowest creditor)."""
    m = hw.microbatches(requests)
    return hw.base_s(requests / m, requests / m) + hw.handoff_s(requests / m), hw.decode_token_s / m


def step_cost(hw: InstanceHW, tokens: int, sampled: int, read_tokens: float, pairs: float,
              remote: tuple[RemotePart, ...] = (), borrowed: bool = False, requests: int = 1,
              extra_attention_s: float = 0.0, extra_wait_s: float = 0.0, decode_read: float = 0.0,
              base_s: float | None = None, overlap_s: float = 0.0) -> StepCost:
    """Seconds of one step and the attention work it hands to each creditor.

    ``read_tokens``/``pairs`` are the local attention's KV tokens read and (query, key) pairs
    summed over the batch; ``remote`` one entry per creditor holding part of some request.
    Local and remote attention of a layer run at once, so the layer waits for the slower.
    A pipeline (pp > 1) advances every request once per round: a round lasts as long as one
    micro-batch (1/m of the batch) takes through all stages, the stages working on the others.
    ``extra_attention_s``/``extra_wait_s``: per layer, a prefill group's attention done here and
    its exchange with the other members (awaited with the rest of the layer's attention).
    ``decode_read``: KV tokens the batch's decode rows read here (one query each), apart from the
    prefill rows in ``read_tokens``/``pairs``: decode rows are bound by bytes, prefill rows by FLOPs,
    and a mixed step pays both (their max would price a decode riding along a prefill at nothing).
    ``base_s``/``overlap_s``: a step cut in micro-batches (``SimInstance._micro_batches``): its
    non-attention seconds, and the seconds per layer of one micro-batch's compute that hide the
    other's remote waits (``remote_layer_s`` is then what stays exposed).
    """
    L = hw.model.num_layers
    if hw.pp > 1:
        m = hw.microbatches(requests)
        base = hw.base_s(tokens / m, sampled / m) + hw.handoff_s(tokens / m)
        local = hw.attention_s(read_tokens / m, pairs / m) + hw.attention_s(decode_read / m, decode_read / m)
        return StepCost(base + L * local, 0.0, ())
    slow = 0.0
    served = []
    for part in remote:
        wait, work = remote_layer_s(hw, part)
        slow = max(slow, wait)
        served.append(L * work)
    slow = max(0.0, slow - overlap_s)
    local = hw.attention_s(read_tokens, pairs) + hw.attention_s(decode_read, decode_read) + extra_attention_s
    base = hw.base_s(tokens, sampled) if base_s is None else base_s
    seconds = base + L * max(local, slow, extra_wait_s) + (hw.gpu.control_rtt_s if borrowed else 0.0)
    return StepCost(seconds, slow, tuple(served), local)


def migration_time(src: InstanceHW, same_node: bool, blocks: int, block_size: int) -> float:
    """Seconds to copy ``blocks`` KV blocks to another instance: one message per TP rank pair, in parallel."""
    lat, bw = src.gpu.link(same_node)
    return lat + blocks * block_size * src.model.kv_bytes_per_token / (src.tp * bw)


def weights_fit(gpu: GpuSpec, model: ModelSpec, tp: int, kv_share: float = 0.5) -> bool:
    """Whether ``tp`` devices hold the model and still keep ``kv_share`` of their usable memory for KV."""
    usable = gpu.hbm_bytes * gpu.mem_utilization - gpu.workspace_bytes
    return model.weight_bytes / tp <= (1 - kv_share) * usable


def kv_pool_blocks(gpu: GpuSpec, model: ModelSpec, tp: int, block_size: int) -> int:
    """KV blocks of an instance: what its devices keep after weights and workspace (vLLM's sizing)."""
    usable = gpu.hbm_bytes * gpu.mem_utilization - gpu.workspace_bytes - model.weight_bytes / tp
    per_block = block_size * model.kv_bytes_per_token / tp
    return max(0, int(usable // per_block))
