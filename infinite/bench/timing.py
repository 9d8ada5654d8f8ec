"""How the benches time one call on a device: CUDA events, CUDA graphs for short calls, a CPU clock.

A short kernel launched eagerly is timed as much by the host (Python, ATen
dispatch, the launch) as by the GPU; the engine replays decode steps as CUDA
graphs, where only the GPU time counts. So a call whose eager time is under
``GRAPH_BELOW_S`` is timed inside a CUDA graph of several calls, and says so
(``method="graph"``); longer calls are timed eagerly between CUDA events
(``method="events"``), where launch overhead is noise. ``time_call(...,
method=...)`` forces one, e.g. to show both sides of a fusion.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

GRAPH_BELOW_S = 100e-6
_TARGET_S = 0.02  # each timed sample covers about this much time


@dataclass(frozen=True)
class Timing:
    seconds: float  # per call, median of the samples
    method: str  # "graph" | "events" | "cpu"


def time_call(fn: Callable[[], object], device: torch.device, method: str | None = None,
              samples: int = 5) -> Timing:
    """Seconds per call of ``fn`` on ``device``; ``method`` None picks graph/events by the call's length."""
    if device.type != "cuda":
        return Timing(_cpu(fn, samples), "cpu")
    eager = _events(fn, samples)
    if method == "events" or (method is None and eager >= GRAPH_BELOW_S):
        return Timing(eager, "events")
    try:
        return Timing(_graph(fn, eager, samples), "graph")
    except RuntimeError:  # not capturable (a host sync inside): the eager figure stands
        if method == "graph":
            raise
        return Timing(eager, "events")


def _cpu(fn: Callable[[], object], samples: int) -> float:
    fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _events(fn: Callable[[], object], samples: int) -> float:
    """Back-to-back eager calls between two events: the host's launch rate bounds short calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    n = max(1, min(1000, int(_TARGET_S / max(start.elapsed_time(end) * 1e-3, 1e-7))))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / n)
    return statistics.median(times)


def _graph(fn: Callable[[], object], eager_s: float, samples: int) -> float:
    """``inner`` calls captured in one graph, replayed between events: the GPU's time per call."""
    inner = max(1, min(100, int(_TARGET_S / max(eager_s, 1e-6) / 10)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (10 * inner))
    del graph
    return statistics.median(times)
