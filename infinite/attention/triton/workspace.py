"""Scratch memory of the kernels (split-KV partials), allocated once and reused by every layer and call.

Why not a fresh ``torch.empty`` per call: decode attention runs once per layer
per step, and per-layer allocations cost host time and, under CUDA-graph
capture, would give each captured layer its own partial buffers out of the
graph pool. Why not one buffer per exact shape: outside graphs the number of
decode rows changes every step, and a buffer per shape would pile up. So each
(device, dtype, thread) owns one flat buffer that only grows; a call takes a
view of its first ``numel`` elements.

Graph safety: a buffer is never freed. When a call needs more than the current
buffer holds, a bigger one replaces it for later calls and the old one is kept
alive in ``_RETIRED`` (at most half the live size again: buffers grow at least
2x), because a captured graph may still address it. So a graph captured after
:func:`reserve` (or after its first eager call, which allocates) replays on
memory that stays valid for the life of the process. Call :func:`reserve` with
the largest bucket before capturing, so capture itself allocates nothing.

Reuse across calls is safe because calls from one thread are issued in order
on one CUDA stream: a layer's reduce has consumed the partials before the next
layer's decode kernel overwrites them. Threads (a creditor serving remote
MicroAttention beside the step loop) get their own buffers.
"""

from __future__ import annotations

import threading

import torch

_BUFS: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
_LOCK = threading.Lock()


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat [numel] view of this thread's scratch buffer for (device, dtype); contents undefined."""
    key = (device, dtype, threading.get_ident())
    buf = _BUFS.get(key)
    if buf is None or buf.numel() < numel:
        buf = _grow(key, buf, numel)
    return buf[:numel]


def reserve(device: torch.device, dtype: torch.dtype, numel: int) -> None:
    """Allocate at least ``numel`` elements now (before CUDA-graph capture) for the calling thread."""
    scratch(torch.device(device), dtype, numel)


def _grow(key: tuple[torch.device, torch.dtype, int], old: torch.Tensor | None, numel: int) -> torch.Tensor:
    size = max(numel, 2 * old.numel()) if old is not None else numel
    buf = torch.empty(size, dtype=key[1], device=key[0])
    with _LOCK:
        if old is not None:
            _RETIRED.append(old)
        _BUFS[key] = buf
    return buf


def allocated_bytes() -> int:
    """Bytes held by all scratch buffers, live and retired (for memory accounting)."""
    with _LOCK:
        bufs = list(_BUFS.values()) + list(_RETIRED)
    return sum(b.numel() * b.element_size() for b in bufs)


def decode_partials(device: torch.device, splits: int, rows: int, heads: int, head_dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (out [S, rows, nh, d], lse [S, rows, nh]) float32 of one scratch buffer."""
    n_out = splits * rows * heads * head_dim
    flat = scratch(device, torch.float32, n_out + splits * rows * heads)
    return (flat[:n_out].view(splits, rows, heads, head_dim),
            flat[n_out:].view(splits, rows, heads))


def decode_partials_numel(splits: int, rows: int, heads: int, head_dim: int) -> int:
    """Float32 elements :func:`decode_partials` needs: pass to :func:`reserve` before capture."""
    return splits * rows * heads * (head_dim + 1)
