"""EngineFacts: the contract between a front-end (HTTP server, offline driver) and an engine.

Both engines implement it — ``AsyncLLMEngine`` (one instance) and rank 0's
``ClusterEngine`` (a cluster) — and so does the server tests' fake engine, so
the front-end never asks which one it holds (no ``getattr`` probing). The
facts of the model and its capacity come from one ``LLMEngine`` (``core``):
the instance, or rank 0's.

A request that cannot complete raises ``infinite.errors.RequestError`` from
``generate``, whatever the cause.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from infinite.outputs import RequestOutput
from infinite.runtime.request import Request
from infinite.sampling.params import SamplingParams


class EngineFacts(ABC):
    core: Any  # an LLMEngine: tokenizer, model facts, validation

    # ---- facts ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def model_path(self) -> str:
        return self.core.model_dir

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def capacity_tokens(self) -> int:
        return self.core.capacity_tokens

    @property
    def num_preemptions(self) -> int:
        return sum(s.get("num_preemptions", 0) for s in self.stats())

    @property
    @abstractmethod
    def is_running(self) -> bool:
        """False once the engine failed or shut down (the server then answers 503)."""


    # ---- requests ------------------------------------------------------------------
    @abstractmethod
    def make_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate now: ValueError/TypeError with the numbers, before anything streams."""

    @abstractmethod
    def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of a request made by make_request, until one is finished.
        Leaving the iterator early aborts the request; a failure raises RequestError."""

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    # ---- observability and lifecycle -------------------------------------------------
    @abstractmethod
    def stats(self) -> list[dict]:
        """One record per instance (rank, blocks free/used/lent/borrowed, batch, step time...)."""

    @abstractmethod
    def cluster_status(self) -> dict:
        """{"instances": stats(), "debts": [...], ...}: what /status and the dashboard show."""

    @abstractmethod
    async def shutdown(self) -> None: ...
