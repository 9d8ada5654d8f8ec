"""The gManager's side of the simulated cluster: own demand, loans, the periodic placement, migrations.

A mixin of the engine's ``_Sim`` (infinite.sim.engine), kept apart so each
file has one job: here is everything that decides where KV blocks go after a
request has a home — what a creditor keeps for itself, whether an
on-demand loan pays (``placement.loan_gain``), the periodic ``placement.plan``
on a snapshot of the cluster, and the migrations it orders (which take link
time and hold memory on both ends).
"""

from __future__ import annotations

from dataclasses import replace

from infinite.cluster.cost_model import fit
from infinite.cluster.placement import ClusterSnapshot, RequestState, loan_gain, plan
from infinite.kv.rmanager import blocks_for
from infinite.sim.costs import migration_time

MOVE = 1  # the engine's event kind for a finished migration


class Planning:
    """Methods of ``_Sim`` (which provides cfg, policy, pcfg, mem, inst, hws, cost, samples, ...)."""

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

    def loan_pays(self, debtor: int, plan_: list[tuple[int, int]], admits: bool, new_calls: int) -> bool:
        """The gManager's no-regret check of an on-demand loan (placement.loan_gain with the fitted
        cost model), on the instances it involves."""
        lays = self.mem.layouts
        reqs = tuple(RequestState(q.request_id, debtor, q.num_computed_tokens, dict(lays[q.request_id].held))
                     for q in self.inst[debtor].sched.running if q.request_id in lays and lays[q.request_id].remote_n)
        ranks = {debtor, *(c for c, _ in plan_), *(i for q in reqs for i in q.blocks)}
        states = tuple(self.state(r) for r in sorted(ranks))
        gain = loan_gain(ClusterSnapshot(states, reqs, self.cfg.block_size), self.cost, debtor, plan_,
                         admits=admits, new_calls=new_calls)
        return gain > self.pcfg.min_gain

    # ---- the periodic placement ----------------------------------------------------------------------------
    def replan(self) -> None:
        # The gManager refits on every run; here, once a quarter of the window is new (the fit is the
        # costliest part of a tick and moves little between ticks).
        if len(self.samples) >= 8 and self.new_samples >= max(8, self.samples.maxlen // 4):
            self.cost = fit(list(self.samples), prior=self.cost)
            self.new_samples = 0
        waits = sorted(i.wait_per_call_s for i in self.inst if i.wait_per_call_s > 0)
        if waits:  # the remote latency the debtors measure, as the gManager calibrates it
            self.cost = replace(self.cost, remote_latency_s=waits[len(waits) // 2])
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
        for mv in plan(ClusterSnapshot(tuple(self.states), tuple(reqs), self.cfg.block_size), self.cost, self.pcfg):
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

