"""MicroAttention (MA) and AggregationAttention (AA) behind one API.

CUDA tensors run the Triton kernels, CPU tensors the torch path.
``INFINITE_ATTENTION_BACKEND=torch|triton`` forces one for the whole engine
(``triton`` on CPU tensors means the kernels run under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch

from infinite.attention import torch_ops
from infinite.attention.metadata import MAMetadata

BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    forced = os.environ.get("INFINITE_ATTENTION_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"INFINITE_ATTENTION_BACKEND={forced!r}: expected one of {BACKENDS}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _impl(t: torch.Tensor) -> ModuleType:
    if backend_for(t) == "triton":
        if not t.is_cuda and "triton" not in sys.modules:
            # Kernels on CPU tensors run in Triton's interpreter, which must be chosen before import.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from infinite.attention import triton as triton_ops

        return triton_ops
    return torch_ops


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    _impl(k).write_kv(k_cache, v_cache, k, v, slot_mapping)


def micro_attention(q, k_cache, v_cache, meta: MAMetadata, scale: float):
    return _impl(q).micro_attention(q, k_cache, v_cache, meta, scale)


def aggregate(parts):
    if len(parts) == 1:
        return parts[0]
    return _impl(parts[0][0]).aggregate(parts)


__all__ = ["MAMetadata", "write_kv", "micro_attention", "aggregate", "backend_for", "BACKENDS"]
