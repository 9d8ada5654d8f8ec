"""Infinite: long-context LLM serving with DistAttention and a distributed KV cache."""

from infinite.llm import LLM
from infinite.outputs import CompletionOutput, RequestOutput
from infinite.sampling.params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
