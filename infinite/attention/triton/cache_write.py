"""Fused KV-cache write: new K and V rows into their slots in one launch.

Grid ``(T,)``: a program copies the ``[nkv, d]`` key and value rows of one token
to slot ``slot_mapping[t] = block * B + offset`` of both caches, casting to the
cache dtype. A negative slot is skipped (padding tokens of a fixed-size batch);
the torch path has no such slots and would raise on them.
"""

from __future__ import annotations

import torch
import triton.language as tl

from infinite.attention.triton._jit import kernel, next_pow2


@kernel
def _write_kv_kernel(
    KC, VC, K, V, SLOT,
    stride_kcn, stride_kcb, stride_kch, stride_kcd,
    stride_vcn, stride_vcb, stride_vch, stride_vcd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    NKV: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOT + t).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    offs_h = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, BLOCK_D)
    # slot < 0 masks every head (one comparison: the interpreter turns `bool & bool_scalar` into int32).
    heads = tl.where(slot >= 0, NKV, 0)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HEAD_D)  # [BLOCK_KV, BLOCK_D]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(
        KC + blk * stride_kcn + off * stride_kcb + offs_h[:, None] * stride_kch + offs_d[None, :] * stride_kcd,
        k.to(KC.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        VC + blk * stride_vcn + off * stride_vcb + offs_h[:, None] * stride_vch + offs_d[None, :] * stride_vcd,
        v.to(VC.dtype.element_ty),
        mask=mask,
    )


def write_kv(
    k_cache: torch.Tensor,  # [N, B, nkv, d]
    v_cache: torch.Tensor,  # [N, B, nkv, d]
    k: torch.Tensor,  # [T, nkv, d]
    v: torch.Tensor,  # [T, nkv, d]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block * B + offset (< 0: skip)
) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [N,B,nkv,d], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    _, page, nkv, d = k_cache.shape
    t = k.shape[0]
    if k.shape != (t, nkv, d) or v.shape != k.shape:
        raise ValueError(f"k/v must be [T,{nkv},{d}], got {tuple(k.shape)}, {tuple(v.shape)}")
    if slot_mapping.shape != (t,):
        raise ValueError(f"slot_mapping must be [{t}], got {tuple(slot_mapping.shape)}")
    if t == 0:
        return
    _write_kv_kernel.on(k.device)[(t,)](
        k_cache, v_cache, k, v, slot_mapping,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        NKV=nkv, HEAD_D=d, PAGE=page,
        BLOCK_KV=next_pow2(nkv), BLOCK_D=next_pow2(d),
    )
