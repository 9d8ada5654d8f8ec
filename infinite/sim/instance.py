"""One simulated instance: the project's ``Scheduler`` over a ``SimAllocator``, with step costs.

Between scheduling decisions an instance runs a predicted *run* of steps
(``infinite.sim.segments``); a step the prediction cannot know (an
admission, a borrow, a preemption) is decided by calling
``Scheduler.schedule`` itself. With ``check=True`` every predicted step is
also scheduled for real at its time and compared, which is how the tests
show that fast-forwarding changes nothing.

Where a step's attention runs follows each request's block layout: tokens
in home blocks are attended locally, tokens in a creditor's blocks by that
creditor (queries out, partial results back, the chunk's new KV written
there when its blocks are remote).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infinite.kv.rmanager import blocks_for
from infinite.runtime.request import Request
from infinite.runtime.scheduler import ScheduledBatch, Scheduler
from infinite.sim.costs import InstanceHW, RemotePart, StepCost, decode_coeffs, migration_time, step_cost
from infinite.sim.allocator import LoanCheck, SimAllocator
from infinite.sim.memory import ClusterMemory
from infinite.sim.segments import DecodeRun, Step, StepRun
from infinite.sim.v0_scheduler import V0Scheduler

__all__ = ["SimInstance", "GuestWork", "MAX_RUN_STEPS"]

MAX_RUN_STEPS = 1 << 20  # a bound on one predicted run (a decode run ends at a finish long before)
MAX_CHUNK_STEPS = 4096  # steps kept one by one in a single run


@dataclass
class _Plan:
    """A running request as the prediction advances it."""

    c: int  # computed tokens
    N: int  # tokens (prompt + sampled)
    outs: int
    maxo: int
    b: int  # blocks held (incl. predicted)


@dataclass(frozen=True)
class GuestWork:
    """A prefill group's part of one member's step: its chunk of the prompt, the group's attention
    this member does (its keys, or its queries, by the exchange), the exchange's wait per layer."""

    tokens: int
    reads: float
    pairs: float
    wait_s: float


class SimInstance:
    def __init__(self, rank: int, hw: InstanceHW, hws: list[InstanceHW], mem: ClusterMemory, capacity: int,
                 budget: int, max_seqs: int, check: bool = False, loan_pays: LoanCheck | None = None,
                 hint: Callable[[int], bool] | None = None, clock: Callable[[], float] | None = None,
                 v0: bool = False) -> None:
        self.rank = rank
        self.hw = hw
        self.hws = hws
        self.mem = mem
        self.alloc = SimAllocator(mem, rank, capacity, loan_pays, self._push_seconds, hint, clock)
        # v0: vLLM before chunked prefill (the paper's baseline); its step budget holds any prompt it accepts
        self.sched = V0Scheduler(self.alloc, max_seqs, max(budget, capacity * mem.block_size)) if v0 else \
            Scheduler(self.alloc, max_seqs, budget)
        self.v0 = v0
        self.check = check
        self.run: StepRun | DecodeRun | None = None
        self.version = 0  # bumped whenever the run's end moves (stale end events are dropped)
        self.tok_done = 0  # steps of the run whose tokens are applied
        self.alloc_done = 0  # steps of the run whose blocks are in the layouts (FF mode)
        self.pending_served = 0.0  # remote attention owed to debtors, done before the next run
        self.serve_rates: dict[int, float] = {}  # debtor -> seconds of its work per second, as last seen
        self.serves_on: set[int] = set()  # creditors this instance's last run asked for work
        self.busy_s = 0.0
        self.steps = 0
        self._near_cache: dict[int, bool] = {}
        self.calls = 0  # remote calls per layer of the last step costed (a heartbeat's remote_calls_per_step)
        self.high: dict[str, int] = {}  # most tokens each request has computed (shared by the cluster)
        self.window_end = float("inf")  # work counts until then (the last arrival)
        self.window_tokens = 0
        self.guest: Any = None  # the prefill group this instance is a member of (infinite.sim.grouping)
        self.guest_tokens = 0  # its chunk of the prompt in the group's next round
        self.guest_own = 0  # step budget its own requests keep during a round (GroupPolicy.own_tokens)
        self._round: tuple[list, bool, float] | None = None  # a round's own entries, borrowed, copy seconds

    @property
    def block_size(self) -> int:
        return self.mem.block_size

    def _push_seconds(self, creditor: int, blocks: int) -> float:
        return migration_time(self.hw, self._near(creditor), blocks, self.block_size)

    def _near(self, other: int) -> bool:
        """Whether messages to instance ``other`` stay on NVLink (cached: asked every remote step)."""
        v = self._near_cache.get(other)
        if v is None:
            v = self._near_cache[other] = self.hw.same_node(self.hws[other])
        return v

    # ---- costs -------------------------------------------------------------------------------------
    def cost(self, entries: list[tuple[Request, int, int, bool]], borrowed: bool = False,
             guest: GuestWork | None = None) -> tuple[StepCost, dict]:
        """Cost of a step computing ``n`` tokens from ``c`` for each (request, c, n, samples), plus a
        prefill group's chunk (``guest``) when this instance is a member."""
        bs, home = self.block_size, self.rank
        tokens = sampled = 0
        mb_tokens, mb_sampled, mb_n = [0, 0], [0, 0], [0, 0]  # requests with remote blocks / local only
        read = pairs = 0.0  # prefill rows: KV tokens read and (query, key) pairs, here
        dec_n, dec_sum, dec_max = 0, 0, 0  # decode rows: how many, their KV tokens here, the longest
        parts: dict[int, list[float]] = {}  # creditor -> [query, write, read, pairs]
        for req, c, n, samples in entries:
            tokens += n
            sampled += samples
            lay = self.mem.layouts.get(req.request_id)
            far = int(lay is None or not lay.remote_n)
            mb_tokens[far] += n
            mb_sampled[far] += samples
            mb_n[far] += 1
            if far:
                hb, hi = c, n
            else:
                before = lay.tokens_at(0, c, bs)
                inside = lay.tokens_at(c, c + n, bs)
                rb = ri = 0
                for x in set(before) | set(inside):
                    if x == home:
                        continue
                    b, i = before.get(x, 0), inside.get(x, 0)
                    rb += b
                    ri += i
                    p = parts.setdefault(x, [0, 0, 0.0, 0.0])
                    p[0] += n
                    p[1] += i
                    p[2] += b + i
                    p[3] += n * b + i * (n + 1) / 2
                hb, hi = c - rb, n - ri
            if n == 1:
                dec_n += 1
                dec_sum += hb + hi
                dec_max = max(dec_max, hb + hi)
            else:
                read += hb + hi
                pairs += n * hb + hi * (n + 1) / 2
        dec_read = dec_n * dec_max if self.hw.gpu.decode_pads else dec_sum
        ranks = sorted(parts)
        hws, near = self.hws, self._near
        remote = tuple(RemotePart(hws[x], near(x), int(parts[x][0]), int(parts[x][1]), parts[x][2], parts[x][3])
                       for x in ranks)
        extra_attn = extra_wait = 0.0
        if guest is not None:
            tokens += guest.tokens
            mb_tokens[0] += guest.tokens
            extra_attn, extra_wait = self.hw.attention_s(guest.reads, guest.pairs), guest.wait_s
        base, overlap = self._micro_batches(mb_tokens, mb_sampled, mb_n) if remote else (None, 0.0)
        sc = step_cost(self.hw, tokens, sampled, read, pairs, remote, borrowed, len(entries), extra_attn, extra_wait,
                       dec_read, base, overlap)
        self.calls = len(ranks)
        return sc, dict(zip(ranks, sc.served_s))

    def _micro_batches(self, tokens: list[int], sampled: list[int], count: list[int]) -> tuple[float | None, float]:
        """(non-attention seconds, seconds per layer that hide remote waits) of a step with remote
        MicroAttention, cut as the runtime's StepRunner cuts it: requests with remote blocks apart from
        local-only ones, or an all-remote batch in two halves. The compute thread runs one micro-batch's
        layer while the other waits on its creditors, so a layer waits only for what the other's
        non-attention work does not cover; each micro-batch reads the weights (None, 0: a lone one)."""
        hw, g = self.hw, self.hw.gpu
        if count[1]:
            parts = [(tokens[0], sampled[0]), (tokens[1], sampled[1])]
        elif count[0] >= 2:
            parts = [(tokens[0] / 2, sampled[0] / 2)] * 2
        else:
            return None, 0.0
        bases = [hw.base_s(t, s) for t, s in parts]
        other = parts[1]
        overlap = (bases[1] - g.step_overhead_s - g.request_overhead_s * other[1]) / hw.model.num_layers
        return sum(bases) - g.step_overhead_s, max(0.0, overlap)

    # ---- predicting a run ------------------------------------------------------------------------------
    def head_need(self) -> tuple[int, int]:
        """(blocks the queue's head needs to be admitted, blocks the cluster may lend us)."""
        if not self.sched.waiting:
            return 0, 0
        head = self.sched.waiting[0]
        lend = self.mem.borrowable(self.rank) if self.mem.policy.enabled else 0
        need = self.sched.admission_blocks(head) if self.v0 else blocks_for(head.num_tokens + 1, self.block_size)
        return need, lend

    def _admits(self, head_need: int, borrowable: int, budget_left: int, free: int) -> bool:
        s = self.sched
        if self.v0:  # a prefill step of its own: the whole budget, whatever the decodes take
            return bool(s.waiting) and len(s.running) < s.max_num_seqs and head_need <= free + borrowable and \
                s.waiting[0].num_tokens - s.waiting[0].num_computed_tokens <= s.max_num_batched_tokens
        return bool(s.waiting) and budget_left > 0 and len(s.running) < s.max_num_seqs and \
            head_need <= free + borrowable

    def plan(self, t0: float) -> StepRun | DecodeRun | None:
        """Predict the steps from ``t0`` until something only the scheduler can decide; None if the
        very first step is such a step."""
        running = self.sched.running
        if not running or self.guest is not None:  # a group's round: the real scheduler, a step at a time
            return None
        states = []
        for r in running:
            lay = self.mem.layouts.get(r.request_id)
            states.append(_Plan(r.num_computed_tokens, r.num_tokens, len(r.output_token_ids), r.max_tokens,
                                lay.total if lay is not None else 0))
        head_need, borrowable = self.head_need()
        free0 = self.mem.pools[self.rank].free
        if all(p.N - p.c == 1 for p in states) and len(states) <= self.sched.max_num_batched_tokens:
            run = self._plan_decode(t0, states, head_need, borrowable, free0)
            if run is not None or not self._remote_ahead(states):
                return run
        return self._plan_steps(t0, states, head_need, borrowable, free0)

    def _remote_ahead(self, states: list[_Plan]) -> bool:
        """Whether some request will still write into remote blocks (the closed form assumes not)."""
        bs = self.block_size
        for r, p in zip(self.sched.running, states):
            lay = self.mem.layouts.get(r.request_id)
            if lay is None:
                continue
            pos = 0
            for inst, cnt in lay.runs:
                pos += cnt * bs
                if inst != self.rank and pos > p.c:
                    return True
        return False

    def _plan_decode(self, t0: float, states: list[_Plan], head_need: int, borrowable: int,
                     free0: int) -> DecodeRun | None:
        bs, beta = self.block_size, len(states)
        if self._remote_ahead(states):
            return None

        def need(s: int) -> int:
            return sum(max(0, blocks_for(p.c + s, bs) - p.b) for p in states)

        budget_left = self.sched.max_num_batched_tokens - beta
        n1 = need(1)
        if n1 > free0 or self._admits(head_need, borrowable, budget_left, free0 - n1):
            return None
        k_fin = min(p.maxo - p.outs for p in states)
        lo, hi = 1, min(k_fin, MAX_RUN_STEPS)
        while lo < hi:  # the last step whose growth the home pool still holds
            mid = (lo + hi + 1) // 2
            if need(mid) <= free0:
                lo = mid
            else:
                hi = mid - 1
        k = lo
        entries = [(r, p.c, 1, True) for r, p in zip(self.sched.running, states)]
        sc, served = self.cost(entries)
        x1 = x1_max = 0
        for r, p in zip(self.sched.running, states):
            lay = self.mem.layouts.get(r.request_id)
            rem = sum(n for i, n in lay.held.items() if i != self.rank) * bs if lay is not None else 0
            x1 += p.c + 1 - rem
            x1_max = max(x1_max, p.c + 1 - rem)
        if self.hw.gpu.decode_pads:  # the batch's KV gathered padded to its longest local context
            x1 = beta * x1_max
        _, g = decode_coeffs(self.hw, beta)
        base = sc.seconds - self.hw.model.num_layers * max(g * x1, sc.remote_layer_s)  # all but attention
        run = DecodeRun(t0, list(self.sched.running), k, base, self.hw.model.num_layers, g, x1, sc.remote_layer_s,
                        served, need(k), budget_left, bs, [p.c for p in states], [p.b for p in states])
        return run

    def _plan_steps(self, t0: float, states: list[_Plan], head_need: int, borrowable: int,
                    free0: int) -> StepRun | None:
        bs, budget = self.block_size, self.sched.max_num_batched_tokens
        running = self.sched.running
        steps: list[Step] = []
        free, t, reserved = free0, t0, 0
        while len(steps) < MAX_CHUNK_STEPS:
            left, need = budget, 0
            work, blocks, entries = [], [], []
            for i, p in enumerate(states):
                if left <= 0:
                    break
                n = min(p.N - p.c, left)
                nb = max(0, blocks_for(p.c + n, bs) - p.b)
                if nb > 0:
                    need += nb
                    blocks.append((i, nb))
                work.append((i, n))
                entries.append((running[i], p.c, n, p.c + n == p.N))
                left -= n
            if need > free or self._admits(head_need, borrowable, left, free - need):
                break
            sc, served = self.cost(entries)
            t += sc.seconds
            steps.append(Step(t, work, blocks, served, left, sc.seconds))
            free -= need
            reserved += need
            done = False
            for i, n in work:
                p = states[i]
                p.c += n
                if p.c == p.N:
                    p.N += 1
                    p.outs += 1
                    done |= p.outs >= p.maxo
                p.b += next((nb for j, nb in blocks if j == i), 0)
            if done or all(p.N - p.c == 1 for p in states):
                break
        if not steps:
            return None
        return StepRun(t0, list(running), steps, reserved)

    # ---- a step the scheduler decides ----------------------------------------------------------------
    def real_step(self, t0: float) -> tuple[StepRun | None, ScheduledBatch]:
        self.alloc.borrowed_in_step, self.alloc.push_s = False, 0.0
        if self.guest is not None:
            return self._round_step(t0)
        batch = self.sched.schedule()
        if not batch.requests:
            return None, batch
        entries = [(r, r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                   for r, n in zip(batch.requests, batch.num_new_tokens)]
        sc, served = self.cost(entries, self.alloc.borrowed_in_step)
        seconds = sc.seconds + self.alloc.push_s  # local-first growth copied blocks out before the step
        step = Step(t0 + seconds, [(i, n) for i, n in enumerate(batch.num_new_tokens)], [], served, 0, seconds)
        return StepRun(t0, list(batch.requests), [step], 0, real=True), batch

    def _round_step(self, t0: float) -> tuple[StepRun, ScheduledBatch]:
        """A step of a prefill group's round: the group's chunk (``guest_tokens``), and the scheduler's
        step for this instance's own requests within what the group leaves them (``guest_own``: any
        more would make every member wait). Its end is pending until every member's step is known
        (``round_cost``, called by the group)."""
        budget = self.sched.max_num_batched_tokens
        self.sched.max_num_batched_tokens = max(0, min(budget - self.guest_tokens, self.guest_own))
        try:
            batch = self.sched.schedule()
        finally:
            self.sched.max_num_batched_tokens = budget
        entries = [(r, r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                   for r, n in zip(batch.requests, batch.num_new_tokens)]
        self._round = (entries, self.alloc.borrowed_in_step, self.alloc.push_s)
        step = Step(float("inf"), [(i, n) for i, n in enumerate(batch.num_new_tokens)], [], {}, 0, 0.0)
        return StepRun(t0, list(batch.requests), [step], 0, real=True), batch

    def round_cost(self, guest: GuestWork, span_s: float) -> tuple[float, dict[int, float]]:
        """(seconds, remote work per creditor) of this member's pending round step with its group part,
        and the work it owes debtors that came in over about ``span_s`` at the rate its debtors ask
        (its serving runs beside the step; paid at once, the owed work of a debtor's long run would
        hold every member of the group up at one round)."""
        entries, borrowed, push_s = self._round
        self._round = None
        sc, served = self.cost(entries, borrowed, guest)
        owed = min(self.pending_served, sum(self.serve_rates.values()) * span_s)
        self.pending_served -= owed
        return sc.seconds + push_s + owed, served

    # ---- applying a run ------------------------------------------------------------------------------
    def begin(self, run: StepRun | DecodeRun) -> None:
        self.run = run
        self.tok_done = 0
        self.alloc_done = 0 if not run.real else run.num_steps
        if run.reserved:
            self.mem.reserve(self.rank, run.reserved)
            if self.check:
                self.alloc.reserve = run.reserved
        self.version += 1

    def apply_tokens(self, upto: int) -> list[Request]:
        """Apply the tokens of steps ``tok_done+1..upto``; returns requests that reached max_tokens.

        Tokens a request computes for the first time (not recomputed after a preemption) and in a
        step that ends inside the measurement window count as work done (``window_tokens``)."""
        run, a = self.run, self.tok_done
        if upto <= a:
            return []
        finished = []
        high = self.high
        if isinstance(run, DecodeRun):
            k = upto - a
            first_end = run.end(a + 1)
            last_end = run.end(upto)
            in_window = k if last_end <= self.window_end else max(0, min(upto, run.steps_done(self.window_end)) - a)
            for r in run.reqs:
                c0 = r.num_computed_tokens
                r.num_computed_tokens += k
                new = r.num_computed_tokens - max(high.get(r.request_id, 0), c0)
                if new > 0:
                    high[r.request_id] = r.num_computed_tokens
                    self.window_tokens += max(0, in_window - (k - new))
                if not r.output_token_ids:
                    r.metrics.first_token_time = first_end
                r.output_token_ids.extend([0] * k)
                r.metrics.last_token_time = last_end
                if len(r.output_token_ids) >= r.max_tokens:
                    finished.append(r)
        else:
            for s in range(a, upto):
                st = run.steps[s]
                for i, n in st.work:
                    r = run.reqs[i]
                    r.num_computed_tokens += n
                    new = r.num_computed_tokens - high.get(r.request_id, 0)
                    if new > 0:
                        high[r.request_id] = r.num_computed_tokens
                        if st.end <= self.window_end:
                            self.window_tokens += new
                    if r.num_computed_tokens == r.num_tokens:
                        r.output_token_ids.append(0)
                        if r.metrics.first_token_time is None:
                            r.metrics.first_token_time = st.end
                        r.metrics.last_token_time = st.end
                        if len(r.output_token_ids) >= r.max_tokens:
                            finished.append(r)
        self.tok_done = upto
        self.steps += upto - a
        return finished

    def apply_blocks(self, upto: int) -> None:
        """Hand the reserved blocks of steps ``alloc_done+1..upto`` to their requests (FF mode)."""
        run = self.run
        if self.check or upto <= self.alloc_done:
            return
        for i, d in run.req_blocks(upto, self.alloc_done).items():
            self.mem.assign_reserved(run.reqs[i].request_id, self.rank, d)
        self.alloc_done = upto

    def sync(self, now: float) -> None:
        """Bring requests and layouts to where stepping would have them at ``now`` (FF mode)."""
        if self.run is None or self.check:
            return
        k = self.run.num_steps
        j = min(self.run.steps_done(now), k - 1)  # the last step's tokens are the end event's to apply
        done = self.apply_tokens(j)
        assert not done, "a request finished inside a run"
        self.apply_blocks(min(j + 1, k))

    def truncate(self, last: int) -> None:
        """Let the run end after step ``last`` (>= the step in progress)."""
        run = self.run
        if last >= run.num_steps:
            return
        drop = run.truncate(last)
        if drop:
            self.mem.unreserve(self.rank, drop)
            if self.check:
                self.alloc.reserve -= drop
        self.version += 1

    def finish_run(self) -> tuple[list[Request], dict[int, float], float]:
        """Apply the rest of the run; returns finished requests, remote work per creditor, busy seconds."""
        run = self.run
        k = run.num_steps
        self.apply_blocks(k)
        finished = self.apply_tokens(k)
        if self.check and self.alloc.reserve:
            raise AssertionError(f"instance {self.rank}: {self.alloc.reserve} reserved blocks left unused")
        served = run.served(0, k)
        busy = run.busy_s()
        self.busy_s += busy
        self.run = None
        return finished, served, busy

    # ---- check mode: every predicted step scheduled for real ---------------------------------------------
    def check_step(self, s: int) -> None:
        """Schedule step ``s`` with the real scheduler and compare it with the prediction."""
        run = self.run
        if run.real:
            return
        self.alloc.borrowed_in_step = False
        batch = self.sched.schedule()
        want = run.work(s - 1, s)[0]
        got = [(r.request_id, n) for r, n in zip(batch.requests, batch.num_new_tokens)]
        exp = [(run.reqs[i].request_id, n) for i, n in want]
        if got != exp or batch.preempted:
            raise AssertionError(f"instance {self.rank} step {s}: predicted {exp}, scheduler gave {got} "
                                 f"(preempted {[r.request_id for r in batch.preempted]})")
        entries = [(r, r.num_computed_tokens, n, r.num_computed_tokens + n == r.num_tokens)
                   for r, n in zip(batch.requests, batch.num_new_tokens)]
        sc, _ = self.cost(entries, self.alloc.borrowed_in_step)
        pred = run.step_seconds(s) if isinstance(run, DecodeRun) else run.steps[s - 1].seconds
        if abs(sc.seconds - pred) > 1e-9 * max(1.0, pred):
            raise AssertionError(f"instance {self.rank} step {s}: predicted {pred} s, stepping costs {sc.seconds} s")
