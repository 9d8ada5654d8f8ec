"""A request's prefill by a group, seen from its home: the blocks, the start, the hand-over.

The home reserves each member's segment on it (``Reserve``: the member lends the blocks to the
request, as a creditor does), builds the request's block table in the layout's order (its own
blocks local, the members' as remote entries), tells every member its part (``GroupStart``;
an instance is in one group at a time, so a member may refuse) and, once all took it, to run
(``GroupRun``). The home is a member too: its own rounds run in its ``GroupGuests``. When every
member is done, the request enters the home's scheduler with all of its prompt but the last token
computed; the next step computes that token (its block is the home's) and samples, with the
remote blocks served by the members as by any creditor: decode needs no migration.

A member that fails or is lost mid-prefill costs a recompute: the group is closed, the blocks go
back, and the request is prefilled by its home alone (docs/reliability.md). Nothing waits
forever: every call has a timeout, and a lost member ends its groups at the next view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from infinite.cluster import messages as M
from infinite.cluster.sp_chunk import layout_from_message
from infinite.cluster.sp_member import GroupGuests
from infinite.cluster.transport import Future, Transport
from infinite.kv.rmanager import RBlock
from infinite.runtime.request import Request, Status

log = logging.getLogger(__name__)


@dataclass
class GroupRecord:
    """A request's prefill group as ``stats()`` reports it: members and its TTFT split."""

    request_id: str
    members: list[int]
    prompt_tokens: int
    started: float  # time.time()
    prefill_s: float = 0.0  # from the start to every member done
    compute_s: dict[int, float] = field(default_factory=dict)  # per member: its rounds' compute
    wait_s: dict[int, float] = field(default_factory=dict)  # per member: waiting for other members' parts
    outcome: str = "running"  # running | done | recomputed | aborted

    def stat(self) -> M.GroupStat:
        return M.GroupStat(self.request_id, self.members, self.prompt_tokens, 1e3 * self.prefill_s, self.outcome,
                           {r: 1e3 * s for r, s in self.compute_s.items()}, {r: 1e3 * s for r, s in self.wait_s.items()})


@dataclass
class _Group:
    req: Request
    members: list[int]
    runs: dict[int, Future]  # member rank -> its GroupDone
    record: GroupRecord
    deadline: float


class GroupPrefills:
    """The home's groups (at most one: the home is a member of its own group)."""

    KEEP = 32  # finished groups kept for stats()

    def __init__(self, rank: int, engine, allocator, transport: Transport, guests: GroupGuests, timeout_s: float,
                 lost: Callable[[], set[int]]) -> None:
        self.rank = rank
        self.engine = engine
        self.allocator = allocator
        self.rm = engine.rm
        self.transport = transport
        self.guests = guests
        self.timeout_s = timeout_s
        self.lost = lost
        self.active: dict[str, _Group] = {}
        self.records: list[GroupRecord] = []
        self.fallbacks = 0  # groups that could not start or failed: prefilled (again) at home alone
        self.done = 0  # groups whose request went to the scheduler with its prompt computed

    @property
    def busy(self) -> bool:
        return bool(self.active)

    # ---- start (compute thread) -----------------------------------------------------------
    def begin(self, req: Request, group: M.GroupLayout) -> bool:
        """Start ``req``'s prefill on ``group``; False (nothing held) when it cannot start now."""
        rid = req.request_id
        layout = layout_from_message(group)
        if layout.members[0] != self.rank or layout.prompt_len != req.num_prompt_tokens or req.output_token_ids \
                or layout.block_size != self.engine.block_size:
            log.warning("rank %d: group layout of %s does not fit the request: prefilled alone", self.rank, rid)
            return False
        lost = self.lost()
        if any(r in lost for r in layout.members) or self.guests.members or self.engine.tp is not None:
            return False  # (a tensor-parallel instance's rounds would need its group's collectives)
        reserved: dict[int, list[int]] = {}
        asked: list[int] = []
        try:
            for j, r in enumerate(layout.members[1:], start=1):
                need = layout.segment_blocks(j)
                asked.append(r)
                got = self.transport.reserve(r, M.Reserve(self.rank, rid, need), timeout=self.timeout_s).wait().blocks
                reserved[r] = got
                if len(got) < need:
                    raise RuntimeError(f"rank {r} lends {len(got)} of the {need} blocks of its segment")
            cursor = {r: 0 for r in reserved}
            for r, n in layout.runs():
                if r == self.rank:
                    self.rm.allocate(rid, n)  # MemoryError when the pool lacks them
                else:
                    self.rm.append_remote(rid, [RBlock(r, b) for b in reserved[r][cursor[r]:cursor[r] + n]])
                    cursor[r] += n
        except Exception as e:  # noqa: BLE001 - a member refused or is gone: the home prefills alone
            log.info("rank %d: no prefill group for %s: %s", self.rank, rid, e)
            self._give_back(rid, reserved)
            for r in set(asked) - set(reserved) - self.lost():  # its answer was lost: whatever it lent goes back
                self.transport.release(r, M.Release(self.rank, rid, None), timeout=self.timeout_s) \
                    .add_done_callback(_quiet)
            self.fallbacks += 1
            return False
        own = [ref.block for ref in self.rm.table(rid) if ref.instance == self.rank]
        blocks = {r: b for r, b in reserved.items()} | {self.rank: own}
        top_k = req.params.prompt_logprobs
        started: list[int] = []
        try:
            for r in layout.members:
                msg = M.GroupStart(self.rank, rid, group, blocks[r], req.prompt_token_ids, top_k)
                if r == self.rank:
                    self.guests.start(msg)
                else:
                    self.transport.group_start(r, msg, timeout=self.timeout_s).wait()
                started.append(r)
        except Exception as e:  # noqa: BLE001 - a member is in another group (or gone)
            log.info("rank %d: prefill group for %s refused: %s", self.rank, rid, e)
            self._close(rid, started)
            self._give_back(rid, None)
            self.fallbacks += 1
            return False
        now = time.time()
        record = GroupRecord(rid, list(layout.members), layout.prompt_len, now)
        req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or now
        run = M.GroupRun(self.rank, rid)
        runs = {r: (self.guests.run(run) if r == self.rank else
                    self.transport.group_run(r, run, timeout=self.timeout_s * max(2, layout.rounds)))
                for r in layout.members}
        for f in runs.values():
            f.add_done_callback(lambda _: self.guests.wake())
        self.active[rid] = _Group(req, list(layout.members), runs, record,
                                  time.monotonic() + self.timeout_s * max(2, layout.rounds))
        self._keep(record)
        return True

    # ---- progress (compute thread, between steps) ------------------------------------------------
    def poll(self) -> None:
        """Hand finished groups' requests to the scheduler; recompute failed ones alone."""
        lost = self.lost()
        for home in lost:
            self.guests.forget_home(home)  # a member's part of a group whose home is gone
        for rid, g in list(self.active.items()):
            gone = [r for r in g.members if r in lost]
            error = f"member(s) {gone} lost" if gone else None
            if error is None and time.monotonic() > g.deadline:
                error = "timed out"
            done: dict[int, M.GroupDone] = {}
            for r, f in g.runs.items():
                if error is not None or not f.done():
                    continue
                try:
                    msg = f.value()
                    msg = msg[0] if isinstance(msg, tuple) else msg
                    if isinstance(msg, M.Failed):
                        raise RuntimeError(msg.message)
                    done[r] = msg
                except Exception as e:  # noqa: BLE001
                    error = f"member {r} failed: {e}"
            if error is not None:
                self._fail(g, error)
            elif len(done) == len(g.runs):
                sched = self.engine.scheduler
                if len(sched.running) >= sched.max_num_seqs:  # its batch is full: at a later step
                    g.deadline = float("inf")
                    continue
                self._install(g, done)

    def _install(self, g: _Group, done: dict[int, M.GroupDone]) -> None:
        req, rid = g.req, g.req.request_id
        del self.active[rid]
        self._close(rid, g.members)
        if req.prompt_logprobs is not None:
            lps: list[dict[int, float] | None] = [None] * (req.num_prompt_tokens - 1)
            for d in done.values():
                for p, lp in zip(d.positions, d.logprobs):
                    lps[p] = lp
            if any(x is None for x in lps):
                self._fail(g, "a member sent no prompt logprobs for some positions", closed=True)
                return
            req.prompt_logprobs = lps
        rec = g.record
        rec.prefill_s = time.time() - rec.started
        rec.compute_s = {r: d.compute_s for r, d in done.items()}
        rec.wait_s = {r: d.wait_s for r, d in done.items()}
        rec.outcome = "done"
        self.done += 1
        req.num_computed_tokens = req.num_prompt_tokens - 1
        req.status = Status.RUNNING
        e = self.engine
        e.requests[rid] = req
        e.scheduler.running.append(req)

    def _fail(self, g: _Group, why: str, closed: bool = False) -> None:
        req, rid = g.req, g.req.request_id
        log.warning("rank %d: the prefill group of %s failed (%s): prefilling it here alone", self.rank, rid, why)
        self.active.pop(rid, None)
        if not closed:
            self._close(rid, g.members)
        self._give_back(rid, None)
        g.record.outcome = "recomputed"
        self.fallbacks += 1
        if req.prompt_logprobs is not None:
            req.prompt_logprobs = []
        req.num_computed_tokens = 0
        self.engine.submit(req)

    def abort(self, request_id: str) -> bool:
        g = self.active.pop(request_id, None)
        if g is None:
            return False
        self._close(request_id, g.members)
        self._give_back(request_id, None)
        g.record.outcome = "aborted"
        return True

    # ---- helpers ----------------------------------------------------------------------------
    def _close(self, rid: str, members: list[int]) -> None:
        lost = self.lost()
        for r in members:
            if r == self.rank:
                self.guests.close((self.rank, rid))
            elif r not in lost:
                self.transport.group_close(r, M.GroupClose(self.rank, rid), timeout=self.timeout_s) \
                    .add_done_callback(_quiet)

    def _give_back(self, rid: str, reserved: dict[int, list[int]] | None) -> None:
        """Blocks of the group back: those in the table (local freed, remote released), and those
        reserved but not in it yet."""
        refs = self.rm.free_request(rid)
        if reserved:
            listed = {(ref.instance, ref.block) for ref in refs}
            refs += [RBlock(r, b) for r, bs in reserved.items() for b in bs if (r, b) not in listed]
        self.allocator.give_back(rid, refs)

    def _keep(self, record: GroupRecord) -> None:
        self.records.append(record)
        del self.records[:-self.KEEP]


def _quiet(fut: Future) -> None:
    try:
        fut.value()
    except Exception:  # noqa: BLE001 - the member is gone: it forgets the group with its state
        pass
