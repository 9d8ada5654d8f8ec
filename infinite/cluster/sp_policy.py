"""Sequence-parallel prefill: whether a prompt is prefilled by a group, by which members, what moves.

Pure functions of plain states and the calibrated ``CostModel``; the
gManager, the runtime and the cluster simulator ask the same ones. The
layout (which member computes which tokens) is ``sp_layout``.

**The group (``choose_group``).** A group runs in *rounds*: each member
computes one stripe of the prompt per round as a guest chunk in its own
step, beside its own requests (it keeps ``own_tokens`` of its step budget
for them), and a round ends when its slowest member's step does (every
layer waits for the other members' K/V or partial results). Each member
keeps its segment's KV, so segments follow the members' room: they fill the
rooms evenly up to a common level (``stripe_widths``), the members with the
most room computing full stripes and the others narrower ones. Deeper in
the prompt the stripes narrow (``row_shrink``: a token there attends to
more keys), so that every round's step costs about what the first one's
does and the members' own requests never wait longer than that for a
token. The estimate of a group is the sum over its rows of the slowest
member's own step, stripe of prefill work (``CostModel.prefill_time``) and
exchange; the estimate of no group is the home computing the prompt alone,
a budget's worth per step beside its own requests. The group size with the
earliest end wins. A long prompt that no group can take now (the members
are in other groups) may wait for one (``worth_waiting``): the gManager
knows when its running groups should end, and waiting is chosen only when
the wait plus the group that could then form still beats the home alone by
``min_speedup``.

No regret: a group only when it ends ``min_speedup`` times sooner than the
home alone, for prompts of at least ``min_prompt_tokens``; only when its
members' time (members x the group's time) is at most ``1 / min_efficiency``
of the home alone's, a bar lowered in proportion to the cluster's idle
instances (the exchange and the rounds' waits cost nothing on compute that
would idle, and throughput on compute that would not); and only on
members with spare compute (``Candidate.idle``: in no other group and no
queued request it could admit now, so the guest chunk takes step budget
nobody else wanted) and the memory for their segment within the
``LendingPolicy``'s caps (the caller passes what each may hold:
``room_blocks``). A member keeps its segment's KV as blocks lent to the
request's home, so a member must owe nothing (``may_lend``: no debtor lends).
The home may be a creditor itself (``creditor_homes``, on by default): on
long traces most instances lend to someone, and their long queue heads could
otherwise neither borrow nor be grouped. The debts stay acyclic: every new
debt points to an instance that owes nothing, so the debt that would close a
cycle would point to an instance that owes (``tests/test_sp_policy.py``).

**What moves (``choose_exchange``).** Per layer, a member's queries need
the keys of earlier positions held by the others. Either the queries go to
the holders, which run MicroAttention there and send back (output, LSE)
partials (*pass-Q*, as decode does), or the holders send their K/V to the
member (*pass-KV*; K/V are not kept, so every round fetches all earlier
keys again). Pass-KV moves ``kv_bytes`` per key, pass-Q ``query_bytes +
partial_bytes`` per query and holder: pass-KV wins in early rows and for
GQA models (few KV heads), pass-Q once the keys before a chunk outnumber
its queries by the ratio. The round takes whichever puts fewer bytes on the
busiest member's link.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from infinite.cluster.cost_model import CostModel
from infinite.cluster.sp_layout import SegmentLayout, striped_layout
from infinite.kv.rmanager import blocks_for

__all__ = ["ExchangeShape", "RoundTraffic", "round_traffic", "choose_exchange", "GroupPolicy", "Candidate",
           "GroupPlan", "choose_group", "estimate_alone", "estimate_group", "stripe_widths", "row_shrink", "quick_estimate",
           "worth_waiting"]

PASS_Q, PASS_KV = "q", "kv"


# --------------------------------------------------------------------------- what moves per layer


@dataclass(frozen=True)
class ExchangeShape:
    """Bytes per token and layer of what a group member may send."""

    query_bytes: int  # one query (all heads)
    partial_bytes: int  # one partial output and its float32 LSE per head
    kv_bytes: int  # one key and value (the KV heads)

    def __post_init__(self) -> None:
        if min(self.query_bytes, self.partial_bytes, self.kv_bytes) < 1:
            raise ValueError(f"ExchangeShape: byte counts must be >= 1, got {self}")

    @classmethod
    def of(cls, num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> ExchangeShape:
        q = num_heads * head_dim * dtype_bytes
        return cls(q, q + 4 * num_heads, 2 * num_kv_heads * head_dim * dtype_bytes)

    @property
    def kv_per_query(self) -> float:
        """Bytes of one key's K/V over bytes of one query sent and answered."""
        return self.kv_bytes / (self.query_bytes + self.partial_bytes)


@dataclass(frozen=True)
class RoundTraffic:
    """One round of a group, per layer: ``sent[a, b]`` bytes member ``a`` sends member ``b``;
    ``pairs[x]`` (query, key) pairs and ``reads[x]`` KV tokens member ``x``'s attention does."""

    mode: str
    sent: np.ndarray  # [g, g] float
    pairs: np.ndarray  # [g]
    reads: np.ndarray  # [g]

    def out_bytes(self, a: int) -> float:
        return float(self.sent[a].sum())

    def in_bytes(self, b: int) -> float:
        return float(self.sent[:, b].sum())

    @property
    def busiest(self) -> float:
        """Bytes on the busiest member's link (each direction on its own: links are full duplex)."""
        return float(max(self.sent.sum(1).max(), self.sent.sum(0).max())) if self.sent.size else 0.0


def round_traffic(layout: SegmentLayout, k: int, shape: ExchangeShape, mode: str) -> RoundTraffic:
    """The traffic and attention work of round ``k``: each member computes its stripes of the round
    (``layout.round_chunk``; a member without one only serves the others). Whole-round arrays: the
    keys each member holds before each of the round's stripes, and from them every member's pairs
    with every holder (``SegmentLayout.chunk``, counted at once)."""
    if mode not in (PASS_Q, PASS_KV):
        raise ValueError(f"mode must be {PASS_Q!r} or {PASS_KV!r}, got {mode!r}")
    g = layout.size
    stripes = [layout.stripes[i] for i in layout.round_stripes(k)]
    who = np.array([s.member for s in stripes])
    n = np.array([s.end - s.start for s in stripes], dtype=float)
    own = np.zeros((len(stripes), g))
    own[np.arange(len(stripes)), who] = n
    before = np.asarray(layout.round_before(k), dtype=float) + np.cumsum(own, 0) - own  # [S, g] keys before each
    pairs_by = np.zeros((g, g))  # [x, j]: pairs of x's queries with the keys j holds
    np.add.at(pairs_by, who, n[:, None] * before)
    causal = np.zeros(g)
    np.add.at(causal, who, n * (n + 1) / 2)
    pairs_by[np.arange(g), np.arange(g)] += causal
    queries = np.zeros(g)
    np.add.at(queries, who, n)
    keys = np.zeros((g, g))  # [x, j]: keys on j that x's last query sees
    last = np.full(g, -1)
    last[who] = np.arange(len(stripes))  # the later stripe of a member wins
    has = last >= 0
    keys[has] = before[last[has]]
    keys[np.flatnonzero(has), np.flatnonzero(has)] += n[last[has]]
    other = ~np.eye(g, dtype=bool)
    if mode == PASS_Q:
        ask = (keys > 0) & other  # x asks j: its queries out, the partials back
        sent = ask * queries[:, None] * shape.query_bytes + (ask * queries[:, None] * shape.partial_bytes).T
        return RoundTraffic(mode, sent, pairs_by.sum(0), keys.sum(0))
    sent = (keys * other).T * shape.kv_bytes  # j sends x the keys x's queries see
    return RoundTraffic(mode, sent, pairs_by.sum(1), keys.sum(1))


def choose_exchange(layout: SegmentLayout, k: int, shape: ExchangeShape) -> RoundTraffic:
    """Pass-Q or pass-KV for round ``k``: fewer bytes on the busiest link (pass-Q on a tie)."""
    q = round_traffic(layout, k, shape, PASS_Q)
    kv = round_traffic(layout, k, shape, PASS_KV)
    return kv if kv.busiest < q.busiest else q


# --------------------------------------------------------------------------- who prefills


@dataclass(frozen=True)
class GroupPolicy:
    """The rules of prefill groups (see the module docstring)."""

    enabled: bool = True
    min_prompt_tokens: int = 65536  # shorter prompts are prefilled at home (a few steps: no group pays)
    min_speedup: float = 1.2  # the group must end this many times sooner than the home alone
    min_efficiency: float = 0.7  # in a busy cluster, members x the group's time <= the home alone's / this
    max_members: int = 64
    own_tokens: int = 256  # step budget each member keeps for its own requests (its stripe is the rest)
    creditor_homes: bool = True  # the home may lend to others (its members owe nothing: still acyclic)
    even_rounds: bool = True  # narrower stripes deeper in the prompt, so every round costs about the same
    hold: bool = True  # a long prompt may wait for a running group's members rather than prefill alone

    def __post_init__(self) -> None:
        if self.min_prompt_tokens < 1 or self.max_members < 1 or self.own_tokens < 0:
            raise ValueError(f"GroupPolicy: min_prompt_tokens and max_members must be >= 1, own_tokens >= 0: {self}")
        if not self.min_speedup >= 1.0:
            raise ValueError(f"GroupPolicy.min_speedup must be >= 1, got {self.min_speedup!r}")
        if not 0.0 <= self.min_efficiency <= 1.0:
            raise ValueError(f"GroupPolicy.min_efficiency must be in [0, 1], got {self.min_efficiency!r}")

    def stripe_blocks(self, step_budget: int, block_size: int) -> int:
        """Blocks of a member's stripe in a row: half its step budget but what it keeps for its own
        requests (a round is a zig-zag pair of rows)."""
        return max(1, (step_budget - self.own_tokens) // (2 * block_size))


@dataclass(frozen=True)
class Candidate:
    """An instance as the group choice sees it (its last heartbeat)."""

    rank: int
    batch_size: int  # requests it runs
    context_tokens: int  # KV tokens they hold (what its decode step reads)
    step_tokens: int  # tokens its own steps take every step (its decodes: prompts in flight end, decodes stay)
    room_blocks: int  # blocks it may hold for a group (lendable as a member, free beyond its demand as home)
    idle: bool  # spare compute: in no group, no queued request it could admit now
    may_lend: bool = True  # it holds no borrowed blocks (a member becomes a creditor)
    may_borrow: bool = True  # it lends nothing (lending's rule for a debtor; GroupPolicy.creditor_homes waives it)

    def own_step_s(self, cost: CostModel) -> float:
        return cost.step_time(self.batch_size, self.context_tokens)


@dataclass(frozen=True)
class GroupPlan:
    home: int
    layout: SegmentLayout
    group_s: float  # the estimate of the group's prefill
    alone_s: float  # the estimate of the home's alone

    @property
    def members(self) -> tuple[int, ...]:
        return self.layout.members


def row_shrink(cost: CostModel) -> Callable[[int], float]:
    """The share of a full stripe a row starting at prompt position ``p`` takes: a token there
    costs ``p_tok + p·p_pair``, a token of the first row ``p_tok``, so the row's step costs what
    the first row's does (and a member's own requests wait no longer for their next token)."""
    a, b = cost.prefill_token_s, cost.prefill_pair_s
    return lambda pos: a / (a + pos * b) if a > 0 else 1.0


def estimate_alone(prompt_tokens: int, home: Candidate, cost: CostModel, step_budget: int) -> float:
    """Seconds for ``home`` to prefill the prompt itself, a step's free budget at a time."""
    chunk = max(1, step_budget - min(home.step_tokens, step_budget // 2))
    steps = math.ceil(prompt_tokens / chunk)
    return steps * home.own_step_s(cost) + cost.prefill_time(prompt_tokens, prompt_tokens * (prompt_tokens + 1) / 2)


def estimate_group(layout: SegmentLayout, own_step_s: Sequence[float], cost: CostModel,
                   shape: ExchangeShape) -> float:
    """Seconds of a group's prefill: per round, the slowest member's own step plus its stripes'
    prefill work and its exchange, pass-Q or pass-KV, whichever the cost model prices lower
    (remote MicroAttention calls: one per other member and layer)."""
    g, L = layout.size, cost.num_layers
    rounds: dict[int, dict[int, int]] = {}  # round -> member -> tokens
    for s in layout.stripes:
        row = rounds.setdefault(s.round, {})
        row[s.member] = row.get(s.member, 0) + s.end - s.start
    total, before = 0.0, 0
    for k in range(layout.rounds):
        work = rounds.get(k, {})
        width = sum(work.values())
        keys = before + width / 2  # zig-zag: on average half the round is before a stripe
        slow = 0.0
        for x, n in work.items():
            q = cost.remote_ma_time(g - 1, (g - 1) * n)
            others = keys * (1 - layout.segment_len(x) / layout.prompt_len)  # earlier keys held by the others
            kv = L * ((g - 1) * cost.remote_latency_s + others * shape.kv_per_query * cost.remote_token_s)
            slow = max(slow, own_step_s[x] + cost.prefill_time(n, n * keys) + min(q, kv))
        total += slow
        before += width
    return total


def quick_estimate(prompt_tokens: int, widths: Sequence[int], own_step_s: float, cost: CostModel,
                   even_rounds: bool) -> float:
    """Closed form of ``estimate_group`` for comparing group sizes (stripe ``widths`` in tokens, the
    slowest member's own step), exchanging queries: with even rounds a row at position ``p`` is
    ``f(p) = p_tok / (p_tok + p·p_pair)`` of a full one, so ``∫ dp / (S·f(p))`` rows, each costing a
    full stripe's first-row work; without, ``L / S`` rows whose work grows with their position.
    A round is two rows."""
    L, S, n0 = prompt_tokens, sum(widths), max(widths)
    a, b, layers, g = cost.prefill_token_s, cost.prefill_pair_s, cost.num_layers, len(widths)
    if even_rounds and a > 0:
        rows = (L + L * L * b / (2 * a)) / S
        work = rows * n0 * a
    else:
        rows = L / S
        work = rows * n0 * a + n0 * b * S * rows * rows / 2
    rounds = max(1.0, rows / 2)
    exchange = layers * (g - 1) * (rounds * cost.remote_latency_s + L * n0 / S * cost.remote_token_s)
    return rounds * own_step_s + work + exchange


def stripe_widths(blocks: int, rooms: Sequence[int], stripe: int) -> list[int] | None:
    """Stripe widths that give each member a segment its room holds: segments fill the rooms
    evenly up to a common level (water-filling), so the members with the most room get full
    stripes and the others narrower ones in proportion; None when the rooms cannot hold the
    prompt. Two blocks of each room are kept for the rounding of the last rows."""
    caps = [max(0, r - 2) for r in rooms]
    if sum(caps) < blocks or min(caps) < 1:
        return None
    level, left, k = 0.0, blocks, len(caps)
    for c in sorted(caps):  # the level at which the capped rooms and k members at the level hold it all
        if c * k >= left:
            level = left / k
            break
        left -= c
        k -= 1
    return [max(1, int(stripe * min(c, level) / level)) for c in caps]


def worth_waiting(alone_s: float, wait_s: float, later: GroupPlan | None, policy: GroupPolicy) -> bool:
    """Whether a long prompt no group can take now should wait for one (``later``: the group that
    could form once a running group ends, in ``wait_s``) instead of being prefilled alone at a
    home (``alone_s``): only when waiting and then the group still ends ``min_speedup`` times
    sooner."""
    return policy.enabled and policy.hold and later is not None and \
        wait_s + later.group_s <= alone_s / policy.min_speedup


def choose_group(prompt_tokens: int, candidates: Sequence[Candidate], cost: CostModel, policy: GroupPolicy,
                 shape: ExchangeShape, step_budget: int, block_size: int, home: int | None = None,
                 busy_share: float = 1.0) -> GroupPlan | None:
    """The group that prefills a prompt soonest, or None when the home alone is as fast (within
    ``min_speedup``), the group would waste the cluster's compute (``min_efficiency``, scaled by
    ``busy_share``: the share of instances with work of their own), the prompt is short, or the
    members with spare compute lack the room.

    ``home``: the request's home if it has one (a queued request), else None: the home is the idle
    candidate with the most room (a new request routed to the group). Members: the idle ones with
    the most room, each holding a share of the prompt in proportion to its stripe.
    """
    if not policy.enabled or prompt_tokens < max(policy.min_prompt_tokens, 2 * block_size):
        return None
    by_rank = {c.rank: c for c in candidates}
    if home is not None:
        h = by_rank.get(home)
        if h is None or not (h.may_borrow or policy.creditor_homes):
            return None
    else:
        homes = [c for c in candidates if c.idle and (c.may_borrow or policy.creditor_homes)]
        if not homes:
            return None
        h = max(homes, key=lambda c: (c.room_blocks, -c.rank))
    stripe = policy.stripe_blocks(step_budget, block_size)
    joiners = sorted((c for c in candidates if c.rank != h.rank and c.idle and c.may_lend and c.room_blocks > 2),
                     key=lambda c: (-c.room_blocks, c.own_step_s(cost), c.rank))
    nb = blocks_for(prompt_tokens, block_size)
    alone = estimate_alone(prompt_tokens, h, cost, step_budget)
    # Sizes are compared on a closed-form estimate (building a layout per size costs rows x members);
    # the layouts of the best few are built and checked, the first that holds is priced exactly.
    sized = []
    for g in range(2, min(policy.max_members, nb, 1 + len(joiners)) + 1):
        group = (h, *joiners[: g - 1])
        widths = stripe_widths(nb, [c.room_blocks for c in group], stripe)
        if widths is not None:
            quick = quick_estimate(prompt_tokens, [w * block_size for w in widths],
                                   max(c.own_step_s(cost) for c in group), cost, policy.even_rounds)
            sized.append((quick, g, group, widths))
    sized.sort(key=lambda x: (x[0], x[1]))
    best: GroupPlan | None = None
    for _, _, group, widths in sized[:3]:
        try:
            layout = striped_layout(prompt_tokens, tuple(c.rank for c in group), block_size, widths,
                                    row_shrink(cost) if policy.even_rounds else None)
        except ValueError:  # a member too narrow to get a block
            continue
        if any(layout.segment_blocks(i) > c.room_blocks for i, c in enumerate(group)):
            continue
        best = GroupPlan(h.rank, layout, estimate_group(layout, [c.own_step_s(cost) for c in group], cost, shape),
                         alone)
        break
    if best is None or alone < policy.min_speedup * best.group_s or \
            alone < policy.min_efficiency * busy_share * best.layout.size * best.group_s:
        return None
    return best
