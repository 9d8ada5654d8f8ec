"""The gManager's side of the simulated cluster: own demand, loans, the periodic placement, migrations.

A mixin of the engine's ``_Sim`` (infinite.sim.engine), kept apart so each
file has one job: here is everything that decides where KV blocks go after a
request has a home — what a creditor keeps for itself, whether an
on-demand loan is made, the periodic ``placement.plan`` on a snapshot of the
cluster, and the migrations it orders (which take link time and hold memory
on both ends). The decisions are the runtime gManager's own functions
(``infinite.cluster.decisions``: ``grant_loan``, ``loans_pay``,
``loan_gain_near``, ``planning_config``; the cost model's ``Calibration``),
called on the simulated state.
"""

from __future__ import annotations

from infinite.cluster.cost_model import CostModel
from infinite.cluster.decisions import grant_loan, loan_gain_near, loans_pay, planning_config
from infinite.cluster.placement import ClusterSnapshot, RequestState, plan
from infinite.kv.rmanager import blocks_for
from infinite.sim.allocator import Hints
from infinite.sim.costs import InstanceHW, migration_time

MOVE = 1  # the engine's event kind for a finished migration


def probe_prior(hw: InstanceHW, latency_s: float) -> CostModel:
    """The gManager's starting cost model, as cost_probe measures it on the rank's own model and
    device: the non-attention time at batch 1 and 16 and decode attention per context token (here
    from the same roofline the steps cost), the remote latency from the data-plane probe."""
    one, sixteen = hw.base_s(1, 1), hw.base_s(16, 16)
    per_request = max(0.0, (sixteen - one) / 15)
    return CostModel(base_s=max(1e-6, one - per_request), per_request_s=per_request,
                     per_context_token_s=hw.model.num_layers * hw.decode_token_s, remote_latency_s=latency_s,
                     num_layers=hw.model.num_layers)


class Planning:
    """Methods of ``_Sim`` (which provides cfg, policy, pcfg, mem, inst, hws, cost, calib, ...)."""

    def own_demand(self, r: int) -> None:
        """What instance ``r`` keeps for itself (its heartbeat's demand_blocks): its queue and its
        running requests' growth (LendingPolicy.own_demand), as of now, a scheduling point."""
        p = self.mem.pools[r]
        if self.policy.enabled:
            lays = self.mem.layouts
            running = [(x.num_tokens, x.num_prompt_tokens + x.max_tokens,
                        lays[x.request_id].total if x.request_id in lays else 0) for x in self.inst[r].sched.running]
            bs = self.cfg.block_size
            queue = self.policy.queue_demand((blocks_for(x.num_tokens + 1, bs) for x in self.inst[r].sched.waiting),
                                             p.total)
            p.own = self.policy.own_demand(queue, running, self.cfg.block_size)
        self.mem.refresh(r)

    def loan_pays(self, debtor: int, plan_: list[tuple[int, int]], admits: bool, new_calls: int,
                  request_blocks: int) -> bool:
        """The gManager's answer to an on-demand loan (decisions.grant_loan, as GManager.borrow asks
        it): for a request no home pool can hold, yes; otherwise only with the calibrated cost model's
        predicted gain (placement.loan_gain on the instances involved)."""
        return grant_loan(request_blocks, self.mem.pools[debtor].total, self.calib.calibrated,
                          lambda: self._gain(debtor, plan_, admits, new_calls), self.pcfg.min_gain)

    def loans_pay_hint(self, r: int) -> Hints:
        """The heartbeat reply's word to a debtor: does the gManager lend for throughput at all, and
        would a loan admitting one more request of its mean size pay (decisions.loans_pay, as
        GManager._calibrate asks it)? Asked when the instance needs it and kept until the next
        plan, as the runtime keeps the last heartbeat's answer."""
        hint = self.hints.get(r)
        if hint is None:
            mem = self.mem
            pays = loans_pay(self.policy, mem.peer(r), len(self.inst[r].sched.running),
                             lambda n: mem.candidates(r, n, {}), self.calib.calibrated,
                             lambda plan_: self._gain(r, plan_, True, len(plan_)), self.pcfg.min_gain)
            hint = self.hints[r] = Hints(self.calib.calibrated and self.policy.enabled, pays)
        return hint

    def _gain(self, debtor: int, plan_: list[tuple[int, int]], admits: bool, new_calls: int) -> float:
        lays = self.mem.layouts
        reqs = [RequestState(q.request_id, debtor, q.num_computed_tokens, dict(lays[q.request_id].held))
                for q in self.inst[debtor].sched.running if q.request_id in lays and lays[q.request_id].remote_n]
        return loan_gain_near(self.state, debtor, plan_, reqs, self.cfg.block_size, self.cost, admits=admits,
                              new_calls=new_calls)

    # ---- the periodic placement ----------------------------------------------------------------------------
    def replan(self) -> None:
        # as GManager._calibrate: refit when due (the samples carry their remote calls, so the fit
        # learns what remote calls add to a step), then the loan hints are asked afresh
        self.cost = self.calib.refit(self.cost, self.now, self.policy.eager)
        self.hints = {}
        # an instance idle behind a head its loans were refused for asks again after a heartbeat, as
        # the runtime's step loop does (the answer may have changed with the plan)
        self.to_wake.update(r for r, i in enumerate(self.inst) if i.run is None and i.sched.waiting)
        cands = self._plan_candidates()
        if not cands:
            return  # no debtor by the planner's rule and no debt to bring home: plan would return []
        for r in cands:
            self.inst[r].sync(self.now)
        reqs = []
        for r in cands:
            for q in self.inst[r].sched.running:
                lay = self.mem.layouts.get(q.request_id)
                if lay is not None and lay.total:
                    reqs.append(RequestState(q.request_id, r, q.num_computed_tokens, dict(lay.held)))
        self.flush()
        pcfg = planning_config(self.pcfg, self.calib.calibrated)  # as GManager.plan_once
        for mv in plan(ClusterSnapshot(tuple(self.states), tuple(reqs), self.cfg.block_size), self.cost, pcfg):
            self._start_move(mv)

    def _plan_candidates(self) -> list[int]:
        """Instances whose requests the planner may move: debtors by its rule, and homes of requests with
        blocks elsewhere. The others' requests cannot be a move's source, so they stay out of the snapshot."""
        thr = self.pcfg.debtor_batch_threshold
        out = []
        for r, inst in enumerate(self.inst):
            p = self.mem.pools[r]
            if len(inst.sched.running) < thr or p.demand > p.free or p.borrowed > 0:
                out.append(r)
        return out

    def _start_move(self, mv) -> None:
        """The gManager's move_kvcache at the home: push its oldest full blocks to a creditor, or
        pull a creditor's blocks home (creditor to creditor is not a move the runtime makes)."""
        rid = mv.request_id
        lay = self.mem.layouts.get(rid)
        if lay is None or rid in self.moving or (mv.src != lay.home and mv.dst != lay.home):
            return
        req = self.requests[rid]
        n = min(mv.num_blocks, lay.full_on(mv.src, req.num_computed_tokens // self.cfg.block_size))
        if mv.src == lay.home:
            n = min(n, lay.held.get(lay.home, 0) - 1)  # the newest block stays home
            n = min(n, self.policy.lendable(self.mem.peer(mv.dst)))  # the creditor's last word
        else:
            n = min(n, self.mem.pools[lay.home].free)  # blocks come home into free blocks
        if n <= 0:
            return
        mid = self.mem.start_move(mv.src, mv.dst, lay.home, n)
        self.moving[rid] = mid
        self.moves += 1
        src, dst = self.hws[mv.src], self.hws[mv.dst]
        t = migration_time(src, src.same_node(dst), n, self.cfg.block_size)
        self.push(self.now + t, MOVE, rid, mid, lay.epoch, lay.home, n)

    def end_move(self, rid: str, mid: int, epoch: int, home: int, n: int) -> None:
        self.moving.pop(rid, None)
        lay = self.mem.layouts.get(rid)
        src = self.mem.moving[mid][0]
        if lay is None or lay.epoch != epoch or lay.held.get(src, 0) < n + (src == home):
            self.mem.cancel_move(mid)
            self.moves_cancelled += 1
            return
        inst = self.inst[home]
        if inst.run is not None:  # the steps after the one in progress see the new layout
            inst.truncate(inst.run.steps_done(self.now) + 1)
            inst.sync(self.now)
            self._push_end(home)
        self.mem.finish_move(mid, rid)
        self.blocks_moved += n

