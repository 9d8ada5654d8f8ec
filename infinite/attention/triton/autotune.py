"""Time the tile candidates of a kernel on the current GPU and cache the winner for the device.

Why a tuner on top of the table (``tiles.py``): the best tile of a gather-based
paged kernel depends on the part (SM count, shared memory, L2) in ways a table
of two generations only approximates. Run it once per machine:

    python -m infinite.bench kernels --autotune     # decode and prefill at the bench's shape

Each candidate is first checked against the table tile's output on the same
inputs (a tile that miscompiles or fails to launch, e.g. out of shared memory,
is rejected, never cached), then timed; the fastest is written to the cache
file under the device's name and used by every later process on that device.
On CPU (tests) the kernels run under the interpreter with an injected timer.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from infinite.attention.metadata import MAMetadata
from infinite.attention.triton._jit import capability_major, device_name
from infinite.attention.triton.decode import decode_attention
from infinite.attention.triton.prefill import prefill_attention
from infinite.attention.triton.tiles import (DecodeTile, PrefillTile, Tile, cache_path, save_tuned, table_tile,
                                             tuned_key)

Timer = Callable[[Callable[[], object]], float]  # seconds per call


def decode_candidates(head_dim: int, dtype: torch.dtype) -> list[DecodeTile]:
    """Key tiles x warps x pipeline depths worth trying; float32 and wide heads skip the largest tile."""
    wide = head_dim > 128 or dtype == torch.float32
    return [DecodeTile(n, w, s) for n, w, s in itertools.product((32, 64) if wide else (32, 64, 128), (4, 8),
                                                                   (2, 3, 4))]


def prefill_candidates(head_dim: int, dtype: torch.dtype) -> list[PrefillTile]:
    wide = head_dim > 128 or dtype == torch.float32
    return [PrefillTile(m, n, w, s) for m, n, w, s in itertools.product(
        (64, 128), (32, 64) if wide else (32, 64, 128), (4, 8), (2, 3))]


@dataclass
class TuneResult:
    kind: str
    key: str  # the cache file's key
    device: str
    table: Tile  # the table's tile for this device
    winner: Tile
    seconds: dict[Tile, float] = field(default_factory=dict)  # every candidate that ran correctly
    rejected: dict[Tile, str] = field(default_factory=dict)  # why the others were not timed

    @property
    def speedup(self) -> float:
        """Table tile's time over the winner's (>= 1; the table tile is always a candidate)."""
        return self.seconds[self.table] / self.seconds[self.winner]


def gpu_timer(fn: Callable[[], object]) -> float:
    """CUDA-event timing of ``fn`` (``triton.testing.do_bench``: warm-up, L2 flushed, median)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3


def cpu_timer(fn: Callable[[], object]) -> float:
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _paged(num_reqs: int, context: int, nkv: int, head_dim: int, page: int, dtype: torch.dtype,
           device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches holding ``num_reqs`` requests of ``context`` keys in shuffled blocks, and the tables."""
    per = -(-context // page)
    k = torch.randn(num_reqs * per, page, nkv, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(num_reqs * per, page, nkv, head_dim, generator=gen, device=device).to(dtype)
    tables = torch.randperm(num_reqs * per, generator=gen, device=device).view(num_reqs, per)
    return k, v, tables


def decode_problem(batch: int, context: int, nh: int, nkv: int, head_dim: int, page: int, dtype: torch.dtype,
                   device: torch.device, seed: int = 0):
    """A decode batch of ``batch`` requests at ``context`` keys: (q, k_cache, v_cache, meta)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k, v, tables = _paged(batch, context, nkv, head_dim, page, dtype, device, gen)
    meta = MAMetadata.build([1] * batch, [context - 1] * batch, tables.tolist(), device=device)
    q = torch.randn(batch, nh, head_dim, generator=gen, device=device).to(dtype)
    return q, k, v, meta


def prefill_problem(tokens: int, nh: int, nkv: int, head_dim: int, page: int, dtype: torch.dtype,
                    device: torch.device, seed: int = 0):
    """One causal prompt of ``tokens`` tokens already written to the cache: (q, k_cache, v_cache, meta)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k, v, tables = _paged(1, tokens, nkv, head_dim, page, dtype, device, gen)
    meta = MAMetadata.build([tokens], [0], tables.tolist(), device=device)
    q = torch.randn(tokens, nh, head_dim, generator=gen, device=device).to(dtype)
    return q, k, v, meta


def autotune(
    kind: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: MAMetadata,
    *,
    candidates: list[Tile] | None = None,
    timer: Timer | None = None,
    save: bool = True,
) -> TuneResult:
    """Tune ``kind`` ("decode" or "prefill") on this problem; cache the winner unless ``save=False``."""
    d, dtype, device = q.shape[2], q.dtype, q.device
    scale = d ** -0.5
    if kind == "decode":
        run = lambda tile: decode_attention(q, k_cache, v_cache, meta, scale, meta.num_splits, tile=tile)  # noqa: E731
        cands = candidates or decode_candidates(d, dtype)
    elif kind == "prefill":
        run = lambda tile: prefill_attention(q, k_cache, v_cache, meta, scale, tile=tile)  # noqa: E731
        cands = candidates or prefill_candidates(d, dtype)
    else:
        raise ValueError(f"kind must be 'decode' or 'prefill', got {kind!r}")
    timer = timer or (gpu_timer if device.type == "cuda" else cpu_timer)
    table = table_tile(kind, capability_major(device), d, dtype)
    ref_out, ref_lse = run(table)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    result = TuneResult(kind, tuned_key(kind, d, dtype), device_name(device), table, table)
    for tile in dict.fromkeys([table, *cands]):  # the table tile first, no duplicates
        try:
            out, lse = run(tile)
        except Exception as e:  # a tile the part cannot run (shared memory, registers): not a winner
            result.rejected[tile] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            continue
        err = _max_rel_err(out, ref_out, lse, ref_lse)
        if not err <= tol:
            result.rejected[tile] = f"differs from the table tile's output by {err:.3g}"
            continue
        result.seconds[tile] = timer(lambda: run(tile))
    result.winner = min(result.seconds, key=result.seconds.__getitem__)
    if save:
        save_tuned(cache_path(), result.device, result.key, result.winner)
    return result


def _max_rel_err(out: torch.Tensor, ref: torch.Tensor, lse: torch.Tensor, ref_lse: torch.Tensor) -> float:
    finite = torch.isfinite(ref_lse)
    if not torch.equal(finite, torch.isfinite(lse)):
        return math.inf
    scale = ref.float().abs().max().clamp_min(1e-6)
    return max(((out.float() - ref.float()).abs().max() / scale).item(),
               ((lse - ref_lse)[finite].abs().max().item() if finite.any() else 0.0))
