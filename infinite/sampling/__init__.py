"""Sampling parameters and the batched sampler (see docs/architecture.md, "Sampling")."""

from infinite.sampling.params import GREEDY_EPS, MAX_LOGPROBS, SamplingParams
from infinite.sampling.sampler import (
    SampleResult,
    SampleRow,
    Sampler,
    apply_penalties,
    make_generator,
    process_probs,
    race,
)

__all__ = [
    "GREEDY_EPS",
    "MAX_LOGPROBS",
    "SampleResult",
    "SampleRow",
    "Sampler",
    "SamplingParams",
    "apply_penalties",
    "make_generator",
    "process_probs",
    "race",
]
