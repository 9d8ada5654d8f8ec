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

    def health(self) -> dict:
        """What ``GET /health`` reports once the engine runs: ``{"status": "ok"}``, or for a
        cluster that lost an instance ``{"status": "degraded", "lost": [...], ...}`` (a 503),
        so that monitoring sees the loss while the survivors keep serving."""
        return {"status": "ok"}

    async def remove_instance(self, rank: int) -> dict:
        """Drain instance ``rank`` out of the cluster (its requests move, the blocks it lent
        come back, then it exits). One instance has nothing to remove."""
        from infinite.errors import RequestError

        raise RequestError("this server runs one instance: there is no instance to remove", "invalid")

    @abstractmethod
    async def shutdown(self) -> None: ...
