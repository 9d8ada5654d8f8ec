"""What an instance measures about itself: steps, the remote path, serving, migration."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from infinite.cluster.messages import StepRecord

STEPS_PER_BEAT = 32  # decode steps a heartbeat carries at most (the newest; a beat is 0.1 s)


@dataclass
class StepCounters:
    steps: int = 0
    remote_steps: int = 0
    remote_calls: int = 0
    remote_wait_s: float = 0.0  # time a micro-batch waited on creditors after its own local work
    remote_compute_s: float = 0.0  # compute-thread time of steps that had remote parts
    remote_step_s: float = 0.0  # wall time of those steps
    served_calls: int = 0  # MicroAttention calls served for debtors
    served_s: float = 0.0  # time spent serving them
    # the same for decode steps alone (one query per request): prefill chunks send many rows and
    # would hide what the steady decode path costs
    decode_remote_calls: int = 0
    decode_remote_wait_s: float = 0.0
    decode_served_calls: int = 0
    decode_served_s: float = 0.0
    migrations: int = 0
    migrated_blocks: int = 0
    step_times: deque = field(default_factory=lambda: deque(maxlen=32))
    # decode steps since the last heartbeat, each with its own batch, context and calls: the cost
    # model's samples (prefill steps are left out: their time is not a decode step's)
    decode_steps: deque = field(default_factory=lambda: deque(maxlen=STEPS_PER_BEAT))
    recent_wait_per_call_s: float = 0.0  # exponential average of the exposed wait of one remote call
    copy_s_per_block: float = 0.0  # exponential average of a block copy between instances (0: none measured)

    def remote_layer(self, calls: int, wait_s: float, decode: bool = False) -> None:
        """One layer's remote calls and the time the step waited on them after its local work."""
        self.remote_calls += calls
        self.remote_wait_s += wait_s
        if decode:
            self.decode_remote_calls += calls
            self.decode_remote_wait_s += wait_s
        if calls:
            per = wait_s / calls
            a = 0.1 if self.recent_wait_per_call_s else 1.0
            self.recent_wait_per_call_s += a * (per - self.recent_wait_per_call_s)

    def copied(self, blocks: int, seconds: float) -> None:
        """A migration copied ``blocks`` between instances in ``seconds`` (request to contents home)."""
        if blocks > 0 and seconds > 0:
            per = seconds / blocks
            a = 0.2 if self.copy_s_per_block else 1.0
            self.copy_s_per_block += a * (per - self.copy_s_per_block)

    def step_done(self, seconds: float, calls_per_layer: int = 0, *, batch_size: int = 0, context_tokens: int = 0,
                  decode: bool = False) -> None:
        """One step ended; ``calls_per_layer`` remote MicroAttention calls each of its layers made.
        A decode step (one query per request) of ``batch_size`` requests, the instance holding
        ``context_tokens``, is also kept as a sample for the next heartbeat."""
        self.steps += 1
        self.step_times.append((seconds, calls_per_layer))
        if decode and batch_size > 0 and seconds > 0:
            self.decode_steps.append(StepRecord(batch_size, context_tokens, seconds, calls_per_layer))

    def take_decode_steps(self) -> list[StepRecord]:
        """The decode steps measured since the last call (the heartbeat's samples)."""
        out = list(self.decode_steps)
        self.decode_steps.clear()
        return out

    def served(self, seconds: float, decode: bool) -> None:
        """One MicroAttention call served for a debtor."""
        self.served_calls += 1
        self.served_s += seconds
        if decode:
            self.decode_served_calls += 1
            self.decode_served_s += seconds

    @property
    def mean_step_s(self) -> float:
        times = list(self.step_times)
        return sum(t for t, _ in times) / len(times) if times else 0.0

    @property
    def mean_calls_per_layer(self) -> float:
        """Remote calls per layer, averaged over the same steps as mean_step_s: the cost model
        fits the remote path's cost from how step time grows with them."""
        times = list(self.step_times)
        return sum(c for _, c in times) / len(times) if times else 0.0
