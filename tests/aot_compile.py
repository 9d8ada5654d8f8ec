"""Compile every Triton kernel launch of the project for a GPU target, without a GPU.

The interpreter tests check what the kernels compute; they cannot see what only
the compiler rejects (types that differ between the branches of an ``if``, a
``while`` the code generator cannot lower, register or shared-memory limits).
This script runs the host wrappers on small CPU tensors with every kernel's
launch captured instead of executed, then compiles each captured launch (its
real argument types, constexprs, warps and stages) to a cubin for the given
targets with ``triton.compile``, and prints each one's shared memory and
register spills (local-memory stores in the PTX). Usage:
``python tests/aot_compile.py [--quick] 90 80`` (all shapes, dtypes and
generations' tiles take about two minutes on 2 cores; ``--quick``, the test's
subset, about 15 s).

It must run without ``TRITON_INTERPRET`` (the interpreter swaps Triton's own
helpers for interpreted ones), so tests call it in a subprocess.
"""

from __future__ import annotations

import os
import sys
import time

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from infinite.attention.triton import _jit  # noqa: E402

LAUNCHES: list[tuple[object, tuple, dict]] = []


class _Capture:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            LAUNCHES.append((self.fn, args, kwargs))

        return launch


def _on(self, device):
    return _Capture(self.fn)


def _dot_dtype(dtype, device):
    import triton.language as tl

    return getattr(tl, str(dtype).removeprefix("torch."))  # the GPU's choice: the storage dtype


SHAPES = ((32, 8, 128), (8, 8, 64), (16, 2, 256))  # (nh, nkv, d)


def capture_all(shapes=SHAPES, dtypes=(torch.bfloat16, torch.float32), generations=(9, 8, 0)) -> None:
    """Run each wrapper with the shapes and dtypes the engine uses; launches are recorded, not run."""
    from infinite.attention.metadata import MAMetadata
    from infinite.attention.triton import aggregate, decode, micro_attention, prefill, write_kv
    from infinite.attention.triton.tiles import TABLE
    from infinite.model import triton_ops

    decode.dot_dtype = prefill.dot_dtype = _dot_dtype
    for dtype in dtypes:
        for nh, nkv, d in shapes:
            kc = torch.zeros(8, 16, nkv, d, dtype=dtype)
            q = torch.zeros(3, nh, d, dtype=dtype)
            dec = MAMetadata.build([1, 1, 1], [3, 20, 40], [[0], [1, 2], [3, 4, 5]])
            mixed = MAMetadata.build([1, 4, 1], [3, 20, 40], [[0], [1, 2], [3, 4, 5]], [[0], [1, 2], [0, 1, 2]])
            qm = torch.zeros(6, nh, d, dtype=dtype)
            for cc in generations:
                tile_d = TABLE["decode", cc, min(256, max(64, d)), str(dtype).removeprefix("torch.")]
                tile_p = TABLE["prefill", cc, min(256, max(64, d)), str(dtype).removeprefix("torch.")]
                for s in (1, 4):
                    decode.decode_attention(q, kc, kc, dec, 0.1, s, tile=tile_d)
                prefill.prefill_attention(qm, kc, kc, mixed, 0.1, tile=tile_p)
                prefill.prefill_attention(qm, kc, kc, mixed, 0.1, rows=mixed.prefill_rows,
                                          max_q_len=mixed.max_prefill_q_len, tile=tile_p)
                decode.decode_attention(qm, kc, kc, mixed, 0.1, 2, rows=mixed.decode_rows, tile=tile_d)
            micro_attention(qm, kc, kc, mixed, 0.1)
            aggregate([(q, torch.zeros(3, nh)), (q, torch.zeros(3, nh))])
            write_kv(kc, kc, torch.zeros(3, nkv, d, dtype=dtype), torch.zeros(3, nkv, d, dtype=dtype),
                     torch.zeros(3, dtype=torch.int64))
            x = torch.zeros(2, 4096, dtype=dtype)
            w = torch.zeros(4096, dtype=dtype)
            triton_ops.rms_norm(x, w, 1e-5)
            triton_ops.add_rms_norm(x, x, w, 1e-5)
            qkv = torch.zeros(2, (nh + 2 * nkv) * d, dtype=dtype)
            tab = torch.zeros(64, d // 2)
            pos = torch.zeros(2, dtype=torch.int64)
            triton_ops.rope_qkv_write(qkv, tab, tab, pos, nh, nkv, (kc, kc, pos))
            triton_ops.rope_qkv_write(qkv, tab, tab, None, nh, nkv, (kc, kc, pos))
            triton_ops.rope_qkv_write(qkv, tab, tab, None, nh, nkv)


def source(fn, args: tuple, kwargs: dict) -> tuple[ASTSource, dict]:
    """The ASTSource a GPU launch with these arguments compiles: Triton's own specialization of each
    argument (ints equal to 1 become constants, pointers and ints divisible by 16 say so), which
    decides vector widths and which loads the pipeliner can make asynchronous."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    jit = triton.jit(fn)
    names = jit.arg_names
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, list(args) + [kwargs[n] for n in names[len(args):]])):
        if name in kwargs or jit.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = key
        elif isinstance(key, str) and key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return ASTSource(jit, signature, constexprs, attrs), options


def main(targets: list[int], quick: bool) -> int:
    _jit.Kernel.on = _on
    if quick:  # every kernel body and flag combination once, at the Llama-3-8B shape with Hopper tiles
        capture_all(SHAPES[:1], (torch.bfloat16,), (9,))
    else:
        capture_all()
    seen = set()
    t0 = time.perf_counter()
    n = 0
    for fn, args, kwargs in LAUNCHES:
        src, options = source(fn, args, dict(kwargs))
        key = (fn.__name__, tuple(sorted(src.signature.items())), tuple(sorted(map(str, src.constants.items()))),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        for cc in targets:
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
            assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin for sm_{cc}"
            spills = compiled.asm["ptx"].count("st.local")  # registers spilled to local memory
            print(f"sm_{cc} {fn.__name__} {options} smem={compiled.metadata.shared} local-stores={spills}")
            n += 1
    print(f"compiled {n} kernels in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(main([int(a) for a in argv if a != "--quick"] or [90], "--quick" in argv))
