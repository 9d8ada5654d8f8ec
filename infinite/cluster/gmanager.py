"""gManager: the cluster's coordinator on rank 0.

It keeps what the heartbeats report (free memory, batch, step time, and the
placement map: how many blocks of each request sit on each instance), the
debt ledger derived from that map, routes new requests to a home instance,
hands out borrowed blocks on demand, and periodically reruns the greedy
debtor/creditor placement (infinite.cluster.placement.plan), issuing
move_kvcache to the debtors. Its view may be stale: creditors have the last
word (try_move_kvcache / reserve is first-come-first-served). Who may lend
how much is the LendingPolicy's; whether a loan pays is decided by
infinite.cluster.decisions (the simulator calls the same functions).

Threads: heartbeats and borrows arrive on transport threads, routing on rank
0's event loop (which also serves HTTP), and the periodic placement is driven
from the gManager's own thread and planned in a worker process
(infinite.cluster.planner), so that a round at 64 instances and 10K requests
holds up neither the loop nor, through the GIL, rank 0's own steps. All shared
state sits behind ``lock``; a round plans on a snapshot taken under it. Per heartbeat the work is
O(placement entries that changed), per route O(instances): the lendable
blocks of each instance are kept as their heartbeats and loans change them.

A round is bounded in time (``plan_budget_s``, placement.PlanBudget): the
greedy placement stops once the budget is spent and the moves found so far
are issued — each was chosen on the state after the ones before it, so a
prefix of the greedy sequence is a plan of its own. The next round plans on a
fresh view in which the requests with a move in flight are left out, and a
search cut midway resumes where it stopped, so rounds go on through work
longer than one round.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import msgspec

from infinite.cluster import messages as M
from infinite.cluster.cost_model import Calibration, CostModel, StepSample
from infinite.cluster.decisions import grant_loan, loan_gain_near, loans_pay, planning_config
from infinite.cluster.placement import ClusterSnapshot, InstanceState, Move, PlacementConfig, RequestState, route
from infinite.cluster.planner import Planner
from infinite.cluster.policy import LendingPolicy, Peer
from infinite.cluster.prefix_routing import PrefixIndex, PrefixRouting, Routed, choose_home
from infinite.cluster.sp_policy import ExchangeShape, GroupPlan, GroupPolicy, choose_group
from infinite.cluster.sp_route import group_candidates
from infinite.cluster.transport import PeerError, Transport, wait_all

log = logging.getLogger(__name__)

PLAN_BUDGET_S = 0.1  # the most one placement round may take (the interval is 0.5 s)
MOVE_WAIT_S = 5.0  # one move per request until a heartbeat shows it (or this long)


@dataclass(frozen=True)
class PlanRound:
    """What the last placement round did: for /status and the tests of its bound."""

    seconds: float
    moves: int
    stopped_early: bool  # the budget ran out before the greedy placement had nothing left to gain


class GManager:
    def __init__(self, transport: Transport, block_size: int, num_layers: int, policy: LendingPolicy,
                 interval_s: float = 0.5, timeout_s: float = 30.0, prior: CostModel | None = None,
                 plan_budget_s: float = PLAN_BUDGET_S) -> None:
        """``prior``: the cost model measured on this hardware (cost_probe); until the heartbeats'
        step times have been fitted the gManager makes no loan or move for throughput alone."""
        self.transport = transport
        self.world_size = transport.world_size
        self.block_size = block_size
        self.policy = policy
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.plan_budget_s = plan_budget_s
        self.pcfg = PlacementConfig(policy=policy)
        self.cost = prior or CostModel(num_layers=num_layers)
        self.calib = Calibration()  # the heartbeats' decode steps, and whether the fit is trusted
        self.probe_s: list[float] = []  # the data plane's measured round trips per layer, sorted
        self._loans_pay: dict[int, bool] = {}  # per rank, as of the last plan
        self.lock = threading.Lock()
        self.instances: dict[int, M.InstanceStats] = {}  # rank -> last heartbeat (adjusted by loans since)
        self.requests: dict[str, RequestState] = {}  # the placement map, as the homes' heartbeats report it
        self._homed: dict[int, set[str]] = {}  # home -> its requests
        self._remote: dict[int, set[str]] = {}  # home -> its requests with blocks elsewhere (the debts)
        self.pending: dict[int, int] = {}  # blocks routed to a rank since its last heartbeat
        self._lendable: dict[int, int] = {}  # rank -> blocks it may lend now (the policy, on this view)
        self._lendable_serving = 0  # their sum over the serving ranks
        self.pending_requests: dict[int, int] = {}  # requests routed to a rank since its last heartbeat
        self.prefixes = PrefixIndex()  # which instance caches which prefix (anchors from the heartbeats)
        self.prefix_routing = PrefixRouting()
        self._moves_in_flight: dict[str, float] = {}
        self.moves_issued = 0
        self.loans_refused = 0  # on-demand loans the cost model said would not pay
        self.recent_rounds: deque[PlanRound] = deque(maxlen=64)  # the last placement rounds, newest last
        self.rounds = 0  # placement rounds run
        self._resume: tuple[int, str] | None = None  # where the last round's search was cut (PlanBudget)
        self.planner = Planner()  # large rounds run in its worker process
        self._rr = 0
        # Ranks that take requests and lend (the supervisor's membership decides; draining and
        # gone ranks are out of routing, borrowing and placement).
        self.serving: frozenset[int] = frozenset(range(self.world_size))
        self.on_unreachable = None  # callable(rank, error): a call to a rank failed (the supervisor checks it)
        self.grouped: dict[str, tuple[int, ...]] = {}  # prefill groups routed and not yet ended: request -> members

    @property
    def calibrated(self) -> bool:
        """The step-time model has been fitted to this cluster's measured remote steps (or eager)."""
        return self.calib.calibrated

    @calibrated.setter
    def calibrated(self, value: bool) -> None:
        self.calib.calibrated = value

    def calibrate_transport(self, rounds: int = 20) -> float:
        """Probe the data plane to every other rank: the cost model's remote-MA latency (per call,
        per layer) until real remote calls are measured. It differs by orders of magnitude between
        NVLink and loopback TCP, so no default fits."""
        rtts = sorted(self.transport.probe(r, timeout=self.timeout_s)
                      for r in sorted(self.serving - {self.transport.rank}) for _ in range(rounds))
        self.probe_s = rtts
        if rtts:
            self.cost = replace(self.cost, remote_latency_s=rtts[len(rtts) // 2])
        return self.cost.remote_latency_s

    def _calibrate(self) -> None:
        """Refit the step-time model to the heartbeats' decode steps (every REFIT_S: a fit costs
        tens of ms); each sample carries its remote calls per layer, so the remote latency is what
        remote calls actually added to measured steps — waits and the contention they cause alike
        — with the probe as the prior. Then the heartbeat's word to each debtor: would a loan pay?"""
        self.cost = self.calib.refit(self.cost, time.monotonic(), self.policy.eager)
        with self.lock:
            peers = [self._peer(s) for r, s in self.instances.items() if r in self.serving]
        self._loans_pay = {r: self._would_pay(r, peers) for r in list(self.instances)}

    def _would_pay(self, rank: int, peers: list[Peer]) -> bool:
        """Whether a loan admitting one more request of the sender's mean size would pay
        (decisions.loans_pay, as the simulator asks it)."""
        with self.lock:
            me = self.instances.get(rank)
            if me is None:
                return False
            peer = self._peer(me)
        return loans_pay(self.policy, peer, me.num_running, lambda n: peers, self.calibrated,
                         lambda loans: self._loan_gain(rank, loans, admits=True, new_calls=len(loans)),
                         self.pcfg.min_gain)

    def _loan_gain(self, debtor: int, loans: list[tuple[int, int]], *, admits: bool, new_calls: int) -> float:
        """placement.loan_gain on the instances the loan involves (O(them), not O(cluster))."""
        with self.lock:
            reqs = [self.requests[rid] for rid in self._remote.get(debtor, ())]
            return loan_gain_near(self._state, debtor, loans, reqs, self.block_size, self.cost, admits=admits,
                                  new_calls=new_calls)

    # ---- heartbeats --------------------------------------------------------------------------
    def on_heartbeat(self, beat: M.Heartbeat) -> M.HeartbeatReply:
        """O(placement entries and decode steps the beat carries), whatever the cluster holds."""
        s = beat.stats
        with self.lock:
            self.instances[s.rank] = s = self._newer_pool(self.instances.get(s.rank), s)
            self.pending[s.rank] = 0
            self.pending_requests[s.rank] = 0
            self.prefixes.apply(s.rank, beat.prefix_added, beat.prefix_removed, beat.prefix_everything)
            self._relend(s.rank)
            if beat.placement_full:
                listed = {e.request_id for e in beat.placement_changed}
                for rid in [rid for rid in self._homed.get(s.rank, ()) if rid not in listed]:
                    self._forget(rid)
            for e in beat.placement_changed:
                self._place(RequestState(e.request_id, s.rank, e.context_len, dict(e.blocks)))
                self._moves_in_flight.pop(e.request_id, None)
            for rid in beat.placement_removed:
                self._forget(rid)
            borrowable = self._borrowable(s.rank)
        self.calib.extend(StepSample(d.batch_size, d.context_tokens, d.step_s, d.remote_calls)
                          for d in beat.decode_steps)
        return M.HeartbeatReply(borrowable, self._loans_pay.get(s.rank, False),
                                lends_for_throughput=self.calibrated and self.policy.enabled)

    @staticmethod
    def _newer_pool(other: M.InstanceStats | M.Reserved | None, s: M.InstanceStats) -> M.InstanceStats:
        """``s`` with the pool counts (free, used, lent) of whichever of the two readings is newer.

        Between heartbeats a reservation's reply carries the creditor's counts, read after it
        reserved; a beat may be read before or after that and arrive before or after the reply.
        Adding the reserved blocks to the view, as the gManager did, counted them twice whenever
        the beat already held them (a creditor of 9 blocks seen lending 16, and every snapshot
        failing its check); keeping the newer reading whole keeps the view one state the
        creditor's pool was in."""
        if other is None or other.pool_version <= s.pool_version:
            return s
        return msgspec.structs.replace(s, free_blocks=other.free_blocks, used_blocks=other.used_blocks,
                                       lent_blocks=other.lent_blocks, pool_version=other.pool_version)

    def on_join(self, rank: int, stats: M.InstanceStats) -> None:
        """A rank joined: its first stats, before its first heartbeat."""
        with self.lock:
            self.instances[rank] = stats
            self._relend(rank)

    def _place(self, rs: RequestState) -> None:
        """Under the lock: the request's placement is ``rs`` now."""
        old = self.requests.get(rs.request_id)
        if old is not None and old.home != rs.home:
            self._forget(rs.request_id)
        self.requests[rs.request_id] = rs
        self._homed.setdefault(rs.home, set()).add(rs.request_id)
        remote = self._remote.setdefault(rs.home, set())
        if any(k != rs.home and n > 0 for k, n in rs.blocks.items()):
            remote.add(rs.request_id)
        else:
            remote.discard(rs.request_id)

    def _forget(self, rid: str) -> None:
        """Under the lock: the request is gone from the placement map."""
        rs = self.requests.pop(rid, None)
        self._moves_in_flight.pop(rid, None)
        if rs is not None:
            self._homed.get(rs.home, set()).discard(rid)
            self._remote.get(rs.home, set()).discard(rid)

    def _peer(self, s: M.InstanceStats) -> Peer:
        return Peer(s.rank, s.total_blocks, s.free_blocks, s.lent_blocks, s.borrowed_blocks,
                    reserved=s.demand_blocks + self.pending.get(s.rank, 0))

    def _state(self, r: int) -> InstanceState:
        """Under the lock: instance ``r`` as placement input."""
        s = self.instances[r]
        return InstanceState(rank=r, total_blocks=s.total_blocks,
                             free_blocks=max(0, s.free_blocks - self.pending.get(r, 0)),
                             lent_blocks=s.lent_blocks, batch_size=s.num_running, waiting_blocks=s.waiting_blocks,
                             waiting_requests=s.num_waiting, borrowed_blocks=s.borrowed_blocks,
                             alive=r in self.serving)

    def _relend(self, r: int) -> None:
        """Under the lock: instance ``r``'s view changed (a beat, a loan, a route): its lendable
        blocks, and their sum over the serving ranks, follow."""
        s = self.instances.get(r)
        new = self.policy.lendable(self._peer(s)) if s is not None else 0
        old = self._lendable.get(r, 0)
        self._lendable[r] = new
        if r in self.serving:
            self._lendable_serving += new - old

    def _borrowable(self, rank: int) -> int:
        """Under the lock: what the serving ranks other than ``rank`` may lend it (O(1))."""
        me = self.instances.get(rank)
        if me is None or not self.policy.may_borrow(me.lent_blocks):
            return 0
        return self._lendable_serving - (self._lendable.get(rank, 0) if rank in self.serving else 0)

    # ---- membership ------------------------------------------------------------------------
    def set_serving(self, ranks: frozenset[int]) -> None:
        with self.lock:
            self.serving = frozenset(ranks)
            self._lendable_serving = sum(n for r, n in self._lendable.items() if r in self.serving)

    def drop(self, rank: int) -> None:
        """``rank`` is gone: forget its heartbeat, its requests, and every block it held for
        others, so the ledger holds no debt to or from it (its requests are recomputed)."""
        with self.lock:
            self.instances.pop(rank, None)
            self.pending.pop(rank, None)
            self.pending_requests.pop(rank, None)
            self.prefixes.drop(rank)
            self._lendable.pop(rank, None)
            self.serving = self.serving - {rank}
            self._lendable_serving = sum(n for r, n in self._lendable.items() if r in self.serving)
            for rid in list(self._homed.pop(rank, ())):
                self._forget(rid)
            self._remote.pop(rank, None)
            for rs in [rs for rs in self.requests.values() if rank in rs.blocks]:
                self._place(replace(rs, blocks={k: n for k, n in rs.blocks.items() if k != rank}))

    # ---- prefill groups --------------------------------------------------------------------------
    def choose_group(self, request_id: str, prompt_tokens: int, policy: GroupPolicy, shape: ExchangeShape,
                     step_budget: int) -> GroupPlan | None:
        """The prefill group of a new request (``sp_policy.choose_group`` on the heartbeats' view and
        the runtime's cost model), remembered until ``group_ended``; None: its home alone."""
        with self.lock:
            in_group = {r for ms in self.grouped.values() for r in ms}
            cands = group_candidates(self.instances, self.serving, self._lendable, in_group)
            busy = sum(1 for c in cands if c.batch_size or not c.idle) / max(1, len(cands))
            plan = choose_group(prompt_tokens, cands, self.cost, policy, shape, step_budget, self.block_size,
                                busy_share=busy)
            if plan is not None:
                self.grouped[request_id] = plan.members
        return plan

    def group_ended(self, request_id: str) -> None:
        """The request's group prefill is over (its first output came, or it ended): the members
        may join other groups."""
        with self.lock:
            self.grouped.pop(request_id, None)

    # ---- routing and on-demand borrowing ------------------------------------------------------
    def snapshot(self, with_requests: bool = True) -> ClusterSnapshot:
        """The gManager's view as placement input. Heartbeats of different ranks are taken at
        different moments; when they disagree (a request's blocks counted on a creditor before
        its own beat shows the loan), the view drops the requests rather than fail."""
        try:
            return self._snapshot(with_requests)
        except ValueError:
            return self._snapshot(False)

    def _snapshot(self, with_requests: bool, leave_out: frozenset[str] | set[str] = frozenset()) -> ClusterSnapshot:
        """O(instances + requests): the placement map is kept as RequestStates, nothing is rebuilt."""
        with self.lock:
            insts = tuple(self._state(r) for r in sorted(self.instances))
            reqs = tuple(rs for rs in self.requests.values()
                         if rs.blocks and rs.home in self.instances and rs.request_id not in leave_out
                         ) if with_requests else ()
        return ClusterSnapshot(insts, reqs, self.block_size)

    def route(self, prompt_blocks: int) -> int:
        """Home for a new request; round robin until every serving instance has reported."""
        return self.route_request(prompt_blocks).home

    def route_request(self, prompt_blocks: int, chain: list[tuple[int, int]] | None = None,
                      pinned: int | None = None) -> Routed:
        """Home for a new request whose prompt has the anchor ``chain`` (infinite.kv.prefix.anchors):
        the load-only choice, unless an instance that can hold it caches a prefix of it and is not
        busy (prefix_routing.choose_home); round robin until every serving instance has reported.
        ``pinned``: the home is that instance (the caller checked it serves); the hint still names
        a deeper holder. O(instances + chain): routing reads the instances, not the placement map."""
        serving = sorted(self.serving)
        if not serving:
            raise RuntimeError("no instance is serving")
        if pinned is not None:
            routed = Routed(pinned)
            if chain:
                with self.lock:
                    depths = self.prefixes.depths(chain, serving)
                best = max(serving, key=lambda r: (depths[r], r == pinned, -r))
                if depths[best] > depths[pinned]:
                    routed = Routed(pinned, best, depths[best])
        elif not set(serving) <= set(self.instances):
            self._rr += 1
            routed = Routed(serving[(self._rr - 1) % len(serving)])
        else:
            snap = self.snapshot(with_requests=False)
            home = route(snap, self.pcfg, prompt_blocks)
            if home is None or home not in self.serving:  # the front door checked the capacity; take the most free
                home = max((i for i in snap.instances if i.rank in self.serving), key=lambda i: i.free_blocks).rank
            routed = Routed(home)
            if chain:
                room = {i.rank: i.free_blocks - i.waiting_blocks for i in snap.instances}
                with self.lock:
                    loads = {r: s.num_running + s.num_waiting + self.pending_requests.get(r, 0)
                             for r, s in self.instances.items() if r in self.serving}
                    depths = self.prefixes.depths(chain, loads)
                routed = choose_home(home, loads, depths, self.prefix_routing, room, prompt_blocks)
        with self.lock:
            self.pending[routed.home] = self.pending.get(routed.home, 0) + prompt_blocks
            self.pending_requests[routed.home] = self.pending_requests.get(routed.home, 0) + 1
            self._relend(routed.home)
        return routed

    def borrow(self, msg: M.Borrow) -> M.Borrowed:
        """Reserve blocks on creditors for a debtor's request, in the policy's order; all or nothing.
        No regret (decisions.grant_loan): unless the request can never fit its home's pool, the loan
        is made only when the calibrated cost model predicts that the cluster gains."""
        with self.lock:
            me = self.instances.get(msg.debtor)
            if me is None:
                return M.Borrowed([])
            placed = self.requests.get(msg.request_id)
            held = dict(placed.blocks) if placed is not None else {}
            plan_ = self.policy.borrow_plan(self._peer(me), msg.num_blocks,
                                            [self._peer(s) for r, s in self.instances.items() if r in self.serving], held)
        if not plan_:
            return M.Borrowed([])
        new_calls = sum(1 for c, _ in plan_ if held.get(c, 0) == 0)
        if not grant_loan(msg.request_blocks, me.total_blocks, self.calibrated,
                          lambda: self._logged_gain(msg, plan_, new_calls), self.pcfg.min_gain):
            self.loans_refused += 1
            return M.Borrowed([])
        got: list[tuple[int, int]] = []
        for rank, take in plan_:
            try:
                reply = self.transport.reserve(rank, M.Reserve(msg.debtor, msg.request_id, take),
                                               timeout=self.timeout_s).wait()
            except Exception as e:  # noqa: BLE001
                log.warning("reserve on rank %d failed: %s", rank, e)
                if self.on_unreachable is not None and not isinstance(e, PeerError):
                    self.on_unreachable(rank, e)
                break
            got.extend((rank, b) for b in reply.blocks)
            with self.lock:
                s = self.instances.get(rank)
                if s is not None:
                    self.instances[rank] = self._newer_pool(reply, s)
                    self._relend(rank)
            if len(reply.blocks) < take:
                break  # the creditor's last word: fewer than the view promised
        if len(got) < msg.num_blocks:
            self._give_back(msg.debtor, msg.request_id, got)
            return M.Borrowed([])
        return M.Borrowed(got)

    def _logged_gain(self, msg: M.Borrow, plan_: list[tuple[int, int]], new_calls: int) -> float:
        gain = self._loan_gain(msg.debtor, plan_, admits=not msg.running, new_calls=new_calls)
        log.info("loan for %s (rank %d, %s): %s, predicted gain %.1f tokens/s", msg.request_id, msg.debtor,
                 "running" if msg.running else "new", plan_, gain)
        return gain

    def _give_back(self, debtor: int, request_id: str, refs: list[tuple[int, int]]) -> None:
        by: dict[int, list[int]] = {}
        for r, b in refs:
            by.setdefault(r, []).append(b)
        ranks = list(by)
        futs = [self.transport.release(r, M.Release(debtor, request_id, by[r]), timeout=self.timeout_s) for r in ranks]
        wait_all(futs, on_error=lambda i, e: log.warning("giving back blocks on rank %d failed: %s", ranks[i], e))

    # ---- the ledger and the periodic placement --------------------------------------------------
    def debts(self) -> list[dict]:
        """Who owes whom: blocks of requests homed at debtor that sit on creditor (O(requests with
        remote blocks))."""
        ledger: dict[tuple[int, int], list[int]] = {}
        with self.lock:
            for home, rids in self._remote.items():
                for rid in rids:
                    for c, n in self.requests[rid].blocks.items():
                        if c != home and n > 0:
                            e = ledger.setdefault((home, c), [0, 0])
                            e[0] += n
                            e[1] += 1
        return [{"debtor": d, "creditor": c, "blocks": n, "requests": k} for (d, c), (n, k) in sorted(ledger.items())]

    def placement_map(self) -> dict[str, dict]:
        with self.lock:
            return {rid: {"home": p.home, "context": p.context_len, "blocks": dict(p.blocks)}
                    for rid, p in self.requests.items()}

    def plan_once(self) -> list[Move]:
        """One placement round: refit the cost model when due, run the greedy placement on the
        current view for at most ``plan_budget_s``, and send move_kvcache to the homes."""
        t0 = time.monotonic()
        if not self.policy.enabled or not self.serving <= set(self.instances):
            return []
        self._calibrate()
        with self.lock:
            busy = {rid for rid, t in self._moves_in_flight.items() if t0 - t < MOVE_WAIT_S}
        try:
            snap = self._snapshot(True, leave_out=busy)
        except ValueError:
            return []  # heartbeats disagree for a moment: plan on the next round
        left = max(0.0, self.plan_budget_s - (time.monotonic() - t0))
        planned, cut, stopped = self.planner.run(snap, self.cost, planning_config(self.pcfg, self.calibrated), left,
                                                 self._resume)
        moves = []
        for mv in planned:
            now = time.monotonic()
            with self.lock:
                placed = self.requests.get(mv.request_id)
                if placed is None or now - self._moves_in_flight.get(mv.request_id, -1e9) < MOVE_WAIT_S:
                    continue  # one move per request until a heartbeat shows it
                self._moves_in_flight[mv.request_id] = now
            self.transport.move(placed.home, M.MoveKV(mv.request_id, mv.num_blocks, mv.dst,
                                                      -1 if mv.src == placed.home else mv.src))
            log.info("move %s: %d blocks %d -> %d", mv.request_id, mv.num_blocks, mv.src, mv.dst)
            moves.append(mv)
        self._resume = cut  # a search cut midway goes on from there next round
        self.moves_issued += len(moves)
        self.recent_rounds.append(PlanRound(time.monotonic() - t0, len(moves), stopped))
        self.rounds += 1
        return moves

    async def run(self, stopping) -> None:
        """Every ``interval_s``, a placement round: driven from the gManager's own thread, planned
        in the planner's worker process once the view is large (infinite.cluster.planner), so
        that rank 0's event loop (HTTP, routing, heartbeats) and its own steps go on meanwhile."""
        loop = asyncio.get_running_loop()
        rounds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmanager-plan")
        try:
            while not stopping():
                await asyncio.sleep(self.interval_s)
                try:
                    await loop.run_in_executor(rounds, self.plan_once)
                except Exception:  # noqa: BLE001 - a bad plan must not take the coordinator down
                    log.exception("placement failed")
        finally:
            rounds.shutdown(wait=False)
            self.planner.close()
