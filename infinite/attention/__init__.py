"""MicroAttention (MA) and AggregationAttention (AA) behind one API.

CUDA tensors run the Triton kernels, CPU tensors the torch path.
``INFINITE_ATTENTION_BACKEND=torch|triton`` forces one for the whole process
(``triton`` on CPU tensors means the kernels run under ``TRITON_INTERPRET=1``).
The variable is read once, at the first call: these functions run several
times per layer per step. A test or tool that changes it afterwards calls
:func:`reload_backend`.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch

from infinite.attention import torch_ops
from infinite.attention.metadata import MAMetadata

BACKENDS = ("torch", "triton")
_UNREAD = object()
_forced: object = _UNREAD  # None (no override), "torch" or "triton" once read
_triton: ModuleType | None = None


def reload_backend() -> str | None:
    """Read ``INFINITE_ATTENTION_BACKEND`` again; returns the forced backend or None."""
    global _forced
    raw = os.environ.get("INFINITE_ATTENTION_BACKEND", "").strip().lower()
    if raw and raw not in BACKENDS:
        raise ValueError(f"INFINITE_ATTENTION_BACKEND={raw!r}: expected one of {BACKENDS}")
    _forced = raw or None
    return _forced  # type: ignore[return-value]


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "torch" for tensors like ``t``: the forced backend, else by device."""
    forced = _forced if _forced is not _UNREAD else reload_backend()
    if forced is not None:
        return forced  # type: ignore[return-value]
    return "triton" if t.is_cuda else "torch"


def uses_triton(t: torch.Tensor) -> bool:
    """True when ops on tensors like ``t`` run Triton kernels; readies the interpreter for CPU tensors."""
    if backend_for(t) != "triton":
        return False
    if not t.is_cuda and "triton" not in sys.modules:
        # Kernels on CPU tensors run in Triton's interpreter, which must be chosen before import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return True


def _impl(t: torch.Tensor) -> ModuleType:
    global _triton
    if uses_triton(t):
        if _triton is None:
            from infinite.attention import triton as triton_ops

            _triton = triton_ops
        return _triton
    return torch_ops


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    _impl(k).write_kv(k_cache, v_cache, k, v, slot_mapping)


def micro_attention(q, k_cache, v_cache, meta: MAMetadata, scale: float):
    return _impl(q).micro_attention(q, k_cache, v_cache, meta, scale)


def aggregate(parts):
    if len(parts) == 1:
        return parts[0]
    return _impl(parts[0][0]).aggregate(parts)


aggregate_into = torch_ops.aggregate_into  # in place, over some rows: plain tensor ops on any device


__all__ = ["MAMetadata", "write_kv", "micro_attention", "aggregate", "aggregate_into", "backend_for", "uses_triton",
           "reload_backend", "BACKENDS"]
