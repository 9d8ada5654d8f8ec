"""Discrete-event simulator of a cluster of instances sharing one KV pool.

Why: the placement is judged by what it does to a whole cluster over a
trace (requests served, tokens per second), which no unit test shows. The
simulator runs the real ``route``/``plan`` on snapshots of simulated
instances and times each step with the ``CostModel``, so a policy change can
be measured in seconds of CPU.

Model: every instance runs steps back to back while it has work. A step
admits queued requests first-come-first-served (the first prefill chunk
must fit in free blocks), gives every running request a decode token or a
prefill chunk within a token budget, allocates the new KV blocks at the
request's home, and lasts ``cost.step_time`` (attention over every block
the instance holds, its own and lent ones, plus remote MA calls of its own
requests). When a home runs out of blocks it asks the planner first (with
lending on) and preempts its newest request only when that does not help
(the preempted request recomputes from scratch, as in vLLM). Moves are
applied at once: migration overlaps with inference in the paper.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

from infinite.cluster.cost_model import CostModel
from infinite.cluster.placement import (
    ClusterSnapshot,
    InstanceState,
    Move,
    apply_moves,
    PlacementConfig,
    RequestState,
    plan,
    route,
)

__all__ = ["TraceRequest", "SimConfig", "SimResult", "mixed_trace", "simulate", "compare_lending"]


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.arrival_s < 0 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"TraceRequest {self.request_id}: need arrival >= 0, prompt_len >= 1, output_len >= 1")


@dataclass(frozen=True)
class SimConfig:
    num_instances: int = 4
    blocks_per_instance: int = 2048
    block_size: int = 16
    max_step_tokens: int = 2048  # token budget of one step (decode tokens + prefill chunk)
    plan_interval_s: float = 0.5
    lending: bool = True
    cost: CostModel = field(default_factory=CostModel)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    max_sim_time_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.num_instances < 1 or self.blocks_per_instance < 1 or self.block_size < 1:
            raise ValueError("SimConfig: num_instances, blocks_per_instance and block_size must be >= 1")
        if self.max_step_tokens < 1 or self.plan_interval_s <= 0 or self.max_sim_time_s <= 0:
            raise ValueError("SimConfig: max_step_tokens, plan_interval_s and max_sim_time_s must be > 0")

    def effective_placement(self) -> PlacementConfig:
        """Lending off is the same planner under a policy that lends nothing."""
        if self.lending:
            return self.placement
        return replace(self.placement, policy=replace(self.placement.policy, enabled=False))


@dataclass(frozen=True)
class SimResult:
    served: int
    rejected: int
    unfinished: int
    generated_tokens: int
    makespan_s: float
    throughput_tok_s: float
    mean_latency_s: float
    preemptions: int
    moves: int
    blocks_moved: int


@dataclass
class _Req:
    spec: TraceRequest
    home: int = -1
    computed: int = 0  # tokens whose KV exists
    generated: int = 0
    blocks: dict[int, int] = field(default_factory=dict)
    finish_s: float = -1.0

    @property
    def known(self) -> int:
        """Tokens whose KV must exist before the next decode: prompt plus output so far."""
        return self.spec.prompt_len + self.generated

    def held(self) -> int:
        return sum(self.blocks.values())


@dataclass
class _Inst:
    rank: int
    total: int
    free: int
    lent: int = 0
    queue: deque[_Req] = field(default_factory=deque)
    running: list[_Req] = field(default_factory=list)
    busy: bool = False
    short: int = 0  # blocks its running requests could not get in the last step


class _Cluster:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.pcfg = cfg.effective_placement()
        self.insts = [_Inst(r, cfg.blocks_per_instance, cfg.blocks_per_instance) for r in range(cfg.num_instances)]
        self.preemptions = 0
        self.moves = 0
        self.blocks_moved = 0

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.cfg.block_size)

    def snapshot(self) -> ClusterSnapshot:
        insts = []
        for i in self.insts:
            # queued requests that must spill reserve cluster room at admission, not before
            waiting = sum(self.blocks_for(r.known) for r in i.queue if self.blocks_for(r.known) <= i.total)
            waiting += sum(max(0, self.blocks_for(r.known) - r.held()) for r in i.running)
            insts.append(
                InstanceState(
                    rank=i.rank, total_blocks=i.total, free_blocks=i.free, lent_blocks=i.lent,
                    batch_size=len(i.running), waiting_blocks=max(waiting, i.short),
                    waiting_requests=sum(1 for r in i.queue if self.blocks_for(r.known) <= i.total),
                )
            )
        reqs = tuple(
            RequestState(r.spec.request_id, r.home, r.computed, dict(r.blocks))
            for i in self.insts for r in i.running if r.held() > 0
        )
        return ClusterSnapshot(tuple(insts), reqs, self.cfg.block_size)

    def replan(self) -> None:
        if not self.cfg.lending:
            return
        moves = plan(self.snapshot(), self.cfg.cost, self.pcfg)
        if moves:
            self._apply(moves)

    def _apply(self, moves: list[Move]) -> None:
        """Carry out the moves with the planner's own bookkeeping (apply_moves also validates them)."""
        after = apply_moves(self.snapshot(), moves)
        by_id = {r.spec.request_id: r for i in self.insts for r in i.running}
        for st in after.requests:
            by_id[st.request_id].blocks = {k: v for k, v in st.blocks.items() if v > 0}
        for st in after.instances:
            self.insts[st.rank].free = st.free_blocks
            self.insts[st.rank].lent = st.lent_blocks
        self.moves += len(moves)
        self.blocks_moved += sum(mv.num_blocks for mv in moves)

    def release(self, r: _Req) -> None:
        for inst, n in r.blocks.items():
            self.insts[inst].free += n
            if inst != r.home:
                self.insts[inst].lent -= n
        r.blocks.clear()

    def grow(self, r: _Req, tokens: int) -> bool:
        """Allocate at home the blocks ``tokens`` more KV tokens need; False if short."""
        need = self.blocks_for(r.computed + tokens) - r.held()
        home = self.insts[r.home]
        if need <= 0:
            return True
        if home.free < need:
            return False
        home.free -= need
        r.blocks[r.home] = r.blocks.get(r.home, 0) + need
        return True

    def fit_tokens(self, r: _Req, want: int) -> int:
        """Largest prefill chunk <= ``want`` whose blocks the home can give now."""
        home = self.insts[r.home]
        room_tokens = (r.held() + home.free) * self.cfg.block_size - r.computed
        return max(0, min(want, room_tokens))

    def admissible(self, inst: _Inst, r: _Req) -> bool:
        """Admit when the prompt fits at home, or (lending on) when its first
        chunk fits at home and the cluster's free memory, less what admitted
        requests still need to grow, holds the rest."""
        need = self.blocks_for(r.known)
        if need <= inst.free:
            return True
        if not self.cfg.lending:
            return False
        if inst.free < self.blocks_for(min(r.known, self.cfg.max_step_tokens)):
            return False
        owed = sum(max(0, self.blocks_for(q.known) - q.held()) for i in self.insts for q in i.running)
        return need <= sum(i.free for i in self.insts) - owed

    def preempt_newest(self, inst: _Inst, spare: list[_Req]) -> _Req:
        """Preempt the most recently admitted request not already scheduled
        in this step (``spare``); recomputation restarts it from scratch."""
        cands = [q for q in inst.running if q not in spare]
        victim = cands[-1]
        inst.running.remove(victim)
        self.release(victim)
        victim.computed = 0
        inst.queue.appendleft(victim)
        self.preemptions += 1
        return victim


def _step(cl: _Cluster, inst: _Inst) -> tuple[float, list[tuple[_Req, int, bool]]]:
    """Start one step of ``inst``: admit, schedule, allocate. Returns its
    duration and the (request, tokens, is_decode) work it does."""
    cfg = cl.cfg
    j = 0
    while j < len(inst.queue):  # FCFS admission; a request that must spill never blocks the line
        head = inst.queue[j]
        if not cl.admissible(inst, head) and cfg.lending and inst.running:
            inst.short = cl.blocks_for(head.known) - inst.free
            cl.replan()
            inst.short = 0
        if cl.admissible(inst, head):
            del inst.queue[j]
            inst.running.append(head)
        elif cl.blocks_for(head.known) > inst.total:
            j += 1
        else:
            break

    budget = cfg.max_step_tokens
    work: list[tuple[_Req, int, bool]] = []
    # decodes first (one token each), then prefill chunks in admission order
    order = [r for r in inst.running if r.computed >= r.known] + [r for r in inst.running if r.computed < r.known]
    for r in order:
        if r not in inst.running:
            continue  # preempted for an earlier request of this step
        decode = r.computed >= r.known
        want = 1 if decode else min(budget, r.known - r.computed)
        if want <= 0:
            continue
        while not cl.grow(r, want):
            if cfg.lending:
                inst.short = cl.blocks_for(r.computed + want) - r.held() - inst.free
                cl.replan()
                inst.short = 0
                if cl.grow(r, want):
                    break
            n = 0 if decode else cl.fit_tokens(r, want)
            if n > 0:
                want = n
                continue
            if cl.preempt_newest(inst, spare=[w for w, _, _ in work]) is r:
                want = 0
                break
        if want <= 0:
            continue
        work.append((r, want, decode))
        budget -= 0 if decode else want

    ctx_tokens = (inst.total - inst.free) * cfg.block_size
    batch = sum(1 if d else n for _, n, d in work)
    calls = sum(len(r.blocks) - (1 if r.home in r.blocks else 0) for r, _, _ in work)
    qtok = sum(n * (len(r.blocks) - (1 if r.home in r.blocks else 0)) for r, n, _ in work)
    dur = cfg.cost.step_time(batch, ctx_tokens, calls, qtok) if work else 0.0
    return dur, work


def simulate(trace: list[TraceRequest], cfg: SimConfig) -> SimResult:
    """Run ``trace`` on a simulated cluster; deterministic for a given input."""
    if not isinstance(cfg, SimConfig):
        raise TypeError(f"cfg must be a SimConfig, got {type(cfg).__name__}")
    ids = [t.request_id for t in trace]
    if len(set(ids)) != len(ids):
        raise ValueError("simulate: request ids in the trace must be unique")
    cl = _Cluster(cfg)
    events: list[tuple[float, int, int, str, object]] = []  # (time, priority, seq, kind, payload)
    seq = 0

    def push(t: float, prio: int, kind: str, payload: object) -> None:
        nonlocal seq
        heapq.heappush(events, (t, prio, seq, kind, payload))
        seq += 1

    for t in sorted(trace, key=lambda x: (x.arrival_s, x.request_id)):
        push(t.arrival_s, 0, "arrive", t)
    if cfg.lending and trace:
        push(min(t.arrival_s for t in trace) + cfg.plan_interval_s, 2, "plan", None)

    rejected = served = tokens = 0
    latencies: list[float] = []
    in_flight = 0
    pending: dict[int, list[tuple[_Req, int, bool]]] = {}
    first_arrival = min((t.arrival_s for t in trace), default=0.0)
    last_finish = first_arrival
    now = 0.0

    def kick(inst: _Inst, t: float) -> None:
        if inst.busy:
            return
        dur, work = _step(cl, inst)
        if work:
            inst.busy = True
            pending[inst.rank] = work
            push(t + dur, 1, "done", inst.rank)

    while events:
        now, _, _, kind, payload = heapq.heappop(events)
        if now > cfg.max_sim_time_s:
            break
        if kind == "arrive":
            spec: TraceRequest = payload  # type: ignore[assignment]
            home = route(cl.snapshot(), cl.pcfg, cl.blocks_for(spec.prompt_len + spec.output_len))
            if home is None:
                rejected += 1
                continue
            r = _Req(spec, home=home)
            cl.insts[home].queue.append(r)
            in_flight += 1
            kick(cl.insts[home], now)
        elif kind == "plan":
            cl.replan()
            for inst in cl.insts:
                kick(inst, now)
            if in_flight or any(e[3] == "arrive" for e in events):
                push(now + cfg.plan_interval_s, 2, "plan", None)
        else:
            inst = cl.insts[payload]  # type: ignore[index]
            inst.busy = False
            for r, n, decode in pending.pop(inst.rank):
                if r not in inst.running:
                    continue  # preempted while its step ran
                r.computed += n
                if decode:
                    r.generated += 1
                    tokens += 1
                    if r.generated >= r.spec.output_len:
                        inst.running.remove(r)
                        cl.release(r)
                        r.finish_s = now
                        served += 1
                        in_flight -= 1
                        latencies.append(now - r.spec.arrival_s)
                        last_finish = max(last_finish, now)
            for other in cl.insts:  # freed memory may unblock any instance
                kick(other, now)

    makespan = max(0.0, last_finish - first_arrival)
    return SimResult(
        served=served,
        rejected=rejected,
        unfinished=len(trace) - served - rejected,
        generated_tokens=tokens,
        makespan_s=makespan,
        throughput_tok_s=tokens / makespan if makespan > 0 else 0.0,
        mean_latency_s=sum(latencies) / len(latencies) if latencies else 0.0,
        preemptions=cl.preemptions,
        moves=cl.moves,
        blocks_moved=cl.blocks_moved,
    )


def mixed_trace(
    seed: int = 0,
    num_short: int = 200,
    num_long: int = 6,
    short_rate_per_s: float = 20.0,
    short_prompt: tuple[int, int] = (128, 2048),
    short_output: tuple[int, int] = (32, 256),
    long_prompt: tuple[int, int] = (40_000, 60_000),
    long_output: tuple[int, int] = (32, 64),
) -> list[TraceRequest]:
    """Poisson arrivals of short chat-like requests with a few long-document
    requests spread evenly over the same span; seeded, so reproducible."""
    rng = random.Random(seed)
    out: list[TraceRequest] = []
    t = 0.0
    for j in range(num_short):
        t += rng.expovariate(short_rate_per_s)
        out.append(TraceRequest(f"s{j}", t, rng.randint(*short_prompt), rng.randint(*short_output)))
    span = t if num_short else 1.0
    for j in range(num_long):
        at = span * (j + 0.5) / max(1, num_long)
        out.append(TraceRequest(f"l{j}", at, rng.randint(*long_prompt), rng.randint(*long_output)))
    out.sort(key=lambda x: (x.arrival_s, x.request_id))
    return out


def compare_lending(trace: list[TraceRequest], cfg: SimConfig) -> dict[str, SimResult]:
    """The same trace and cluster with lending off and on."""
    off = replace(cfg, lending=False)
    on = replace(cfg, lending=True)
    return {"off": simulate(trace, off), "on": simulate(trace, on)}
