"""gManager: the cluster's coordinator on rank 0.

It keeps what the heartbeats report (free memory, batch, step time, and the
placement map: how many blocks of each request sit on each instance), the
debt ledger derived from that map, routes new requests to a home instance,
hands out borrowed blocks on demand, and periodically reruns the greedy
debtor/creditor placement (infinite.cluster.placement.plan), issuing
move_kvcache to the debtors. Its view may be stale: creditors have the last
word (try_move_kvcache / reserve is first-come-first-served).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import replace

from infinite.cluster import rpc
from infinite.cluster.cost_model import CostModel, StepSample, fit
from infinite.cluster.placement import ClusterSnapshot, InstanceState, PlacementConfig, RequestState, plan, route

log = logging.getLogger(__name__)


class GManager:
    def __init__(self, world_size: int, block_size: int, num_layers: int, max_lend_fraction: float,
                 lending: bool, interval_s: float = 0.5) -> None:
        self.world_size = world_size
        self.block_size = block_size
        self.lending = lending and world_size > 1
        self.interval_s = interval_s
        # At most half of a request's blocks remote: its remote MicroAttention then stays
        # about as long as the local one, which runs meanwhile.
        self.pcfg = PlacementConfig(max_lend_fraction=max_lend_fraction, max_remote_fraction=0.5)
        self.cost = CostModel(num_layers=num_layers)
        self.lock = threading.Lock()
        self.instances: dict[int, dict] = {}  # rank -> last heartbeat
        self.last_seen: dict[int, float] = {}
        self.requests: dict[str, tuple[int, int, dict[int, int]]] = {}  # rid -> (home, context, blocks per rank)
        self.pending: dict[int, int] = {}  # blocks routed to a rank since its last heartbeat
        self.samples: deque[StepSample] = deque(maxlen=512)
        self._moves_in_flight: dict[str, float] = {}
        self.moves_issued = 0
        self._rr = 0

    def calibrate_transport(self, rounds: int = 5) -> float:
        """Measure the RPC round trip to every other rank; it is the cost model's remote-MA latency
        (per call, per layer), which differs by orders of magnitude between NVLink and loopback TCP."""
        rtts = []
        for r in range(1, self.world_size):
            for _ in range(rounds):
                t0 = time.perf_counter()
                rpc.call_sync(r, rpc.h_ping)
                rtts.append(time.perf_counter() - t0)
        if rtts:
            rtts.sort()
            self.cost = replace(self.cost, remote_latency_s=rtts[len(rtts) // 2])
        return self.cost.remote_latency_s

    # ---- heartbeats ------------------------------------------------------------------
    def on_heartbeat(self, beat: dict) -> dict:
        rank = beat["rank"]
        with self.lock:
            self.instances[rank] = {k: v for k, v in beat.items() if not k.startswith("placement_")}
            self.last_seen[rank] = time.monotonic()
            self.pending[rank] = 0
            for rid, ctx, counts in beat.get("placement_changed", ()):
                self.requests[rid] = (rank, ctx, {int(k): int(v) for k, v in counts.items()})
                self._moves_in_flight.pop(rid, None)
            for rid in beat.get("placement_removed", ()):
                self.requests.pop(rid, None)
                self._moves_in_flight.pop(rid, None)
            if beat.get("num_running", 0) and beat.get("step_time_ms", 0) > 0:
                self.samples.append(StepSample(beat["num_running"], beat.get("tokens_held", 0),
                                               beat["step_time_ms"] / 1e3))
            return {"borrowable": self._borrowable(rank)}

    def _lendable(self, s: dict) -> int:
        cap = self.pcfg.lend_cap(s["total_blocks"])
        return max(0, min(s["free_blocks"] - self.pending.get(s["rank"], 0), cap - s["lent_blocks"]))

    def _borrowable(self, rank: int) -> int:
        if not self.lending:
            return 0
        return sum(self._lendable(s) for r, s in self.instances.items() if r != rank)

    # ---- routing and on-demand borrowing ---------------------------------------------------
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
                    total_blocks=s["total_blocks"],
                    free_blocks=max(0, s["free_blocks"] - self.pending.get(r, 0)),
                    lent_blocks=s["lent_blocks"],
                    batch_size=s["num_running"],
                    waiting_blocks=s.get("waiting_blocks", 0),
                    waiting_requests=s.get("num_waiting", 0),
                )
                for r, s in sorted(self.instances.items())
            )
            reqs = tuple(
                RequestState(rid, home, ctx, dict(counts))
                for rid, (home, ctx, counts) in self.requests.items()
                if with_requests and counts and home in self.instances
            )
        return ClusterSnapshot(insts, reqs, self.block_size)

    def route(self, prompt_blocks: int) -> int:
        """Home for a new request; round robin until every instance has reported."""
        if len(self.instances) < self.world_size:
            self._rr += 1
            return (self._rr - 1) % self.world_size
        snap = self.snapshot()
        cfg = self.pcfg if self.lending else PlacementConfig(max_lend_fraction=0.0)
        home = route(snap, cfg, prompt_blocks)
        if home is None:  # the front door checked the capacity; fall back to the most free
            home = max(snap.instances, key=lambda i: i.free_blocks).rank
        with self.lock:
            self.pending[home] = self.pending.get(home, 0) + prompt_blocks
        return home

    def borrow(self, debtor: int, request_id: str, n: int) -> list[tuple[int, int]]:
        """Reserve n blocks on creditors for a debtor's request; all or nothing.

        Creditors already holding the request come first (its remote blocks on as
        few instances as possible), then the most free.
        """
        if not self.lending:
            return []
        with self.lock:
            held = self.requests.get(request_id, (debtor, 0, {}))[2]
            cands = sorted(
                (s for r, s in self.instances.items() if r != debtor),
                key=lambda s: (-(held.get(s["rank"], 0) > 0), -self._lendable(s), s["rank"]),
            )
            plan_ = [(s["rank"], self._lendable(s)) for s in cands]
        got: list[tuple[int, int]] = []
        for rank, lendable in plan_:
            take = min(n - len(got), lendable)
            if take <= 0:
                continue
            try:
                blocks = rpc.call_sync(rank, rpc.h_reserve, debtor, request_id, take)
            except Exception:  # noqa: BLE001
                log.warning("reserve on rank %d failed", rank, exc_info=True)
                continue
            got.extend((rank, b) for b in blocks)
            with self.lock:
                s = self.instances.get(rank)
                if s is not None:
                    s["free_blocks"] -= len(blocks)
                    s["lent_blocks"] += len(blocks)
            if len(got) >= n:
                break
        if len(got) < n:
            self._give_back(debtor, request_id, got)
            return []
        return got

    def _give_back(self, debtor: int, request_id: str, refs: list[tuple[int, int]]) -> None:
        by: dict[int, list[int]] = {}
        for r, b in refs:
            by.setdefault(r, []).append(b)
        for r, blocks in by.items():
            rpc.call_async(r, rpc.h_release, debtor, request_id, blocks)

    # ---- the ledger and the periodic placement ------------------------------------------------
    def debts(self) -> list[dict]:
        """Who owes whom: blocks of requests homed at debtor that sit on creditor."""
        ledger: dict[tuple[int, int], list[int]] = {}
        with self.lock:
            for home, _, counts in self.requests.values():
                for c, n in counts.items():
                    if c != home and n > 0:
                        e = ledger.setdefault((home, c), [0, 0])
                        e[0] += n
                        e[1] += 1
        return [{"debtor": d, "creditor": c, "blocks": n, "requests": k} for (d, c), (n, k) in sorted(ledger.items())]

    def placement_map(self) -> dict[str, dict]:
        with self.lock:
            return {rid: {"home": h, "context": c, "blocks": dict(b)} for rid, (h, c, b) in self.requests.items()}

    def plan_once(self) -> list:
        """Run the greedy placement on the current view and send move_kvcache to the homes."""
        if not self.lending or len(self.instances) < self.world_size:
            return []
        with self.lock:
            samples = list(self.samples)
        if len(samples) >= 8:
            self.cost = fit(samples, prior=self.cost)
        try:
            snap = self._snapshot(True)
        except ValueError:
            return []  # heartbeats disagree for a moment: plan on the next round
        now = time.monotonic()
        moves = []
        for mv in plan(snap, self.cost, self.pcfg):
            home = self.requests.get(mv.request_id, (None,))[0]
            if mv.src != home or now - self._moves_in_flight.get(mv.request_id, -1e9) < 5.0:
                continue  # only homes migrate here, and one move per request until a heartbeat shows it
            self._moves_in_flight[mv.request_id] = now
            rpc.call_async(mv.src, rpc.h_move, mv.request_id, mv.num_blocks, mv.dst)
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
