"""The cluster simulator: events in time order over simulated instances.

What runs is the project's own code: each instance's ``Scheduler`` (token
budget, admission, preemption by recompute), borrowing on demand through
``LendingPolicy.borrow_plan`` with the gManager's no-regret check
(``infinite.sim.allocator``, ``infinite.sim.planning``), ``placement.route``
for every arrival and ``placement.plan`` every ``plan_interval_s`` on a
snapshot of the cluster, with the cost model fitted from the simulated
steps as the gManager fits it from heartbeats. What is simulated is time
(``infinite.sim.costs``: roofline steps, remote attention, migrations that
take link time and hold memory on both ends while they run) and the block
counts. Runs of steps are fast-forwarded (``infinite.sim.segments``); an
event that could change what the scheduler does next stops a run at its
next step boundary. Long prompts may be prefilled by a group of instances
(``infinite.sim.grouping``, with ``SimConfig.groups``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass, field, replace

from infinite.cluster.cost_model import Calibration, StepSample
from infinite.cluster.placement import ClusterSnapshot, InstanceState, PlacementConfig, capacities, route_key
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.sp_policy import GroupPolicy
from infinite.kv.rmanager import blocks_for
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams
from infinite.sim.costs import InstanceHW, kv_pool_blocks
from infinite.sim.gpus import GpuSpec
from infinite.sim.grouping import GROUP, Grouping
from infinite.sim.instance import SimInstance
from infinite.sim.memory import ClusterMemory
from infinite.sim.models import ModelSpec
from infinite.sim.planning import MOVE, Planning, probe_prior
from infinite.sim.segments import DecodeRun
from infinite.sim.policies import node_groups, tp_pp
from infinite.sim.traces import TraceRequest

__all__ = ["SimConfig", "Completed", "SimResult", "simulate"]

END, ARRIVE, PLAN = 0, 2, 3  # event kinds (MOVE = 1), in the order simultaneous events are handled
_PARAMS = SamplingParams(max_tokens=None, ignore_eos=True)


@dataclass(frozen=True)
class SimConfig:
    gpu: GpuSpec
    model: ModelSpec
    sizes: tuple[int, ...]  # GPUs of each instance (TP inside a node, pipeline stages across nodes)
    lending: bool
    block_size: int = 16
    max_num_batched_tokens: int = 2048  # the project's EngineConfig defaults
    max_num_seqs: int = 256
    policy: LendingPolicy = field(default_factory=LendingPolicy)
    placement: PlacementConfig | None = None  # None: PlacementConfig(policy=the policy)
    plan_interval_s: float = 0.5  # EngineConfig.placement_interval_s
    periodic_placement: bool = True
    route_by_size: bool = False  # best-static: the smallest instance that holds the request
    round_robin: bool = False  # independent instances behind a plain load balancer (vllm-multi)
    pipeline: bool = True  # an instance beyond a node: pipeline stages across nodes (else one TP group)
    kv_blocks: int | None = None  # pool per instance; None = what the devices hold after weights
    drain_s: float = 3600.0  # stop this long after the last arrival; what is left is reported unfinished
    check: bool = False  # schedule every predicted step for real and compare (tests)
    groups: GroupPolicy | None = None  # prefill groups for long prompts (needs lending); None: none
    v0_scheduler: bool = False  # vLLM before chunked prefill (infinite.sim.v0_scheduler): vllm-multi-paper

    def lending_policy(self) -> LendingPolicy:
        return replace(self.policy, enabled=self.lending and len(self.sizes) > 1)

    def placement_config(self) -> PlacementConfig:
        base = self.placement if self.placement is not None else PlacementConfig()
        return replace(base, policy=self.lending_policy())


@dataclass(frozen=True)
class Completed:
    request_id: str
    arrival_s: float
    first_token_s: float
    finish_s: float
    prompt_len: int
    output_len: int
    preemptions: int
    home: int
    remote_blocks: int  # blocks it held on other instances at the end


@dataclass
class SimResult:
    completed: list[Completed]
    rejected: dict[str, list[str]]  # reason -> request ids
    offered: int
    end_s: float
    preemptions: int
    moves: int
    blocks_moved: int
    moves_cancelled: int
    borrows: int
    blocks_borrowed: int
    capacity_tokens: int  # the longest request the deployment could ever hold
    busy_s: float  # instance-seconds spent stepping
    instances: int
    steps: int
    events: int
    window_s: float  # first to last arrival
    window_tokens: int  # tokens computed for the first time in steps that ended inside the window
    groups: int = 0  # prompts prefilled by a group
    group_members: int = 0  # members over all groups
    group_blocks: int = 0  # blocks members kept for the requests they prefilled
    groups_waited: int = 0  # groups formed for requests that waited at the gManager for one


class _Sim(Planning, Grouping):
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.policy = cfg.lending_policy()
        self.pcfg = cfg.placement_config()
        nodes = node_groups(cfg.sizes, cfg.gpu.gpus_per_node)
        self.hws = []
        for n, g in zip(cfg.sizes, nodes):
            tp, pp = tp_pp(n, cfg.gpu.gpus_per_node) if cfg.pipeline else (n, 1)
            self.hws.append(InstanceHW(cfg.gpu, cfg.model, tp, g, pp))
        totals = [cfg.kv_blocks or kv_pool_blocks(cfg.gpu, cfg.model, hw.devices, cfg.block_size) for hw in self.hws]
        if min(totals) < 1:
            raise ValueError("an instance has no memory left for KV cache")
        self.mem = ClusterMemory(totals, cfg.block_size, self.policy, on_change=self._lendable_up)
        pools = tuple(InstanceState(r, t, t, 0, 0, 0) for r, t in enumerate(totals))
        by_rank = capacities(ClusterSnapshot(pools, (), cfg.block_size), self.pcfg)  # the policy's, per pool size
        caps = [by_rank[r] for r in range(len(totals))]
        self.capacity = max(caps)
        self.inst = [SimInstance(r, hw, self.hws, self.mem, caps[r], cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                 cfg.check, self.loan_pays, self.loans_pay_hint, lambda: self.now, cfg.v0_scheduler)
                     for r, hw in enumerate(self.hws)]
        spans = len({n for hw in self.hws for n in hw.nodes}) > 1
        self.cost = probe_prior(self.hws[0], cfg.gpu.inter_latency_s if spans else cfg.gpu.intra_latency_s)
        self.calib = Calibration()  # the gManager's: decode-step samples, and whether the model is trusted
        self.hints: dict = {}  # heartbeat replies (Hints) since the last plan
        self.heap: list[tuple] = []
        self.seq = itertools.count()
        self.queued: dict[str, int] = {}  # waiting request -> blocks counted in its home's demand
        self.requests: dict[str, Request] = {}
        self.completed: list[Completed] = []
        self.rejected: dict[str, list[str]] = {}
        self.moving: dict[str, int] = {}  # request -> move id
        self.moves = self.blocks_moved = self.moves_cancelled = 0
        self.blocked: list[tuple[int, int, int]] = []  # (key, token, rank): wait until total lendable >= key
        self.block_token = [0] * len(self.inst)
        self.to_wake: set[int] = set()
        self.lendable_rose = False
        self.events = 0
        self.now = 0.0
        # Routing: instances kept sorted by placement.route_key, one list per pool size (a request goes
        # to the best instance of any size that can hold it, or with route_by_size of the smallest).
        self.states = [self.state(r) for r in range(len(self.inst))]
        self.caps = by_rank
        self.keys = [route_key(st) for st in self.states]
        self.index: dict[int, list[tuple[tuple, int]]] = {}
        for r, st in enumerate(self.states):
            self.index.setdefault(st.total_blocks, []).append((self.keys[r], r))
        for lst in self.index.values():
            lst.sort()
        self.mem.dirty.clear()
        self.rr = 0
        self.init_groups(cfg.groups)

    # ---- events --------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, *payload) -> None:
        heapq.heappush(self.heap, (t, kind, next(self.seq), payload))

    def _lendable_up(self, rank: int) -> None:
        self.lendable_rose = True

    def state(self, r: int) -> InstanceState:
        p, s = self.mem.pools[r], self.inst[r].sched
        return InstanceState(rank=r, total_blocks=p.total, free_blocks=p.free, lent_blocks=p.lent,
                             batch_size=len(s.running), waiting_blocks=p.demand, waiting_requests=len(s.waiting),
                             borrowed_blocks=p.borrowed)

    # ---- arrivals ------------------------------------------------------------------------------------
    def request_blocks(self, req: Request) -> int:
        return blocks_for(req.num_prompt_tokens + req.max_tokens, self.cfg.block_size)

    def arrive(self, tr: TraceRequest) -> None:
        blocks = blocks_for(tr.prompt_len + tr.output_len, self.cfg.block_size)
        home = self.route(blocks)
        if home is None:
            self.rejected.setdefault(f"longer than any instance can hold ({self.capacity} blocks of "
                                     f"{self.cfg.block_size} tokens)", []).append(tr.request_id)
            return
        req = Request(tr.request_id, range(tr.prompt_len), _PARAMS, max_tokens=tr.output_len)  # type: ignore[arg-type]
        req.metrics.arrival_time = tr.arrival_s
        self.requests[tr.request_id] = req
        if not self.held and self.try_group(req, None):  # the gManager routes a long prompt to a group
            return
        if self.held and req.num_tokens >= self.gpolicy.min_prompt_tokens or self.hold_for_group(req, home):
            self.held.append(req)  # first come first served behind the long prompts already waiting
            return
        self.enqueue_new(req, home)

    def enqueue_new(self, req: Request, home: int) -> None:
        inst = self.inst[home]
        inst.sched.add(req)
        self._enqueue(home, req)
        self.to_wake.add(home)

    def flush(self) -> None:
        """Bring the instance states (and the routing index) up to date with what changed."""
        for r in self.mem.dirty:
            st = self.states[r] = self.state(r)
            key = route_key(st)
            if key != self.keys[r]:
                lst = self.index[st.total_blocks]
                del lst[bisect.bisect_left(lst, (self.keys[r], r))]
                bisect.insort(lst, (key, r))
                self.keys[r] = key
        self.mem.dirty.clear()

    def route(self, blocks: int) -> int | None:
        """placement.route's answer (tests/test_sim.py checks it on random clusters), from the index:
        the best instance by route_key among those whose capacity holds the request."""
        self.flush()
        if self.cfg.round_robin:  # a plain load balancer: the next instance that can hold it
            n = len(self.inst)
            for k in range(n):
                r = (self.rr + k) % n
                if self.caps[r] >= blocks:
                    self.rr = r + 1
                    return r
            return None
        best = None
        for total in sorted(self.index):
            lst = self.index[total]
            if not lst or self.caps[lst[0][1]] < blocks:
                continue
            if self.cfg.route_by_size:
                return lst[0][1]
            if best is None or lst[0] < best:
                best = lst[0]
        return None if best is None else best[1]

    def _enqueue(self, rank: int, req: Request) -> None:
        d = blocks_for(req.num_tokens + 1, self.cfg.block_size)
        self.queued[req.request_id] = d
        self.mem.pools[rank].demand += d
        self.own_demand(rank)

    # ---- runs ------------------------------------------------------------------------------------------
    def start(self, r: int) -> None:
        """Schedule instance ``r``'s next run, or leave it idle (and watch for the memory it waits on)."""
        inst = self.inst[r]
        self.head_group(r)
        for _ in range(len(inst.sched.running) + 2):  # a real step that only preempted is retried
            if not inst.sched.running and not inst.sched.waiting and inst.guest is None:
                return
            if inst.guest is None:  # a group's member pays it in its round steps, at the rate it came
                t0 = self.now + inst.pending_served
                inst.busy_s += inst.pending_served
                inst.pending_served = 0.0
            else:
                t0 = self.now
            run = inst.plan(t0)
            if run is None:
                run, batch = inst.real_step(t0)
                p = self.mem.pools[r]
                for q in batch.requests:
                    p.demand -= self.queued.pop(q.request_id, 0)
                for q in batch.preempted:
                    self._enqueue(r, q)
                self.own_demand(r)
                if run is None:
                    if batch.preempted:
                        continue
                    self._watch(r)
                    return
            inst.begin(run)
            self.own_demand(r)
            if inst.guest is not None:  # a group's round: it ends when every member's step is known
                self.group_step(r, t0)
                self._watch(r)
                return
            first = run.end(1) - run.t0
            if first > 0 and _decodes(run):  # the heartbeat's sample: a decode step, blocks in use as context
                used = self.mem.pools[r].used * self.cfg.block_size
                self.calib.add(StepSample(len(inst.sched.running), used, first, inst.calls))
            self._push_end(r)
            if self.cfg.check:
                inst.check_step(1)
            self._watch(r)
            return

    def _push_end(self, r: int) -> None:
        inst = self.inst[r]
        run = inst.run
        if run.pending:  # the group's round ends it
            return
        first = inst.tok_done + 1 if self.cfg.check else run.num_steps
        for s in range(max(first, 1), run.num_steps + 1):
            self.push(run.end(s), END, r, inst.version, s)

    def end_step(self, r: int, version: int, s: int) -> None:
        inst = self.inst[r]
        if inst.version != version or inst.run is None:
            return
        if s < inst.run.num_steps:  # check mode: step s ended, the scheduler decides step s + 1
            inst.apply_tokens(s)
            inst.check_step(s + 1)
            return
        span = inst.run.end(inst.run.num_steps) - inst.run.t0
        finished, served, _ = inst.finish_run()
        self.mem.dirty.add(r)
        for c in inst.serves_on - served.keys():
            self.inst[c].serve_rates.pop(r, None)
        inst.serves_on = set(served)
        for c, w in served.items():
            if span > 0:  # the rate at which this debtor's steps asked c for work (a group round paces by it)
                self.inst[c].serve_rates[r] = w / span
            if self.inst[c].run is not None:
                self.inst[c].pending_served += w
            else:  # an idle creditor did the work in its idle time
                self.inst[c].busy_s += w
        for q in finished:
            self.finish(r, q)
        self.start(r)

    def finish(self, r: int, req: Request) -> None:
        req.metrics.finished_time = self.now
        lay = self.mem.layouts.get(req.request_id)
        remote = sum(n for i, n in lay.held.items() if i != r) if lay is not None else 0
        self.inst[r].sched.finish(req)
        self.completed.append(Completed(req.request_id, req.metrics.arrival_time, req.metrics.first_token_time,
                                        self.now, req.num_prompt_tokens, len(req.output_token_ids),
                                        req.metrics.num_preemptions, r, remote))
        del self.requests[req.request_id]
        self.inst[r].high.pop(req.request_id, None)

    # ---- waking instances whose queue head may now be admitted ------------------------------------------
    def _admission(self, r: int) -> tuple[int | None, int]:
        """(last step to keep so the scheduler decides the next one, or None; key to watch with)."""
        inst = self.inst[r]
        head_need, lend = inst.head_need()
        p = self.mem.pools[r]
        own = self.mem.lendable(r)
        run = inst.run
        if run is None:
            return (0 if head_need <= p.free + lend else None), head_need - p.free + own
        if len(inst.sched.running) >= inst.sched.max_num_seqs:
            return None, 1 << 62
        s = run.steps_done(self.now) + 2
        while s <= run.num_steps and run.budget_left(s) <= 0:
            s += 1
        if s > run.num_steps:
            return None, 1 << 62  # the run's end decides
        free_s = p.free + run.reserved - run.blocks_upto(s)
        return (s - 1 if head_need <= free_s + lend else None), head_need - free_s + own

    def wake(self, r: int) -> None:
        inst = self.inst[r]
        self.head_group(r)
        if not inst.sched.waiting and (inst.guest is None or inst.run is not None):
            return
        if inst.run is None:
            self.start(r)
            return
        last, _ = self._admission(r)
        if last is not None and last < inst.run.num_steps:
            inst.truncate(last)
            self._push_end(r)
        else:
            self._watch(r)

    def _watch(self, r: int) -> None:
        inst = self.inst[r]
        self.block_token[r] += 1
        if not inst.sched.waiting or not self.policy.enabled or not self.policy.may_borrow(self.mem.pools[r].lent):
            return
        last, key = self._admission(r)
        if last is None and key < 1 << 62:
            heapq.heappush(self.blocked, (key, self.block_token[r], r))

    def settle(self) -> None:
        """After an event: wake instances that got memory back, then those the cluster can now lend to."""
        for _ in range(1_000_000):
            if self.mem.released_to:
                self.to_wake |= self.mem.released_to
                self.mem.released_to = set()
            if self.to_wake:
                r = min(self.to_wake)
                self.to_wake.discard(r)
                self.wake(r)
                continue
            if self.lendable_rose:
                self.lendable_rose = False
                while self.blocked and self.blocked[0][0] <= self.mem.total_lendable:
                    _, tok, r = heapq.heappop(self.blocked)
                    if tok == self.block_token[r]:
                        self.to_wake.add(r)
                if self.to_wake:
                    continue
            return

    # ---- the loop --------------------------------------------------------------------------------------------
    def run(self, trace: list[TraceRequest]) -> SimResult:
        for tr in trace:
            self.push(tr.arrival_s, ARRIVE, tr)
        last_arrival = max((t.arrival_s for t in trace), default=0.0)
        first_arrival = min((t.arrival_s for t in trace), default=0.0)
        high: dict[str, int] = {}
        for inst in self.inst:
            inst.high, inst.window_end = high, last_arrival
        pending_arrivals = len(trace)
        if self.policy.enabled and self.cfg.periodic_placement and trace:
            self.push(first_arrival + self.cfg.plan_interval_s, PLAN)
        deadline = last_arrival + self.cfg.drain_s
        while self.heap:
            t, kind, _, payload = heapq.heappop(self.heap)
            if t > deadline:
                break
            self.now = t
            self.events += 1
            if kind == END:
                self.end_step(*payload)
            elif kind == ARRIVE:
                pending_arrivals -= 1
                self.arrive(*payload)
            elif kind == MOVE:
                self.end_move(*payload)
            elif kind == GROUP:
                if self.end_round(*payload):
                    self.retry_held(True)
            else:
                busy = any(i.run is not None for i in self.inst) or self.moving or self.held
                if busy or pending_arrivals:
                    self.group_epoch += 1
                    self.replan()
                    self.retry_held(not self.groups)
                    self.push(t + self.cfg.plan_interval_s, PLAN)
            self.settle()
        for rid in self.requests:
            why = "unfinished when the run stopped (drain limit)" if self.heap else \
                "stuck: waiting for memory that no instance would free or lend"
            self.rejected.setdefault(why, []).append(rid)
        return SimResult(
            completed=self.completed, rejected=self.rejected, offered=len(trace), end_s=self.now,
            preemptions=sum(i.sched.num_preemptions for i in self.inst), moves=self.moves,
            blocks_moved=self.blocks_moved, moves_cancelled=self.moves_cancelled, borrows=self.mem.borrows,
            blocks_borrowed=self.mem.borrowed_blocks, capacity_tokens=self.capacity * self.cfg.block_size,
            busy_s=sum(i.busy_s for i in self.inst), instances=len(self.inst), steps=sum(i.steps for i in self.inst),
            events=self.events, window_s=last_arrival - first_arrival,
            window_tokens=sum(i.window_tokens for i in self.inst), groups=self.groups_formed,
            group_members=self.group_members, group_blocks=self.mem.group_blocks, groups_waited=self.groups_waited)


def _decodes(run) -> bool:
    """Whether a run's first step is a decode step (one token per request), as the runtime's
    heartbeat samples are: a prefill chunk's time says nothing of the per-request cost."""
    return isinstance(run, DecodeRun) or all(n == 1 for _, n in run.steps[0].work)


def simulate(trace: list[TraceRequest], cfg: SimConfig) -> SimResult:
    """Run ``trace`` on the deployment ``cfg``; deterministic for given inputs."""
    if not isinstance(cfg, SimConfig):
        raise TypeError(f"cfg must be a SimConfig, got {type(cfg).__name__}")
    ids = [t.request_id for t in trace]
    if len(set(ids)) != len(ids):
        raise ValueError("simulate: request ids in the trace must be unique")
    return _Sim(cfg).run(trace)
