"""What generate() returns, shaped like vLLM's RequestOutput so existing code reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per generated token: chosen + top-k
    finish_reason: str | None = None  # 'stop' | 'length' | None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)
    # As vLLM: one entry per prompt token, None for the first, then {token id: logprob} holding the
    # prompt's own token and the top `prompt_logprobs` tokens; None when not asked for.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # A delta output ("delta" output kind): how many output tokens came before this one's; its
    # text, token ids and logprobs are only the new ones. None: a cumulative output.
    delta_offset: int | None = None


class OutputAccumulator:
    """Folds one request's delta outputs into its cumulative output, in O(new) per delta.

    Deltas carry their offset; one that arrives early (messages from a home can overtake each
    other) waits for the ones before it, one already folded in is dropped. ``cumulative()``
    materialises the whole output (O(length)): for readers that want it, once."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None
        self.text_pieces: list[str] = []
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt: str | None = None
        self.prompt_token_ids: list[int] = []  # from the first delta that carries them (only it does)
        self.last: RequestOutput | None = None
        self._early: dict[int, RequestOutput] = {}

    def add(self, out: RequestOutput) -> list[RequestOutput]:
        """Fold ``out`` in; returns the deltas now in order (``out`` and any it unblocked), [] if it
        came early, twice, or after the finished one."""
        if out.delta_offset is None:
            raise ValueError("OutputAccumulator takes delta outputs")
        c = out.outputs[0]
        if (self.last is not None and self.last.finished) or (not c.token_ids and not c.text and not out.finished):
            return []  # after the end, or carrying nothing
        have = len(self.token_ids)
        if out.delta_offset > have:
            self._early[out.delta_offset] = out
            return []
        if out.delta_offset < have:
            return []  # already folded in
        ready = []
        while out is not None:
            c = out.outputs[0]
            self.token_ids.extend(c.token_ids)
            if c.logprobs is not None:
                if self.logprobs is None:
                    self.logprobs = []
                self.logprobs.extend(c.logprobs)
            if c.text:
                self.text_pieces.append(c.text)
            if out.prompt_logprobs is not None:
                self.prompt_logprobs = out.prompt_logprobs
            if out.prompt_token_ids and not self.prompt_token_ids:
                self.prompt, self.prompt_token_ids = out.prompt, out.prompt_token_ids
            self.last = out
            ready.append(out)
            out = None if self.last.finished else self._early.pop(len(self.token_ids), None)
        return ready

    @property
    def text(self) -> str:
        if len(self.text_pieces) > 1:
            self.text_pieces = ["".join(self.text_pieces)]
        return self.text_pieces[0] if self.text_pieces else ""

    def cumulative(self) -> RequestOutput:
        """The request's whole output so far, as one cumulative RequestOutput (O(length))."""
        last = self.last
        if last is None:
            raise ValueError("no output yet")
        c = last.outputs[0]
        comp = CompletionOutput(c.index, self.text, list(self.token_ids), c.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs), c.finish_reason, c.stop_reason)
        return RequestOutput(last.request_id, self.prompt, self.prompt_token_ids, [comp], last.finished,
                             last.metrics, last.num_cached_tokens, dict(last.extra), self.prompt_logprobs)
