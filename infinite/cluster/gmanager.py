"""gManager: the cluster's coordinator on rank 0.

It keeps what the heartbeats report (free memory, batch, step time, and the
placement map: how many blocks of each request sit on each instance), the
debt ledger derived from that map, routes new requests to a home instance,
hands out borrowed blocks on demand, and periodically reruns the greedy
debtor/creditor placement (infinite.cluster.placement.plan), issuing
move_kvcache to the debtors. Its view may be stale: creditors have the last
word (try_move_kvcache / reserve is first-come-first-served). Who may lend
how much is the LendingPolicy's; the gManager only applies it to its view.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

import msgspec

from infinite.cluster import messages as M
from infinite.cluster.cost_model import CostModel, StepSample, fit, remote_measured
from infinite.cluster.placement import (ClusterSnapshot, InstanceState, Move, PlacementConfig, RequestState, loan_gain,
                                        plan, route)
from infinite.cluster.policy import LendingPolicy, Peer
from infinite.cluster.prefix_routing import PrefixIndex, PrefixRouting, Routed, choose_home
from infinite.cluster.transport import PeerError, Transport, wait_all

log = logging.getLogger(__name__)

REFIT_S = 5.0  # how often the step-time model is refitted


@dataclass
class Placed:
    """One running request as the heartbeats of its home report it."""

    home: int
    context_len: int
    blocks: dict[int, int]  # instance -> blocks


class GManager:
    def __init__(self, transport: Transport, block_size: int, num_layers: int, policy: LendingPolicy,
                 interval_s: float = 0.5, timeout_s: float = 30.0, prior: CostModel | None = None) -> None:
        """``prior``: the cost model measured on this hardware (cost_probe); until the heartbeats'
        step times have been fitted the gManager makes no loan or move for throughput alone."""
        self.transport = transport
        self.world_size = transport.world_size
        self.block_size = block_size
        self.policy = policy
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.pcfg = PlacementConfig(policy=policy)
        self.cost = prior or CostModel(num_layers=num_layers)
        self.calibrated = False  # the step-time model has been fitted to this cluster's heartbeats
        self.probe_s: list[float] = []  # the data plane's measured round trips per layer, sorted
        self._loans_pay: dict[int, bool] = {}  # per rank, as of the last plan
        self.lock = threading.Lock()
        self.instances: dict[int, M.InstanceStats] = {}  # rank -> last heartbeat (adjusted by loans since)
        self.requests: dict[str, Placed] = {}
        self.pending: dict[int, int] = {}  # blocks routed to a rank since its last heartbeat
        self.pending_requests: dict[int, int] = {}  # requests routed to a rank since its last heartbeat
        self.prefixes = PrefixIndex()  # which instance caches which prefix (anchors from the heartbeats)
        self.prefix_routing = PrefixRouting()
        self.samples: deque[StepSample] = deque(maxlen=128)
        self._fitted_at = -1e9
        self._moves_in_flight: dict[str, float] = {}
        self.moves_issued = 0
        self.loans_refused = 0  # on-demand loans the cost model said would not pay
        self._rr = 0
        # Ranks that take requests and lend (the supervisor's membership decides; draining and
        # gone ranks are out of routing, borrowing and placement).
        self.serving: frozenset[int] = frozenset(range(self.world_size))
        self.on_unreachable = None  # callable(rank, error): a call to a rank failed (the supervisor checks it)

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
        """Refit the step-time model to the heartbeats' samples (every REFIT_S: a fit costs tens of
        ms of rank 0's CPU, which also serves its own batch). The samples carry their remote calls
        per layer, so the remote latency is what remote calls actually added to measured steps —
        waits and the contention they cause alike — with the probe as the prior."""
        now = time.monotonic()
        with self.lock:
            samples = list(self.samples)
        if len(samples) >= 8 and now - self._fitted_at >= REFIT_S:
            self._fitted_at = now
            self.cost = fit(samples, prior=self.cost)
            # trusted for throughput loans and moves only once remote steps were measured
            self.calibrated = remote_measured(samples) or self.policy.eager
        self._loans_pay = {r: self._would_pay(r) for r in list(self.instances)}

    def _would_pay(self, rank: int) -> bool:
        """Whether a loan admitting one more request of the sender's mean size would pay: the
        heartbeat tells debtors, so that they do not ask (a blocking round trip) when not."""
        if not self.calibrated or not self.policy.enabled:
            return False
        with self.lock:
            me = self.instances.get(rank)
            peers = [self._peer(s) for s in self.instances.values()]
        if me is None:
            return False
        size = max(1, (me.total_blocks - me.free_blocks) // max(1, me.num_running))
        plan_ = self.policy.borrow_plan(self._peer(me), size, peers)
        return bool(plan_) and loan_gain(self.snapshot(), self.cost, rank, plan_, admits=True,
                                         new_calls=len(plan_)) > self.pcfg.min_gain

    # ---- heartbeats --------------------------------------------------------------------------
    def on_heartbeat(self, beat: M.Heartbeat) -> M.HeartbeatReply:
        s = beat.stats
        with self.lock:
            self.instances[s.rank] = s
            self.pending[s.rank] = 0
            self.pending_requests[s.rank] = 0
            self.prefixes.apply(s.rank, beat.prefix_added, beat.prefix_removed, beat.prefix_everything)
            for e in beat.placement_changed:
                self.requests[e.request_id] = Placed(s.rank, e.context_len, dict(e.blocks))
                self._moves_in_flight.pop(e.request_id, None)
            for rid in beat.placement_removed:
                self.requests.pop(rid, None)
                self._moves_in_flight.pop(rid, None)
            if s.num_running and s.step_time_ms > 0:  # context as the planner counts it: blocks in use
                used = (s.total_blocks - s.free_blocks) * self.block_size
                self.samples.append(StepSample(s.num_running, used, s.step_time_ms / 1e3, s.remote_calls_per_step))
            return M.HeartbeatReply(self._borrowable(s.rank), self._loans_pay.get(s.rank, False),
                                    lends_for_throughput=self.calibrated and self.policy.enabled)

    def _peer(self, s: M.InstanceStats) -> Peer:
        return Peer(s.rank, s.total_blocks, s.free_blocks, s.lent_blocks, s.borrowed_blocks,
                    reserved=s.demand_blocks + self.pending.get(s.rank, 0))

    def _borrowable(self, rank: int) -> int:
        me = self.instances.get(rank)
        if me is None or not self.policy.may_borrow(me.lent_blocks):
            return 0
        return sum(self.policy.lendable(self._peer(s)) for r, s in self.instances.items()
                   if r != rank and r in self.serving)

    # ---- membership ------------------------------------------------------------------------
    def set_serving(self, ranks: frozenset[int]) -> None:
        with self.lock:
            self.serving = frozenset(ranks)

    def drop(self, rank: int) -> None:
        """``rank`` is gone: forget its heartbeat, its requests, and every block it held for
        others, so the ledger holds no debt to or from it (its requests are recomputed)."""
        with self.lock:
            self.instances.pop(rank, None)
            self.pending.pop(rank, None)
            self.pending_requests.pop(rank, None)
            self.prefixes.drop(rank)
            self.serving = self.serving - {rank}
            for rid in [rid for rid, p in self.requests.items() if p.home == rank]:
                del self.requests[rid]
                self._moves_in_flight.pop(rid, None)
            for p in self.requests.values():
                p.blocks.pop(rank, None)

    # ---- routing and on-demand borrowing ------------------------------------------------------
    def snapshot(self, with_requests: bool = True) -> ClusterSnapshot:
        """The gManager's view as placement input. Heartbeats of different ranks are taken at
        different moments; when they disagree (a request's blocks counted on a creditor before
        its own beat shows the loan), the view drops the requests rather than fail."""
        try:
            return self._snapshot(with_requests)
        except ValueError:
            return self._snapshot(False)

    def _snapshot(self, with_requests: bool) -> ClusterSnapshot:
        with self.lock:
            insts = tuple(
                InstanceState(
                    rank=r,
                    total_blocks=s.total_blocks,
                    free_blocks=max(0, s.free_blocks - self.pending.get(r, 0)),
                    lent_blocks=s.lent_blocks,
                    batch_size=s.num_running,
                    waiting_blocks=s.waiting_blocks,
                    waiting_requests=s.num_waiting,
                    borrowed_blocks=s.borrowed_blocks,
                    alive=r in self.serving,
                )
                for r, s in sorted(self.instances.items())
            )
            reqs = tuple(
                RequestState(rid, p.home, p.context_len, dict(p.blocks))
                for rid, p in self.requests.items()
                if with_requests and p.blocks and p.home in self.instances
            )
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
        a deeper holder."""
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
            snap = self.snapshot()
            home = route(snap, self.pcfg, prompt_blocks)
            if home is None or home not in self.serving:  # the front door checked the capacity; take the most free
                home = max((i for i in snap.instances if i.rank in self.serving), key=lambda i: i.free_blocks).rank
            routed = Routed(home)
            if chain:
                with self.lock:
                    loads = {r: s.num_running + s.num_waiting + self.pending_requests.get(r, 0)
                             for r, s in self.instances.items() if r in self.serving}
                    depths = self.prefixes.depths(chain, loads)
                routed = choose_home(home, loads, depths, self.prefix_routing)
        with self.lock:
            self.pending[routed.home] = self.pending.get(routed.home, 0) + prompt_blocks
            self.pending_requests[routed.home] = self.pending_requests.get(routed.home, 0) + 1
        return routed

    def borrow(self, msg: M.Borrow) -> M.Borrowed:
        """Reserve blocks on creditors for a debtor's request, in the policy's order; all or nothing.
        No regret: unless the request can never fit its home's pool, the loan is made only when
        the calibrated cost model predicts that the cluster gains."""
        with self.lock:
            me = self.instances.get(msg.debtor)
            if me is None:
                return M.Borrowed([])
            placed = self.requests.get(msg.request_id)
            held = placed.blocks if placed is not None else {}
            plan_ = self.policy.borrow_plan(self._peer(me), msg.num_blocks,
                                            [self._peer(s) for r, s in self.instances.items() if r in self.serving], held)
        if not plan_:
            return M.Borrowed([])
        if msg.request_blocks <= me.total_blocks and not (self.calibrated and self._loan_pays(msg, plan_, held)):
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
                    self.instances[rank] = msgspec.structs.replace(
                        s, free_blocks=s.free_blocks - len(reply.blocks), lent_blocks=s.lent_blocks + len(reply.blocks))
            if len(reply.blocks) < take:
                break  # the creditor's last word: fewer than the view promised
        if len(got) < msg.num_blocks:
            self._give_back(msg.debtor, msg.request_id, got)
            return M.Borrowed([])
        return M.Borrowed(got)

    def _loan_pays(self, msg: M.Borrow, plan_: list[tuple[int, int]], held: dict[int, int]) -> bool:
        new_calls = sum(1 for c, _ in plan_ if held.get(c, 0) == 0)
        gain = loan_gain(self.snapshot(), self.cost, msg.debtor, plan_, admits=not msg.running, new_calls=new_calls)
        log.info("loan for %s (rank %d, %s): %s, predicted gain %.1f tokens/s", msg.request_id, msg.debtor,
                 "running" if msg.running else "new", plan_, gain)
        return gain > self.pcfg.min_gain

    def _give_back(self, debtor: int, request_id: str, refs: list[tuple[int, int]]) -> None:
        by: dict[int, list[int]] = {}
        for r, b in refs:
            by.setdefault(r, []).append(b)
        ranks = list(by)
        futs = [self.transport.release(r, M.Release(debtor, request_id, by[r]), timeout=self.timeout_s) for r in ranks]
        wait_all(futs, on_error=lambda i, e: log.warning("giving back blocks on rank %d failed: %s", ranks[i], e))

    # ---- the ledger and the periodic placement --------------------------------------------------
    def debts(self) -> list[dict]:
        """Who owes whom: blocks of requests homed at debtor that sit on creditor."""
        ledger: dict[tuple[int, int], list[int]] = {}
        with self.lock:
            for p in self.requests.values():
                for c, n in p.blocks.items():
                    if c != p.home and n > 0:
                        e = ledger.setdefault((p.home, c), [0, 0])
                        e[0] += n
                        e[1] += 1
        return [{"debtor": d, "creditor": c, "blocks": n, "requests": k} for (d, c), (n, k) in sorted(ledger.items())]

    def placement_map(self) -> dict[str, dict]:
        with self.lock:
            return {rid: {"home": p.home, "context": p.context_len, "blocks": dict(p.blocks)}
                    for rid, p in self.requests.items()}

    def plan_once(self) -> list[Move]:
        """Run the greedy placement on the current view and send move_kvcache to the homes."""
        if not self.policy.enabled or not self.serving <= set(self.instances):
            return []
        self._calibrate()
        try:
            snap = self._snapshot(True)
        except ValueError:
            return []  # heartbeats disagree for a moment: plan on the next round
        now = time.monotonic()
        moves = []
        # Uncalibrated, only the moves that do not hang on the cost model (evacuating a leaver).
        pcfg = self.pcfg if self.calibrated else replace(self.pcfg, min_gain=float("inf"))
        for mv in plan(snap, self.cost, pcfg):
            placed = self.requests.get(mv.request_id)
            if placed is None or now - self._moves_in_flight.get(mv.request_id, -1e9) < 5.0:
                continue  # one move per request until a heartbeat shows it
            self._moves_in_flight[mv.request_id] = now
            self.transport.move(placed.home, M.MoveKV(mv.request_id, mv.num_blocks, mv.dst,
                                                      -1 if mv.src == placed.home else mv.src))
            log.info("move %s: %d blocks %d -> %d", mv.request_id, mv.num_blocks, mv.src, mv.dst)
            moves.append(mv)
        self.moves_issued += len(moves)
        return moves

    async def run(self, stopping) -> None:
        while not stopping():
            await asyncio.sleep(self.interval_s)
            try:
                self.plan_once()
            except Exception:  # noqa: BLE001 - a bad plan must not take the coordinator down
                log.exception("placement failed")
