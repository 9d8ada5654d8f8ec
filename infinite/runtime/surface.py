"""What a front-end reads of any engine, one instance or a cluster: the facts of
the model and its capacity come from one LLMEngine (the instance, or rank 0's)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class EngineFacts(ABC):
    core: object  # an LLMEngine

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def capacity_tokens(self) -> int:
        return self.core.capacity_tokens

    @property
    def num_preemptions(self) -> int:
        return sum(s.get("num_preemptions", 0) for s in self.stats())

    @abstractmethod
    def stats(self) -> list[dict]:
        """One record per instance (each engine knows where they come from)."""
