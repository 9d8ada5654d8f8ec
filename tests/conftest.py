"""Test-wide settings: small thread counts (2-core CI), Triton's interpreter for kernel tests."""

import os

# Kernel tests run Triton on CPU tensors; the interpreter must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
