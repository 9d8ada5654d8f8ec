"""Supervisor: rank 0's keeper of the membership — joins, departures and deaths.

It decides (infinite.cluster.membership holds the rules) and acts:

* a rank that joins (at start-up or into a running cluster) becomes a member
  and starts taking requests and lending;
* a rank that falls silent for DEAD_AFTER_S, or that a failed call points at
  and that then fails a ping, is declared dead: it leaves routing, borrowing
  and placement, the gManager's ledger drops its debts and credits, the front
  door moves the requests it was home to, every member recomputes requests
  that had blocks there, and it is evicted from the RPC group so that a new
  rank can join;
* a rank that leaves gracefully (SIGTERM, or the admin endpoint) first drains:
  no new work, its requests move, blocks it lent come back; then it is removed.

Every change bumps the view's epoch and is pushed to every member (and rides
on every heartbeat reply, so a lost push costs at most one beat).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from infinite.cluster import messages as M
from infinite.cluster.gmanager import GManager
from infinite.cluster.membership import MONITOR_S, PING_S, HeartbeatWatch, Membership, short_error
from infinite.cluster.transport import PeerError, Transport, to_asyncio

log = logging.getLogger(__name__)

# (rank, lost): called on the event loop when a rank leaves the cluster or starts draining
GoneHook = Callable[[int, bool], None]


class Supervisor:
    def __init__(self, transport: Transport, gmanager: GManager, initial: range | list[int],
                 apply_view: Callable[[M.ClusterView], None], on_gone: GoneHook) -> None:
        self.transport = transport
        self.gmanager = gmanager
        self.membership = Membership.of(initial)
        self.watch = HeartbeatWatch()
        self.lock = threading.RLock()
        self.apply_view = apply_view  # rank 0's own instance takes the view directly
        self.on_gone = on_gone
        self._loop: asyncio.AbstractEventLoop | None = None
        self._joined = asyncio.Event()
        gmanager.on_unreachable = lambda rank, err: self.suspect_async(rank, err)
        self.on_members: Callable[[list[int]], None] | None = None  # publishes the members (joiners read it)
        self.joins = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # ---- the view -----------------------------------------------------------------------------
    def view(self) -> M.ClusterView:
        with self.lock:
            m = self.membership
            return M.ClusterView(m.epoch, sorted(m.serving), sorted(m.draining),
                                 sorted(r for r, d in m.gone.items() if d.lost),
                                 sorted(r for r, d in m.gone.items() if not d.lost))

    def members(self) -> list[int]:
        with self.lock:
            return sorted(self.membership.alive)

    def health(self) -> dict:
        with self.lock:
            return self.membership.health(time.time())

    def _changed(self) -> None:
        """Push the new view everywhere (rank 0's instance at once, the others by message)."""
        view = self.view()
        self.gmanager.set_serving(frozenset(view.serving))
        self.apply_view(view)
        if self.on_members is not None:
            try:
                self.on_members(self.members())
            except Exception:  # noqa: BLE001 - joiners would wait for it; say why
                log.warning("publishing the members failed", exc_info=True)
        me = self.transport.rank
        for r in self.members():
            if r != me:
                fut = self.transport.cluster_view(r, view)
                fut.add_done_callback(_quiet)

    # ---- joining --------------------------------------------------------------------------------
    def on_join(self, msg: M.Join) -> M.ClusterView:
        """Transport thread: a rank announces itself. A rank id that was declared gone is refused."""
        with self.lock:
            if msg.rank in self.membership.gone:
                raise RuntimeError(f"rank {msg.rank} was removed from the cluster; it cannot rejoin under that id")
            new = self.membership.join(msg.rank)
            self.watch.beat(msg.rank, time.monotonic())
            self.gmanager.on_join(msg.rank, msg.stats)
            all_joined = self.membership.all_joined()
        if new:
            self.joins += 1
            log.info("rank %d joined the cluster (%d instances)", msg.rank, len(self.members()))
            self._changed()
        if all_joined and self._loop is not None:
            self._loop.call_soon_threadsafe(self._joined.set)
        return self.view()

    async def wait_for_initial(self, timeout_s: float) -> None:
        """Rank 0 serves once every initial rank has joined (dynamic RPC has no start barrier)."""
        with self.lock:
            if self.membership.all_joined():
                return
        try:
            await asyncio.wait_for(self._joined.wait(), timeout_s)
        except asyncio.TimeoutError:
            missing = sorted(self.membership.initial - self.membership.alive)
            raise RuntimeError(f"ranks {missing} did not join within {timeout_s:.0f} s") from None

    # ---- heartbeats and detection ------------------------------------------------------------------
    def on_heartbeat(self, beat: M.Heartbeat) -> M.HeartbeatReply:
        rank = beat.stats.rank
        with self.lock:
            if not self.membership.is_member(rank):
                evicted = rank in self.membership.gone
                if evicted:
                    return M.HeartbeatReply(0, view=self.view(), evicted=True)
                return M.HeartbeatReply(0, view=self.view())  # not joined yet: its Join is on the way
            self.watch.beat(rank, time.monotonic())
        reply = self.gmanager.on_heartbeat(beat)
        return M.HeartbeatReply(reply.borrowable, reply.loans_pay, reply.lends_for_throughput, view=self.view())

    async def monitor(self, stopping: Callable[[], bool]) -> None:
        """Declare dead every rank silent for DEAD_AFTER_S (checked every MONITOR_S)."""
        me = self.transport.rank
        while not stopping():
            await asyncio.sleep(MONITOR_S)
            with self.lock:
                silent = [r for r in self.watch.silent(time.monotonic()) if r != me and self.membership.is_member(r)]
            for r in silent:
                self.lose(r, f"no heartbeat for {self.watch.dead_after_s:.1f} s")

    def on_suspect(self, msg: M.Suspect) -> M.ClusterView:
        """Transport thread: a rank's call failed; ping the ranks it names, declare the silent ones dead."""
        for r in msg.ranks:
            self.check(r, f"rank {msg.reporter}'s call failed ({msg.error})")
        return self.view()

    def check(self, rank: int, why: str) -> bool:
        """Ping ``rank`` (PING_S); declare it dead if it does not answer. True if it is alive."""
        if rank == self.transport.rank or not self.membership.is_member(rank):
            return self.membership.is_member(rank)
        try:
            self.transport.ping(rank, timeout=PING_S).wait()
            return True
        except Exception as e:  # noqa: BLE001
            if isinstance(e, PeerError):
                return True  # it answered, with an error: alive
            self.lose(rank, f"{why}; ping failed: {short_error(e)}")
            return False

    def suspect_async(self, rank: int, err: BaseException) -> None:
        """A call of rank 0's own failed: check that rank off the caller's thread."""
        threading.Thread(target=self.check, args=(rank, f"a call failed ({short_error(err)})"),
                         name=f"check-rank{rank}", daemon=True).start()

    def lose(self, rank: int, reason: str) -> bool:
        """``rank`` is dead: out of the cluster, its work recomputed, evicted from the RPC group."""
        with self.lock:
            if not self.membership.lose(rank, reason, time.time()):
                return False
            self.watch.forget(rank)
        log.error("rank %d is lost (%s): recomputing its requests on the %d survivors", rank, reason,
                  len(self.members()))
        self.gmanager.drop(rank)
        self._changed()
        self._after_departure(rank, lost=True)
        return True

    # ---- leaving --------------------------------------------------------------------------------
    def on_leaving(self, msg: M.Leaving) -> M.ClusterView:
        with self.lock:
            changed = self.membership.start_leaving(msg.rank)
        if changed:
            log.warning("rank %d is leaving the cluster (%s): moving its requests", msg.rank, msg.reason)
            self._changed()
            self._notify(msg.rank, lost=False)
        return self.view()

    def on_left(self, msg: M.Left) -> M.ClusterView:
        with self.lock:
            changed = self.membership.leave(msg.rank, "left the cluster", time.time())
            self.watch.forget(msg.rank)
        if changed:
            log.warning("rank %d left the cluster (%d instances)", msg.rank, len(self.members()))
            self.gmanager.drop(msg.rank)
            self._changed()
            self._after_departure(msg.rank, lost=False)
        return self.view()

    async def drain(self, rank: int) -> dict:
        """The admin endpoint: ask ``rank`` to leave; returns once it is draining."""
        from infinite.errors import RequestError

        if rank == self.transport.rank:
            raise RequestError(f"rank {rank} runs the front end and the gManager; stop the server instead", "invalid")
        if not self.membership.is_member(rank):
            raise RequestError(f"rank {rank} is not a member of the cluster (members: {self.members()})", "invalid")
        loop = asyncio.get_running_loop()
        await to_asyncio(self.transport.drain(rank, M.Drain("asked to leave by the admin endpoint")), loop)
        return {"rank": rank, "status": "draining", "members": self.members()}

    # ---- after a departure ---------------------------------------------------------------------
    def _after_departure(self, rank: int, lost: bool) -> None:
        self._notify(rank, lost)
        # Out of the RPC group (so a new rank can join): off the loop, it takes torch's group token.
        threading.Thread(target=self._evict, args=(rank,), name=f"evict-rank{rank}", daemon=True).start()

    def _evict(self, rank: int) -> None:
        try:
            self.transport.evict(rank)
        except Exception:  # noqa: BLE001 - a later join would fail and retry; say why
            log.warning("evicting rank %d from the RPC group failed", rank, exc_info=True)

    def _notify(self, rank: int, lost: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_gone, rank, lost)


def _quiet(fut) -> None:
    try:
        fut.value()
    except Exception:  # noqa: BLE001 - the next heartbeat reply carries the view anyway
        pass
