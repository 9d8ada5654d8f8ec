"""Timers that measure what the device did, not how long the host took to queue it.

On a GPU a kernel launch returns at once: ``perf_counter`` around a step, a
probe or a served MicroAttention call measures the launches (microseconds),
not the execution. The cost model is fitted from these times, so a timer must
wait for the device's work before it reads the clock. ``device_timer(device)``
picks the right one:

* CPU: ``perf_counter`` (the work is done when the call returns);
* CUDA: two events on the current stream, the second synchronized before
  ``elapsed_time`` is read — the host waits for exactly the work queued
  between ``start()`` and ``elapsed()``, and the time is the device's.

Use::

    timer = device_timer(device)
    timer.start()
    ...                         # queue the work
    seconds = timer.elapsed()   # waits for it

or ``with timer.measure() as m: ...`` then ``m.seconds``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["DeviceTimer", "PerfCounterTimer", "EventTimer", "Measured", "device_timer"]


class Event(Protocol):
    """What EventTimer needs of an event: ``torch.cuda.Event(enable_timing=True)``'s interface."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: Event) -> float: ...  # milliseconds


@dataclass
class Measured:
    seconds: float = 0.0


class DeviceTimer(ABC):
    """``start()`` then ``elapsed()`` (seconds of device work since ``start``, waited for)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def elapsed(self) -> float: ...

    @contextmanager
    def measure(self) -> Iterator[Measured]:
        m = Measured()
        self.start()
        try:
            yield m
        finally:
            m.seconds = self.elapsed()


class PerfCounterTimer(DeviceTimer):
    """A device whose work is done when the call returns (CPU)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = self.clock()

    def elapsed(self) -> float:
        if self._t0 is None:
            raise RuntimeError("elapsed() before start()")
        return self.clock() - self._t0


class EventTimer(DeviceTimer):
    """Device time between two events on the stream; ``elapsed()`` waits for the second one."""

    def __init__(self, make_event: Callable[[], Event]) -> None:
        self.make_event = make_event
        self._start: Event | None = None

    def start(self) -> None:
        self._start = self.make_event()
        self._start.record()

    def elapsed(self) -> float:
        if self._start is None:
            raise RuntimeError("elapsed() before start()")
        end = self.make_event()
        end.record()
        end.synchronize()  # the host waits for the work queued before it
        return self._start.elapsed_time(end) / 1e3


def device_timer(device: torch.device | str) -> DeviceTimer:
    """The timer for work on ``device``: CUDA events on a GPU, perf_counter elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return EventTimer(lambda: _CudaEvent(dev))
    return PerfCounterTimer()


class _CudaEvent:
    """A timing event recorded on ``device``'s current stream (whatever device the thread is on)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.event = torch.cuda.Event(enable_timing=True)

    def record(self) -> None:
        self.event.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.event.synchronize()

    def elapsed_time(self, end: _CudaEvent) -> float:
        return self.event.elapsed_time(end.event)
