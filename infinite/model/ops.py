"""The model's fused elementwise ops: RMSNorm, residual-add + RMSNorm, RoPE + KV write.

CUDA tensors run the Triton kernels (``infinite.model.triton_ops``), CPU tensors
the torch twins below, which are bit-identical to the unfused math of
transformers in float32 (the reference the kernels are tested against).
``INFINITE_ATTENTION_BACKEND`` forces one backend for the whole engine, as for
attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infinite.attention import backend_for
from infinite.model.rope import apply_rotary


def _triton(t: torch.Tensor) -> bool:
    return backend_for(t) == "triton"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T,H] -> weight * rmsnorm(x) [T,H]: float32 math, cast back before the weight (transformers)."""
    if _triton(x):
        from infinite.model import triton_ops

        return triton_ops.rms_norm(x, weight, eps)
    xf = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused with the next norm."""
    if _triton(x):
        from infinite.model import triton_ops

        return triton_ops.add_rms_norm(x, residual, weight, eps)
    res = x + residual
    return rms_norm(res, weight, eps), res


def rope_qkv_write(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    cos: torch.Tensor,  # [P, d/2] float32
    sin: torch.Tensor,  # [P, d/2] float32
    positions: torch.Tensor | None,  # [T] int64 rows of cos/sin; None: row t is token t's
    nh: int,
    nkv: int,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # k_cache, v_cache [N,B,nkv,d], slots [T]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE (HF rotate_half layout) on q and k; k/v written to their slots (slot < 0: skipped).

    -> q [T,nh,d], k [T,nkv,d], v [T,nkv,d], contiguous."""
    if _triton(qkv):
        from infinite.model import triton_ops

        return triton_ops.rope_qkv_write(qkv, cos, sin, positions, nh, nkv, cache)
    t = qkv.shape[0]
    d = qkv.shape[1] // (nh + 2 * nkv)
    if positions is not None:
        cos, sin = cos[positions], sin[positions]
    qk = apply_rotary(qkv[:, : (nh + nkv) * d].view(t, nh + nkv, d), cos.to(qkv.dtype), sin.to(qkv.dtype))
    q, k = qk[:, :nh], qk[:, nh:].contiguous()
    v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d).contiguous()
    if cache is not None:
        from infinite.attention import write_kv

        k_cache, v_cache, slots = cache
        write_kv(k_cache, v_cache, k, v, slots)
    return q.contiguous(), k, v
