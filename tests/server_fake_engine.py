"""A deterministic stand-in for AsyncLLMEngine, for fast in-process front-end tests.

It keeps the engine's contract that the front-end relies on: cumulative
RequestOutputs, stop strings cut from the text, a block per ``block_size``
tokens held while a request runs and freed on finish or abort, and
``stats()`` that show them. Tokens are lowercase letters, one per token.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

from infinite.errors import RequestError
from infinite.outputs import CompletionOutput, RequestOutput
from infinite.runtime.request import Request
from infinite.runtime.surface import EngineFacts


class CharTokenizer:
    """One token per character: id = ord(c); eos = 0."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != 0)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class _FakeCore:
    """The model facts EngineFacts reads from an engine's core."""

    model_name = "fake-model"
    model_dir = "/fake/model"
    max_model_len = 256
    capacity_tokens = 200

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()


class FakeEngine(EngineFacts):
    def __init__(self, num_blocks: int = 64, block_size: int = 16, step_s: float = 0.002) -> None:
        self.core = _FakeCore()
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.step_s = step_s
        self.used: dict[str, int] = {}
        self.aborted: list[str] = []
        self.closed = False
        self.fail_after: int | None = None  # tokens after which every stream fails (RequestError)

    @property
    def is_running(self) -> bool:
        return not self.closed

    def make_request(self, prompt, params, request_id=None) -> Request:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty (0 tokens)")
        return Request(request_id or "fake", ids, params, max_tokens=params.max_tokens or 16)

    @classmethod
    async def start(cls) -> FakeEngine:
        return cls()

    def _blocks(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    async def generate(self, req: Request) -> AsyncIterator[RequestOutput]:
        prompt_token_ids, params, request_id = req.prompt_token_ids, req.params, req.request_id
        rng = random.Random(params.seed if params.seed is not None else random.random())
        ids: list[int] = []
        finished = False
        self.used[request_id] = self._blocks(len(prompt_token_ids))
        try:
            while not finished:
                await asyncio.sleep(self.step_s)
                if self.fail_after is not None and len(ids) >= self.fail_after:
                    raise RequestError("rank 1 died and no survivor can hold the request", "rank_lost")
                ids.append(ord("a") + rng.randrange(26))
                self.used[request_id] = self._blocks(len(prompt_token_ids) + len(ids))
                text = self.tokenizer.decode(ids)
                reason = "length" if len(ids) >= params.max_tokens else None
                for s in params.stop:
                    if s in text:
                        text, reason = text[: text.index(s)], "stop"
                finished = reason is not None
                lp = [{t: -1.0} for t in ids] if params.logprobs is not None else None
                out = CompletionOutput(0, text, list(ids), None, lp, reason)
                yield RequestOutput(request_id, None, prompt_token_ids, [out], finished)
        finally:
            self.used.pop(request_id, None)
            if not finished:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.used.pop(request_id, None)

    def stats(self) -> list[dict]:
        used = sum(self.used.values())
        return [
            {
                "rank": 0,
                "total_blocks": self.num_blocks,
                "free_blocks": self.num_blocks - used,
                "used_blocks": used,
                "lent_blocks": 0,
                "borrowed_blocks": 0,
                "num_running": len(self.used),
                "num_waiting": 0,
                "step_time_ms": self.step_s * 1000,
                "num_preemptions": 0,
            }
        ]

    def cluster_status(self) -> dict:
        return {"instances": self.stats(), "debts": []}

    async def shutdown(self) -> None:
        self.closed = True
        self.used.clear()
