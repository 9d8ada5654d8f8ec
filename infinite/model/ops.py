"""The model's fused elementwise ops: RMSNorm, residual-add + RMSNorm, RoPE + KV write.

Why: on a GPU the unfused sequences cost ~12 launches per layer (RMSNorm as
cast/norm/cast/mul twice, RoPE as six ops and a cat, two ``.contiguous()``
copies, the KV write), each ~20 us of host dispatch, while the work is a few
microseconds. CUDA tensors run one Triton kernel per op
(``infinite.model.triton_ops``); CPU tensors run the torch twins below, which
are bit-identical to the unfused math of transformers in float32 (the
reference the kernels are tested against). The backend choice is the
attention package's (``INFINITE_ATTENTION_BACKEND`` forces one; read once per
process).

These run about five times per layer per step, so the dispatch does no
validation beyond what the kernels need to be safe: shapes are the caller's
contract, stated in each signature.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from infinite.attention import torch_ops, uses_triton
from infinite.model.rope import apply_rotary

KVWrite = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k_cache, v_cache [N,B,nkv,d], slots [T] int64

_triton: ModuleType | None = None


def _kernels() -> ModuleType:
    global _triton
    if _triton is None:
        from infinite.model import triton_ops

        _triton = triton_ops
    return _triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T,H] -> weight * rmsnorm(x) [T,H]: float32 math, cast back before the weight (transformers)."""
    if uses_triton(x):
        return _kernels().rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add (in the model dtype) fused with the next norm."""
    if uses_triton(x):
        return _kernels().add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def rope_qkv_write(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    cos: torch.Tensor,  # [P, d/2] float32
    sin: torch.Tensor,  # [P, d/2] float32
    positions: torch.Tensor | None,  # [T] int64 rows of cos/sin; None: row t is token t's
    nh: int,
    nkv: int,
    cache: KVWrite | None = None,  # (k_cache, v_cache [N,B,nkv,d], slots [T] int64; slot < 0: skipped)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE (HF rotate_half layout) on q and k; k/v written to their slots -> q [T,nh,d], k, v [T,nkv,d] contiguous.

    ``positions=None`` lets the caller pass per-token tables (one gather per
    step, and dynamic NTK stretches the frequencies per call). k and v come back
    too: the cluster sends the rows of tokens whose slot is remote.
    """
    if uses_triton(qkv):
        return _kernels().rope_qkv_write(qkv, cos, sin, positions, nh, nkv, cache)
    return rope_qkv_write_torch(qkv, cos, sin, positions, nh, nkv, cache)


# ---- torch twins: the unfused math, bit for bit -------------------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm in float32, cast to x.dtype, times the weight (transformers' LlamaRMSNorm)."""
    xf = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    res = x + residual
    return rms_norm_torch(res, weight, eps), res


def rope_qkv_torch(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    cos: torch.Tensor,  # [P, d/2] float32
    sin: torch.Tensor,
    positions: torch.Tensor | None,  # [T] int64 or None (row t)
    nh: int,
    nkv: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE with the tables cast to the model dtype, q and k rotated in one call -> q, k, v contiguous."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (nh + 2 * nkv)
    if positions is not None:
        cos, sin = cos[positions], sin[positions]  # [T, d/2]
    qk = apply_rotary(qkv[:, :(nh + nkv) * d].view(t, nh + nkv, d), cos.to(qkv.dtype), sin.to(qkv.dtype))
    v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d).contiguous()  # [T, nkv, d]
    return qk[:, :nh].contiguous(), qk[:, nh:].contiguous(), v


def rope_qkv_write_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    nh: int,
    nkv: int,
    cache: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rope_qkv_torch`, then ``write_kv`` (which skips slots < 0 with one host sync)."""
    q, k, v = rope_qkv_torch(qkv, cos, sin, positions, nh, nkv)
    if cache is not None:
        k_cache, v_cache, slots = cache
        torch_ops.write_kv(k_cache, v_cache, k, v, slots)
    return q, k, v
