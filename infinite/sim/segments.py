"""Runs of steps an instance takes between scheduling decisions, predicted instead of stepped.

Why: 1024 instances decoding for an hour are ~10^8 steps; calling the
scheduler for each is hours of Python. Between events that change what the
scheduler would do (an arrival, a finish, memory that must be borrowed or
preempted, an admission that becomes possible, a migration), every step
gives each running request the same share of the token budget, so the
steps can be predicted: ``StepRun`` keeps them one by one (prefill chunks
move on in ways that are cheap to replay), ``DecodeRun`` in closed form
(every request decodes one token per step, step time grows linearly with
the context). Both answer the same questions — when does step ``s`` end,
how many blocks have steps ``1..s`` taken, what did they compute — so the
engine can stop a run early (``truncate``) at any step boundary. The test
``test_fast_forward_equals_stepping`` runs whole traces both ways.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from infinite.kv.rmanager import blocks_for
from infinite.runtime.request import Request

__all__ = ["Step", "StepRun", "DecodeRun"]


@dataclass
class Step:
    """One step: who computes how many tokens, the blocks it takes from the reservation."""

    end: float
    work: list[tuple[int, int]]  # (index into the run's requests, new tokens)
    blocks: list[tuple[int, int]]  # (index, new home blocks) taken at the step's start
    served: dict[int, float]  # creditor rank -> GPU seconds of remote attention this step asks of it
    budget_left: int  # token budget the scheduler had left for admissions
    seconds: float = 0.0


@dataclass
class StepRun:
    """Steps kept one by one (prefill chunks, or one step the real scheduler decided)."""

    t0: float
    reqs: list[Request]
    steps: list[Step]
    reserved: int  # home blocks taken from the pool for these steps, handed out as they run
    real: bool = False  # its one step came from Scheduler.schedule (blocks already in the layouts)
    _cum_blocks: list[int] = field(default_factory=list)
    _ends: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        tot = 0
        for st in self.steps:
            tot += sum(n for _, n in st.blocks)
            self._cum_blocks.append(tot)
            self._ends.append(st.end)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def end(self, s: int) -> float:
        return self.t0 if s == 0 else self.steps[s - 1].end

    def steps_done(self, now: float) -> int:
        return bisect.bisect_right(self._ends, now)

    def blocks_upto(self, s: int) -> int:
        return self._cum_blocks[s - 1] if s > 0 else 0

    def budget_left(self, s: int) -> int:
        return self.steps[s - 1].budget_left

    def req_blocks(self, s: int, a: int = 0) -> dict[int, int]:
        """New home blocks per request index taken by steps ``a+1..s``."""
        out: dict[int, int] = {}
        for st in self.steps[a:s]:
            for i, n in st.blocks:
                out[i] = out.get(i, 0) + n
        return out

    def work(self, a: int, b: int) -> list[list[tuple[int, int]]]:
        """The work of steps ``a+1..b``, step by step."""
        return [st.work for st in self.steps[a:b]]

    def served(self, a: int, b: int) -> dict[int, float]:
        out: dict[int, float] = {}
        for st in self.steps[a:b]:
            for c, w in st.served.items():
                out[c] = out.get(c, 0.0) + w
        return out

    def busy_s(self) -> float:
        """Seconds the instance computed (a group's step may end later than its work: the round's
        slowest member ends it)."""
        return sum(st.seconds for st in self.steps)

    def settle(self, end: float, seconds: float, served: dict[int, float]) -> None:
        """A group round's one step, costed once every member's step was known: it ends at ``end``."""
        st = self.steps[0]
        st.end, st.seconds, st.served = end, seconds, served
        self._ends[0] = end

    @property
    def pending(self) -> bool:
        """A group round's step whose end is not known yet (other members still to schedule theirs)."""
        return bool(self._ends) and self._ends[-1] == float("inf")

    def truncate(self, s: int) -> int:
        """Keep steps ``1..s``; returns the reserved blocks the dropped steps no longer need."""
        drop = self.reserved - self.blocks_upto(s) if not self.real else 0
        self.steps = self.steps[:s]
        self._cum_blocks = self._cum_blocks[:s]
        self._ends = self._ends[:s]
        self.reserved -= drop
        return drop


@dataclass
class DecodeRun:
    """``K`` steps in which every running request decodes one token.

    Step ``s`` (1-based) lasts ``base + L·max(g·(x1 + β·(s-1)), remote)``: the local
    attention reads one more token per request per step, the slowest creditor's part
    (``remote``) stays fixed because new blocks are taken at home.
    """

    t0: float
    reqs: list[Request]
    num_steps: int
    base: float
    layers: int
    g: float  # seconds per layer per local context token
    x1: float  # local context tokens read in step 1
    remote: float  # seconds per layer the slowest creditor's part takes
    served_per_step: dict[int, float]
    reserved: int
    budget_left_const: int
    block_size: int
    c0: list[int] = field(default_factory=list)  # computed tokens per request at the start
    b0: list[int] = field(default_factory=list)  # blocks per request at the start
    real: bool = False

    @property
    def beta(self) -> int:
        return len(self.reqs)

    def _first_local_bound(self) -> int:
        """First step whose local attention takes at least as long as the slowest creditor's part."""
        if self.g * self.x1 >= self.remote:
            return 1
        s = max(1, int(1 + (self.remote / self.g - self.x1) / self.beta))  # g > 0: attention costs something
        while s > 1 and self.g * (self.x1 + self.beta * (s - 2)) >= self.remote:
            s -= 1
        while self.g * (self.x1 + self.beta * (s - 1)) < self.remote:
            s += 1
        return s

    def elapsed(self, k: int) -> float:
        """Seconds of steps ``1..k`` (closed form)."""
        if k <= 0:
            return 0.0
        s_star = self._first_local_bound()
        flat = min(k, s_star - 1)
        total = k * self.base + self.layers * self.remote * flat
        a, b = max(1, s_star), k
        if b >= a:
            cnt = b - a + 1
            tri = (b - 1) * b // 2 - (a - 2) * (a - 1) // 2
            total += self.layers * self.g * (cnt * self.x1 + self.beta * tri)
        return total

    def step_seconds(self, s: int) -> float:
        return self.base + self.layers * max(self.g * (self.x1 + self.beta * (s - 1)), self.remote)

    def busy_s(self) -> float:
        return self.elapsed(self.num_steps)

    pending = False

    def end(self, s: int) -> float:
        return self.t0 + self.elapsed(s)

    def steps_done(self, now: float) -> int:
        lo, hi = 0, self.num_steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.t0 + self.elapsed(mid) <= now:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def req_blocks(self, s: int, a: int = 0) -> dict[int, int]:
        """New home blocks per request index taken by steps ``a+1..s``."""
        bs = self.block_size
        out = {}
        for i in range(self.beta):
            base = max(self.b0[i], blocks_for(self.c0[i] + a, bs)) if a > 0 else self.b0[i]
            n = blocks_for(self.c0[i] + s, bs) - base
            if n > 0:
                out[i] = n
        return out

    def blocks_upto(self, s: int) -> int:
        return sum(self.req_blocks(s).values()) if s > 0 else 0

    def budget_left(self, s: int) -> int:
        return self.budget_left_const

    def work(self, a: int, b: int) -> list[list[tuple[int, int]]]:
        one = [(i, 1) for i in range(self.beta)]
        return [one] * (b - a)

    def served(self, a: int, b: int) -> dict[int, float]:
        return {c: w * (b - a) for c, w in self.served_per_step.items()}

    def truncate(self, s: int) -> int:
        drop = self.reserved - self.blocks_upto(s)
        self.num_steps = s
        self.reserved -= drop
        return drop
