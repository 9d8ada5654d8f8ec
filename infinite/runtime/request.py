"""A request's state as the scheduler and the engine see it (vLLM v1 style).

There are no prefill/decode phases: a request has num_computed_tokens catching
up to num_tokens, and each step hands it some of a token budget.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from infinite.kv.prefix import BlockHash, extend_hashes
from infinite.outputs import RequestMetrics
from infinite.sampling.params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens resolved against max_model_len
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    detokenizer: object | None = None
    # prompt_logprobs: entry j is for prompt token j+1 (token 0 has none); filled chunk by chunk
    # by the prefill and kept across preemption, so a recompute does not redo them.
    prompt_logprobs: list[dict[int, float]] | None = None
    matcher: object | None = None  # llguidance state of a structured-output request (engine-side only)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    # What its outputs hold (infinite.sampling.params.OUTPUT_KINDS): from its params, unless the
    # engine's caller knows better (offline generate: "final_only"; a cluster home: "delta", the wire).
    output_kind: str = "cumulative"
    # What delta outputs have carried so far (output tokens, visible text characters, logprobs).
    emitted_tokens: int = 0
    emitted_chars: int = 0
    emitted_logprobs: int = 0
    prompt_logprobs_sent: bool = False
    prompt_sent: bool = False  # a delta output carried the prompt (the later ones do not: O(new) each)
    sample_row: object | None = None  # the sampler's view of the request, made once (engine-side only)
    quick_stop: tuple | None = None  # the engine's fast stop check of the request, made once
    # The output text as the pieces it was detokenized in: appending is O(1), joined when read.
    text_pieces: list[str] = field(default_factory=list)
    text_len: int = 0
    detok_pos: int = 0  # output tokens the detokenizer was fed (behind during a step: runtime/detokenize.py)
    # Prefix cache: names of the full blocks of the tokens (infinite.kv.prefix), made as needed;
    # prompt tokens whose KV came from the cache at the first admission (usage.cached_tokens);
    # and where the gManager saw a longer cached prefix: (holder rank, blocks), a hint only.
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_cached_tokens: int = 0
    prefix_hint: tuple[int, int] | None = None
    # In a cluster, the instance to run the request on instead of the router's choice (vLLM's
    # data_parallel_rank: external routing; benchmarks that place a request on purpose).
    data_parallel_rank: int | None = None
    # In a cluster, the prefill group (an ``sp_layout.SegmentLayout``, members[0] the home) to
    # prefill the prompt on instead of the gManager's choice: benchmarks and tests that place one.
    prefill_layout: object | None = None

    @property
    def text(self) -> str:
        if len(self.text_pieces) > 1:
            self.text_pieces = ["".join(self.text_pieces)]
        return self.text_pieces[0] if self.text_pieces else ""

    @text.setter
    def text(self, value: str) -> None:
        self.text_pieces = [value] if value else []
        self.text_len = len(value)

    def append_text(self, delta: str) -> None:
        if delta:
            self.text_pieces.append(delta)
            self.text_len += len(delta)

    def text_tail(self, n: int) -> str:
        """The last ``n`` characters of the text, joining only the pieces they span."""
        out: list[str] = []
        have = 0
        for piece in reversed(self.text_pieces):
            if have >= n:
                break
            out.append(piece)
            have += len(piece)
        tail = "".join(reversed(out))
        return tail[len(tail) - n:] if len(tail) > n else tail

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_prompt_logprobs_missing(self) -> int:
        """Prompt positions whose logprobs are still to compute (0 when none were asked)."""
        if self.prompt_logprobs is None:
            return 0
        return self.num_prompt_tokens - 1 - len(self.prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def block_names(self, block_size: int, num_blocks: int) -> list[BlockHash]:
        """The request's own list of block names (read it, never change it), holding at least the
        first ``num_blocks`` full blocks of its tokens (fewer when fewer are full): each block is
        hashed once, so this costs O(blocks not named before)."""
        if len(self.block_hashes) < num_blocks:
            extend_hashes(self.block_hashes, _Tokens(self), block_size, self.params.cache_salt, num_blocks)
        return self.block_hashes

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class _Tokens:
    """A request's prompt and output tokens as one sliceable sequence, without concatenating them."""

    def __init__(self, req: Request) -> None:
        self.req = req

    def __len__(self) -> int:
        return self.req.num_tokens

    def __getitem__(self, s: slice) -> list[int]:
        return self.req.token_slice(s.start, s.stop)
