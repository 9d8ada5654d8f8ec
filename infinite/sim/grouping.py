"""Prefill groups in the simulated cluster: a long prompt prefilled by several instances at once.

The decisions are the shared pure code: ``sp_policy.choose_group`` on
candidates built from the instances' state as their heartbeats would show
it, ``sp_layout`` for who computes and keeps which tokens, and
``sp_policy.choose_exchange`` for what moves in each round. This mixin of
the engine's ``_Sim`` simulates the rest:

* A group forms for a new long request (the gManager routes it to a group)
  or for a long request at the head of its home's queue (its home asks
  again after a placement run, after a group ends, or once the cluster may
  lend an eighth of the request more). A new
  long request no group can take yet may wait at the gManager for a running
  group's members (``worth_waiting``), first come first served; the others
  are routed. Its blocks are placed at once
  (``ClusterMemory.place``): each member's stripes in its own pool, lent to
  the home. The request waits aside, in no scheduler, until its prefill ends.
* A member's step in a round (``SimInstance._round_step``) carries its
  stripes of the round's two rows beside its own requests, which get
  ``GroupPolicy.own_tokens`` of its step budget from the real scheduler.
  Members' runs are cut at their step in progress, so each joins at its
  next step.
* A round ends when its slowest member's step ends: every layer waits for
  the other members' K/V or partial results. Once every member's step is
  known, each is costed with its share of the round's attention
  (``RoundTraffic``: the queries answered where the keys are, or the keys
  fetched) and its exchange (bytes on its link in each direction, over
  NVLink to members of its node and InfiniBand to the others), and all end
  when the latest does. A member's busy time is its own step's, not the
  wait for the others.
* After the last round the request has its first token and joins its
  home's batch; its KV stays spread, so decode runs at the home with remote
  MicroAttention, as for borrowed blocks.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from infinite.cluster.cost_model import CostModel
from infinite.cluster.sp_policy import (Candidate, ExchangeShape, GroupPlan, GroupPolicy, RoundTraffic,
                                        choose_exchange, choose_group, estimate_alone, worth_waiting)
from infinite.runtime.request import Request, Status
from infinite.sim.instance import GuestWork

GROUP = -1  # the engine's event kind for a round's end: before the members' step ends at the same time


@dataclass(eq=False)
class SimGroup:
    gid: int
    req: Request
    plan: GroupPlan
    started_s: float
    ends_s: float  # when the estimate says its prefill ends (the gManager's view)
    round: int = 0  # the round in progress (a zig-zag pair of the layout's rows)
    last_s: float = 0.0  # how long the last round took
    near: np.ndarray | None = None  # [g, g] members on the same node (NVLink)
    pending: dict[int, float] = field(default_factory=dict)  # member index -> start of its round step

    @property
    def members(self) -> tuple[int, ...]:
        return self.plan.layout.members

    def chunk(self, i: int) -> tuple[int, int]:
        return self.plan.layout.round_chunk(i, self.round)


class Grouping:
    """Methods of ``_Sim`` (which provides cfg, inst, mem, hws, policy, cost, now, push, ...)."""

    def init_groups(self, policy: GroupPolicy | None) -> None:
        self.gpolicy = policy if policy is not None and policy.enabled and self.policy.enabled else None
        m = self.cfg.model
        self.shape = ExchangeShape(m.query_bytes, m.partial_bytes, m.kv_bytes_per_token_layer)
        self.groups: dict[int, SimGroup] = {}
        self.gids = itertools.count()
        self.group_epoch = 0  # bumped at every placement run: a refused head is asked about again after it
        self.group_refused: dict[str, tuple[int, int]] = {}  # head -> (epoch, cluster's lendable) when refused
        self.groups_formed = self.group_members = self.groups_waited = 0
        self._gcost: tuple[CostModel, CostModel] | None = None
        self.held: deque[Request] = deque()  # new long requests waiting at the gManager for a group

    def group_cost(self) -> CostModel:
        """The cost model the choice prices with: the gManager's fitted one, with the prefill and
        exchange rates a cost probe of the rank would measure (here from the same roofline)."""
        if self._gcost is not None and self._gcost[0] is self.cost:
            return self._gcost[1]
        hw, budget = self.hws[0], self.cfg.max_num_batched_tokens
        spans = len({n for h in self.hws for n in h.nodes}) > 1
        _, bw = hw.gpu.link(not spans)
        model = self.cfg.model
        cost = replace(self.cost, prefill_token_s=hw.linear_s(budget, 0) / budget,
                       prefill_pair_s=model.num_layers * hw.attention_s(0.0, 1.0),
                       remote_token_s=(model.query_bytes + model.partial_bytes) / (hw.tp * bw))
        self._gcost = (self.cost, cost)
        return cost

    # ---- forming a group ----------------------------------------------------------------------------
    def _candidates(self, home: int | None, only: set[int] | None = None) -> list[Candidate]:
        """Every instance with spare compute (and the request's home, if it has one), as its heartbeat
        would show it: a member may keep what it may lend; a queued request's home what is free beyond
        its running requests' growth (the request is its queue's head: nothing before it). ``only``:
        those instances, taken as having spare compute whatever they do now."""
        out = []
        bs = self.cfg.block_size
        for r in (sorted(only) if only is not None else range(len(self.inst))):
            inst = self.inst[r]
            s, p = inst.sched, self.mem.pools[r]
            head_need = inst.head_need()[0]
            admits = bool(s.waiting) and head_need <= p.free and len(s.running) < s.max_num_seqs
            idle = only is not None or (inst.guest is None and not admits)
            if not idle and r != home:
                continue
            step = sum(1 for q in s.running if q.num_tokens - q.num_computed_tokens <= 1)  # its decodes
            ctx = sum(q.num_computed_tokens for q in s.running)
            if r == home:
                lays = self.mem.layouts
                running = [(x.num_tokens, x.num_prompt_tokens + x.max_tokens,
                            lays[x.request_id].total if x.request_id in lays else 0) for x in s.running]
                room = max(0, p.free - self.policy.own_demand(0, running, bs))
            else:
                room = self.mem.lendable(r)
            out.append(Candidate(r, len(s.running), ctx, step, room, idle and (home is None or r != home),
                                 may_lend=self.policy.may_lend(p.borrowed), may_borrow=self.policy.may_borrow(p.lent)))
        return out

    def try_group(self, req: Request, home: int | None) -> bool:
        """Ask the group policy about a fresh request (``home``: its queue's home, None: a new arrival)
        and form the group it picks; False when it picks none."""
        gp = self.gpolicy
        if gp is None or req.num_computed_tokens or req.output_token_ids or req.num_tokens < gp.min_prompt_tokens:
            return False
        if home is not None and self.inst[home].guest is not None:
            return False
        cands = self._candidates(home)
        busy = 1.0 - sum(c.idle for c in cands) / len(self.inst)
        plan = choose_group(req.num_tokens, cands, self.group_cost(), gp, self.shape,
                            self.cfg.max_num_batched_tokens, self.cfg.block_size, home, busy)
        if plan is None:
            return False
        self._form(req, plan, home)
        return True

    def hold_for_group(self, req: Request, home: int) -> bool:
        """Whether a new long request no group took should wait for one (rather than be prefilled
        alone at ``home``, where routing sends it): the running group that should end first frees
        its members; the group that could then form with them and the idle instances, after that
        wait, must still beat the home alone."""
        gp = self.gpolicy
        if gp is None or not gp.hold or not self.groups or req.num_tokens < gp.min_prompt_tokens:
            return False
        first = min(self.groups.values(), key=lambda g: g.ends_s)
        # Memory is the same for both ways (prefilled alone or by a group, the request needs its
        # blocks): the comparison is of compute, so the later group is priced on whole pools.
        spare = {c.rank for c in self._candidates(None)} | set(first.members)
        cands = [replace(c, room_blocks=self.mem.pools[c.rank].total) for c in self._candidates(None, only=spare)]
        cost, budget = self.group_cost(), self.cfg.max_num_batched_tokens
        later = choose_group(req.num_tokens, cands, cost, gp, self.shape, budget, self.cfg.block_size)
        home_c = self._candidates(None, only={home})[0]
        alone = estimate_alone(req.num_tokens, home_c, cost, budget)
        return worth_waiting(alone, max(0.0, first.ends_s - self.now), later, gp)

    def retry_held(self, group_ended: bool) -> None:
        """The gManager's queue of long requests waiting for a group, first come first served: the
        first one forms a group when it can; when a group ended, one for which waiting no longer pays
        is routed (the estimate of the wait changes only then)."""
        while self.held:
            req = self.held[0]
            if self.try_group(req, None):
                self.held.popleft()
                self.groups_waited += 1
                continue
            if not group_ended:
                return
            home = self.route(self.request_blocks(req))
            if home is not None and self.hold_for_group(req, home):
                return
            self.held.popleft()
            self.enqueue_new(req, home)

    def head_group(self, r: int) -> None:
        """The home's question for its queue head: again after a placement run, after a group ended
        (its members are free), or once the cluster may lend an eighth of the request more than when
        it was last refused (its heartbeat shows all three)."""
        s = self.inst[r].sched
        if self.gpolicy is None or not s.waiting:
            return
        head = s.waiting[0]
        last = self.group_refused.get(head.request_id)
        if last is not None and last[0] == self.group_epoch and \
                self.mem.total_lendable < last[1] + self.request_blocks(head) // 8:
            return
        if not self.try_group(head, r):
            self.group_refused[head.request_id] = (self.group_epoch, self.mem.total_lendable)

    def _form(self, req: Request, plan: GroupPlan, queued_at: int | None) -> None:
        rid = req.request_id
        if queued_at is not None:  # out of its home's queue: it is prefilled by the group
            self.inst[queued_at].sched.waiting.remove(req)
            self.mem.pools[queued_at].demand -= self.queued.pop(rid, 0)
            self.group_refused.pop(rid, None)
        self.mem.place(rid, plan.home, plan.layout.runs())
        grp = SimGroup(next(self.gids), req, plan, self.now, self.now + plan.group_s)
        self.groups[grp.gid] = grp
        self.groups_formed += 1
        self.group_members += plan.layout.size
        for i, m in enumerate(plan.members):
            inst = self.inst[m]
            inst.guest, inst.guest_tokens = grp, grp.chunk(i)[1] - grp.chunk(i)[0]
            inst.guest_own = self.gpolicy.own_tokens
            if inst.run is not None:  # it joins at its next step
                inst.truncate(inst.run.steps_done(self.now) + 1)
                self._push_end(m)
            else:
                self.to_wake.add(m)
            self.own_demand(m)

    # ---- rounds -------------------------------------------------------------------------------------
    def group_step(self, r: int, t0: float) -> None:
        """Member ``r`` scheduled its step of the round (from ``t0``); the last one closes the round."""
        grp = self.inst[r].guest
        grp.pending[grp.members.index(r)] = t0
        if len(grp.pending) == len(grp.members):
            self._close_round(grp)

    def _exchange_s(self, grp: SimGroup, tr: RoundTraffic) -> np.ndarray:
        """Seconds per layer each member's exchange takes: per link kind (NVLink inside its node,
        InfiniBand to other nodes), a message's latency and the larger direction's bytes."""
        if grp.near is None:
            m = grp.members
            grp.near = np.array([[a != b and self.inst[a]._near(b) for b in m] for a in m])
        hw = self.inst[grp.members[0]].hw
        t = np.zeros(len(grp.members))
        for near, mask in ((True, grp.near), (False, ~grp.near & ~np.eye(len(grp.members), dtype=bool))):
            out, into = (tr.sent * mask).sum(1), (tr.sent * mask).sum(0)
            lat, bw = hw.gpu.link(near)
            busy = np.maximum(out, into)
            t = np.maximum(t, np.where(busy > 0, lat + busy / (hw.tp * bw), 0.0))
        return t

    def _close_round(self, grp: SimGroup) -> None:
        members = grp.members
        chunks = [grp.chunk(i) for i in range(len(members))]
        tr = choose_exchange(grp.plan.layout, grp.round, self.shape)
        wait = self._exchange_s(grp, tr)
        costs = []
        for i, m in enumerate(members):
            n = chunks[i][1] - chunks[i][0]
            work = GuestWork(n, float(tr.reads[i]), float(tr.pairs[i]), float(wait[i]))
            costs.append(self.inst[m].round_cost(work, grp.last_s))
        start = max(grp.pending.values())
        end = max(grp.pending[i] + sec for i, (sec, _) in enumerate(costs))
        grp.last_s = end - start
        for i, m in enumerate(members):
            inst = self.inst[m]
            inst.run.settle(end, *costs[i])
            if end <= inst.window_end:
                inst.window_tokens += chunks[i][1] - chunks[i][0]
            self._push_end(m)
        grp.pending.clear()
        self.push(end, GROUP, grp.gid)

    def end_round(self, gid: int) -> bool:
        """A round ended: the next round's chunks, or, after the last, the request's first token (and
        True: its members are free for another group)."""
        grp = self.groups[gid]
        grp.round += 1
        lay = grp.plan.layout
        if grp.round < lay.rounds:
            for i, m in enumerate(grp.members):
                a, b = grp.chunk(i)
                self.inst[m].guest_tokens = b - a
            return False
        del self.groups[gid]
        self.group_refused.clear()  # its members are free: every refused head may ask again
        for m in grp.members:
            self.inst[m].guest, self.inst[m].guest_tokens = None, 0
        req, home = grp.req, grp.plan.home
        req.num_computed_tokens = req.num_tokens
        self.inst[home].high[req.request_id] = req.num_tokens
        req.output_token_ids.append(0)
        req.metrics.first_token_time = req.metrics.last_token_time = self.now
        req.status = Status.RUNNING
        self.inst[home].sched.running.append(req)
        self.mem.dirty.add(home)
        if len(req.output_token_ids) >= req.max_tokens:
            self.finish(home, req)
        return True
