"""The elementwise ops around attention, fused: RMSNorm, residual-add + RMSNorm, RoPE + KV write.

Why: on a GPU the unfused sequences cost ~12 launches per layer (RMSNorm as
cast/norm/cast/mul twice, RoPE as six ops and a cat, two ``.contiguous()``
copies, the KV write), each ~20 us of host dispatch, while the work is a few
microseconds. CUDA tensors run one Triton kernel per op
(``infinite.model.triton_ops``); CPU tensors run the torch twins below, which
are the model's own math (``RMSNorm.forward``, ``apply_rotary``, ``write_kv``)
and give the same bits in float32. The backend choice is the attention
package's (``INFINITE_ATTENTION_BACKEND`` forces one; read once per process).

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

_triton: ModuleType | None = None


def _kernels() -> ModuleType:
    global _triton
    if _triton is None:
        from infinite.model import triton_ops

        _triton = triton_ops
    return _triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T,H], weight [H] -> [T,H]: float32 normalisation, cast back to x.dtype before the weight."""
    if uses_triton(x):
        return _kernels().rms_norm(x, weight, eps)
    return rms_norm_torch(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T,H], weight [H] -> (rms_norm(x + residual) [T,H], x + residual [T,H]).

    The sum is taken in the model dtype, as the unfused ``h = h + o_proj(...)`` does.
    """
    if uses_triton(x):
        return _kernels().add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def rope_qkv_write(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    cos: torch.Tensor,  # [P, d/2] float32
    sin: torch.Tensor,  # [P, d/2] float32
    positions: torch.Tensor | None,  # [T] int64 rows of cos/sin; None: row t for token t
    nh: int,
    nkv: int,
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    slot_mapping: torch.Tensor,  # [T] int64; < 0: no cache write for that token
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE (HF rotate_half) on q and k, k/v written to their cache slots -> contiguous q [T,nh,d], k, v [T,nkv,d].

    ``positions=None`` lets the caller pass per-token tables (dynamic NTK
    stretches the frequencies per call). k and v come back too: the cluster
    sends the rows of tokens whose slot is remote.
    """
    if uses_triton(qkv):
        return _kernels().rope_qkv_write(qkv, cos, sin, positions, nh, nkv, k_cache, v_cache, slot_mapping)
    return rope_qkv_write_torch(qkv, cos, sin, positions, nh, nkv, k_cache, v_cache, slot_mapping)


# ---- torch twins: the model's unfused math, bit for bit ----------------------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm.forward``: F.rms_norm in float32, cast to x.dtype, times the weight."""
    xf = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    h = residual + x
    return rms_norm_torch(h, weight, eps), h


def rope_qkv_torch(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d]
    cos: torch.Tensor,  # [P, d/2] float32
    sin: torch.Tensor,
    positions: torch.Tensor | None,  # [T] int64 or None (row t)
    nh: int,
    nkv: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pre_attention``'s RoPE: tables cast to the model dtype, q and k rotated in one call -> q, k, v contiguous."""
    t = qkv.shape[0]
    qk = qkv[:, :(nh + nkv) * head_dim].view(t, nh + nkv, head_dim)  # [T, nh+nkv, d]
    v = qkv[:, (nh + nkv) * head_dim:].reshape(t, nkv, head_dim).contiguous()  # [T, nkv, d]
    if positions is not None:
        cos, sin = cos[positions], sin[positions]  # [T, d/2]
    qk = apply_rotary(qk, cos.to(qkv.dtype), sin.to(qkv.dtype))
    return qk[:, :nh].contiguous(), qk[:, nh:].contiguous(), v


def rope_qkv_write_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    nh: int,
    nkv: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rope_qkv_torch` + ``write_kv`` of the tokens with a slot here (one host sync for the check)."""
    q, k, v = rope_qkv_torch(qkv, cos, sin, positions, nh, nkv, k_cache.shape[-1])
    keep = slot_mapping >= 0
    if bool(keep.all()):
        torch_ops.write_kv(k_cache, v_cache, k, v, slot_mapping)
    else:  # tokens whose slot is elsewhere (a creditor's) are not written here
        idx = keep.nonzero().squeeze(1)
        torch_ops.write_kv(k_cache, v_cache, k[idx], v[idx], slot_mapping[idx])
    return q, k, v
