"""Who is in the cluster, and when a silent rank counts as dead: pure bookkeeping, no I/O.

Rank 0 keeps one ``Membership`` (the supervisor drives it; infinite/cluster/supervisor.py)
and one ``HeartbeatWatch``. Keeping the rules here, away from the transport, lets
tests drive them with made-up clocks, and it states the detection bound in one
place:

* every instance beats every ``HEARTBEAT_S``;
* rank 0 checks every ``MONITOR_S`` and declares a rank dead once it has been
  silent for ``DEAD_AFTER_S``, so a rank that stops (killed, hung, cut off) is
  marked dead at most ``DETECTION_BOUND_S`` after its last beat — sooner when a
  call to it fails first (a failed call is confirmed by a ping, ``PING_S``);
* a worker that hears nothing from rank 0 for ``RANK0_LOST_S`` exits non-zero.

A rank id, once gone (dead or left), never comes back: a rank that was declared
dead and later speaks up is told it was evicted and exits (fencing), since the
cluster already recomputed its work and dropped its debts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

HEARTBEAT_S = 0.1  # an instance's beat period
MONITOR_S = 0.1  # how often rank 0 looks for silent ranks
DEAD_AFTER_S = 2.0  # silent this long: dead (20 missed beats; a loaded 2-core host stays well under)
DETECTION_BOUND_S = DEAD_AFTER_S + MONITOR_S  # from a rank's last beat to its death being declared
PING_S = 2.0  # a suspected rank must answer a ping within this
RANK0_LOST_S = 3.0  # a worker whose beats fail this long stops (rank 0 is gone)
STALL_S = 0.5  # a monitor tick this late means rank 0 itself stalled: that time counts against no one


class HeartbeatWatch:
    """When each rank last spoke, and which have been silent too long.

    If rank 0's own monitor stalls (its loop blocked, the host starved), the time it
    did not watch is not held against the ranks: their silence clocks shift by the stall.
    """

    def __init__(self, dead_after_s: float = DEAD_AFTER_S, stall_s: float = STALL_S) -> None:
        self.dead_after_s = dead_after_s
        self.stall_s = stall_s
        self.last_seen: dict[int, float] = {}
        self._last_check: float | None = None

    def beat(self, rank: int, now: float) -> None:
        self.last_seen[rank] = max(now, self.last_seen.get(rank, now))

    def forget(self, rank: int) -> None:
        self.last_seen.pop(rank, None)

    def silent(self, now: float) -> list[int]:
        """Ranks silent for longer than ``dead_after_s`` (call every MONITOR_S)."""
        if self._last_check is not None and now - self._last_check > self.stall_s:
            gap = now - self._last_check
            for r in self.last_seen:
                self.last_seen[r] += gap
        self._last_check = now
        return sorted(r for r, t in self.last_seen.items() if now - t > self.dead_after_s)


@dataclass(frozen=True)
class Departure:
    rank: int
    reason: str
    at: float  # time.time() of the decision
    lost: bool  # True: died (its work was recomputed); False: left gracefully


@dataclass
class Membership:
    """The members of a running cluster as rank 0 decides them.

    ``target`` is how many instances the deployment should have: the initial
    ranks plus joins, minus graceful leaves. A death does not lower it, so the
    cluster reports itself degraded until a new instance joins in its place.
    """

    initial: frozenset[int]
    alive: set[int] = field(default_factory=set)  # joined and not gone
    draining: set[int] = field(default_factory=set)  # alive but leaving: no new work, no lending
    gone: dict[int, Departure] = field(default_factory=dict)
    target: int = 0
    epoch: int = 0  # bumped on every change, so instances can ignore stale views

    @classmethod
    def of(cls, initial: Iterable[int]) -> Membership:
        ranks = frozenset(initial)
        return cls(initial=ranks, target=len(ranks))

    # ---- transitions (each returns whether anything changed) --------------------------------
    def join(self, rank: int) -> bool:
        if rank in self.gone:
            raise ValueError(f"rank {rank} was {'lost' if self.gone[rank].lost else 'removed'}; "
                             "a rank id never rejoins (start a new instance)")
        if rank in self.alive:
            return False
        self.alive.add(rank)
        self.target = max(self.target, len(self.alive))
        self.epoch += 1
        return True

    def lose(self, rank: int, reason: str, now: float) -> bool:
        """``rank`` died: recompute its work elsewhere; the target stays (degraded)."""
        if rank in self.gone:
            return False
        self.alive.discard(rank)
        self.draining.discard(rank)
        self.gone[rank] = Departure(rank, reason, now, lost=True)
        self.epoch += 1
        return True

    def start_leaving(self, rank: int) -> bool:
        if rank not in self.alive or rank in self.draining:
            return False
        self.draining.add(rank)
        self.epoch += 1
        return True

    def leave(self, rank: int, reason: str, now: float) -> bool:
        """``rank`` left gracefully: the deployment is one instance smaller."""
        if rank in self.gone or rank not in self.alive:
            return False
        self.alive.discard(rank)
        self.draining.discard(rank)
        self.gone[rank] = Departure(rank, reason, now, lost=False)
        self.target = max(0, self.target - 1)
        self.epoch += 1
        return True

    # ---- views ---------------------------------------------------------------------------
    @property
    def serving(self) -> set[int]:
        """Ranks that take new requests and may lend blocks."""
        return self.alive - self.draining

    @property
    def lost(self) -> list[Departure]:
        return sorted((d for d in self.gone.values() if d.lost), key=lambda d: d.at)

    @property
    def degraded(self) -> bool:
        return len(self.alive) < self.target

    def all_joined(self) -> bool:
        """Every initial rank has joined (or is already gone): the cluster may start serving."""
        return all(r in self.alive or r in self.gone for r in self.initial)

    def is_member(self, rank: int) -> bool:
        return rank in self.alive

    def health(self, now: float) -> dict:
        """What /health says: "ok", or "degraded" with the lost ranks and why."""
        out: dict = {"status": "degraded" if self.degraded else "ok", "instances": len(self.alive),
                     "target": self.target, "serving": sorted(self.serving)}
        if self.draining:
            out["draining"] = sorted(self.draining)
        lost = self.lost
        if lost:
            out["lost"] = [{"rank": d.rank, "reason": d.reason, "seconds_ago": round(now - d.at, 1)} for d in lost]
        return out


def view_actions(before: Mapping[int, str], after: Mapping[int, str]) -> tuple[list[int], list[int]]:
    """What an instance must do when a new cluster view replaces ``before`` (rank -> "serving" |
    "draining" | "left" | "lost"; an unknown rank counts as serving): (ranks newly gone, whose
    blocks are gone with them — lost, or left, which a drained rank does holding nothing;
    ranks newly draining, whose blocks must come back while they still answer)."""
    gone, draining = [], []
    for r, s in sorted(after.items()):
        old = before.get(r, "serving")
        if s in ("lost", "left") and old not in ("lost", "left"):
            gone.append(r)
        elif s == "draining" and old == "serving":
            draining.append(r)
    return gone, draining


def view_states(serving: Iterable[int], draining: Iterable[int], lost: Iterable[int], left: Iterable[int]) -> dict[int, str]:
    states = {r: "serving" for r in serving}
    states.update({r: "draining" for r in draining})
    states.update({r: "left" for r in left})
    states.update({r: "lost" for r in lost})
    return states


def short_error(e: BaseException) -> str:
    """torch wraps a transport error in layers of "Got the following error when running the
    callback: ..."; the innermost layer says what happened."""
    text = str(e).split("Got the following error when running the callback: ")[-1]
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
