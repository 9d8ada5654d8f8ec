"""One Triton kernel body, compiled for CUDA tensors and interpreted for CPU tensors.

Triton decides between its compiler and its interpreter when ``@triton.jit``
runs, from ``TRITON_INTERPRET``; that includes the decorators of its own
``triton.language`` helpers (``tl.max``, ``tl.sum``, ``tl.zeros`` are
``@jit`` functions decorated when ``triton`` is first imported). Hence the one
hard requirement of the interpreter: ``TRITON_INTERPRET=1`` must be in the
environment before anything imports ``triton``. Under it, CPU tensors work
directly (bf16 included: the interpreter emulates it on numpy float32).

This wrapper decorates kernel bodies on first use, for the device of the
tensors: CPU tensors get the interpreter, CUDA tensors the compiler (unless
``TRITON_INTERPRET=1``, where Triton interprets them too). On CPU without the
interpreter it raises a clear error instead of Triton's "0 active drivers".
Kernel bodies must not call ``@triton.jit`` helpers of their own, so they stay
valid whichever mode they are wrapped in.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import triton


class Kernel:
    """A kernel body wrapped on first use for the device of its tensors."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def on(self, device: torch.device) -> Any:
        """The launchable kernel (``kernel[grid](...)``) for tensors on ``device``."""
        if device.type == "cpu":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                if not interpreter_ready():
                    raise RuntimeError(
                        "Triton kernels on CPU tensors run under the Triton interpreter, which needs "
                        "TRITON_INTERPRET=1 in the environment before `triton` is first imported"
                    )
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled


def interpreter_ready() -> bool:
    """True when triton.language was imported in interpreter mode (its helpers are interpretable)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.max, InterpretedFunction)


def kernel(fn: Callable[..., None]) -> Kernel:
    """Decorator: ``@kernel`` in place of ``@triton.jit`` (see module docstring)."""
    return Kernel(fn)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU (interpreter runs programs one by one).

    Cached per device: ``get_device_properties`` costs microseconds and the
    decode heuristic asks on every call.
    """
    if device.type != "cuda":
        return 1
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[0]


def capability_major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (9: Hopper, 8: Ampere/Ada); 0 for CPU. Cached."""
    if device.type != "cuda":
        return 0
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[1]


def device_name(device: torch.device) -> str:
    """The device's marketing name ("NVIDIA H200"), "cpu" for CPU. Cached."""
    if device.type != "cuda":
        return "cpu"
    return _device_facts(device.index if device.index is not None else torch.cuda.current_device())[2]


@functools.cache
def _device_facts(index: int) -> tuple[int, int, str]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major, props.name


_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dot_dtype(dtype: torch.dtype, device: torch.device):
    """Operand dtype of the kernels' ``tl.dot``s: the storage dtype on GPU (tensor cores).

    Under the interpreter ``tl.dot`` of bf16 operands is wrong (it multiplies the raw
    bits; Triton 3.9), so CPU runs cast the operands, already rounded to the storage
    dtype, to float32 first: the same products, accumulated in float32 as on GPU.
    """
    import triton.language as tl

    if dtype not in _TL_DTYPES:
        raise TypeError(f"attention kernels support float32, bfloat16 and float16, got {dtype}")
    return tl.float32 if device.type == "cpu" else getattr(tl, _TL_DTYPES[dtype])


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs use exact IEEE dots (TF32 would cost ~1e-3 relative error); others ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
