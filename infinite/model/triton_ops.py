"""Triton kernels of ``infinite.model.ops``: one launch per RMSNorm, residual-add + RMSNorm, RoPE + KV write.

Each kernel handles one token per program (``grid (T,)``) with the whole row
in registers: rows are at most a few thousand elements (H up to 8K, heads x d
up to 8K), and decode steps have few tokens, so one program per token keeps the
launch a single wave without a reduction across programs. Math is in float32
and each output is rounded once to its dtype (the torch twins round after every
op in the model dtype; in float32 both agree to rounding, not bit for bit,
because the kernels reduce in another order and may fuse multiply-adds).

Like the attention kernels, bodies go through ``_jit.kernel``: compiled for
CUDA tensors, interpreted for CPU tensors (tests run them under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton.language as tl

from infinite.attention.triton._jit import kernel, next_pow2


@kernel
def _rms_norm_kernel(
    X, R, W, Y, H_OUT,
    n_cols, eps,
    stride_x, stride_r, stride_y, stride_h,
    BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X + t * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + t * stride_r + offs, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(H_OUT.dtype.element_ty)  # the model-dtype sum
        tl.store(H_OUT + t * stride_h + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(Y.dtype.element_ty)  # cast back before the weight, as RMSNorm.forward
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Y + t * stride_y + offs, (w.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


@kernel
def _rope_qkv_kernel(
    QKV, COS, SIN, POS, QO, KO, VO, KC, VC, SLOT,
    stride_t, stride_cos, stride_sin,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcn, stride_kcb, stride_kch, stride_vcn, stride_vcb, stride_vch,
    NH: tl.constexpr, NKV: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_CACHE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_D // 2
    if HAS_POS:
        p = tl.load(POS + t)
    else:
        p = t
    offs_f = tl.arange(0, BLOCK_HALF)
    f_mask = offs_f < HALF
    c = tl.load(COS + p * stride_cos + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]  # [1, HALF]
    s = tl.load(SIN + p * stride_sin + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    row = QKV + t * stride_t

    # q heads: rotate, round once to the output dtype.
    hq = tl.arange(0, BLOCK_QH)
    mq = (hq[:, None] < NH) & f_mask[None, :]
    src = row + hq[:, None] * HEAD_D + offs_f[None, :]
    x1 = tl.load(src, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mq, other=0.0).to(tl.float32)
    dst = QO + t * stride_qt + hq[:, None] * stride_qh + offs_f[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(QO.dtype.element_ty), mask=mq)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(QO.dtype.element_ty), mask=mq)

    # k heads: rotate; v heads: copy. Both to the returned rows and, with a slot here, to the cache.
    hk = tl.arange(0, BLOCK_KH)
    mk = (hk[:, None] < NKV) & f_mask[None, :]
    src = row + (NH + hk[:, None]) * HEAD_D + offs_f[None, :]
    x1 = tl.load(src, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mk, other=0.0).to(tl.float32)
    k1 = (x1 * c - x2 * s).to(KO.dtype.element_ty)
    k2 = (x2 * c + x1 * s).to(KO.dtype.element_ty)
    dst = KO + t * stride_kt + hk[:, None] * stride_kh + offs_f[None, :]
    tl.store(dst, k1, mask=mk)
    tl.store(dst + HALF, k2, mask=mk)
    src = row + (NH + NKV + hk[:, None]) * HEAD_D + offs_f[None, :]
    v1 = tl.load(src, mask=mk, other=0.0).to(VO.dtype.element_ty)
    v2 = tl.load(src + HALF, mask=mk, other=0.0).to(VO.dtype.element_ty)
    dst = VO + t * stride_vt + hk[:, None] * stride_vh + offs_f[None, :]
    tl.store(dst, v1, mask=mk)
    tl.store(dst + HALF, v2, mask=mk)

    if HAS_CACHE:
        slot = tl.load(SLOT + t).to(tl.int64)
        blk = slot // PAGE
        off = slot % PAGE
        # slot < 0 masks every head (one comparison: the interpreter turns `bool & bool_scalar` into int32).
        mc = (hk[:, None] < tl.where(slot >= 0, NKV, 0)) & f_mask[None, :]
        cdst = KC + blk * stride_kcn + off * stride_kcb + hk[:, None] * stride_kch + offs_f[None, :]
        tl.store(cdst, k1.to(KC.dtype.element_ty), mask=mc)
        tl.store(cdst + HALF, k2.to(KC.dtype.element_ty), mask=mc)
        cdst = VC + blk * stride_vcn + off * stride_vcb + hk[:, None] * stride_vch + offs_f[None, :]
        tl.store(cdst, v1.to(VC.dtype.element_ty), mask=mc)
        tl.store(cdst + HALF, v2.to(VC.dtype.element_ty), mask=mc)


def _warps(block: int) -> int:
    """About 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, block // 512))


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    t, h = x.shape
    y = torch.empty_like(x)
    h_out = torch.empty_like(x) if residual is not None else None
    if t == 0:
        return y, h_out
    block = next_pow2(h)
    r = residual if residual is not None else x
    ho = h_out if h_out is not None else y
    _rms_norm_kernel.on(x.device)[(t,)](
        x, r, weight, y, ho,
        h, eps,
        x.stride(0), r.stride(0), y.stride(0), ho.stride(0),
        BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=_warps(block),
    )
    return y, h_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T,H] (last dim contiguous), weight [H] -> [T,H] in x.dtype."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [T,H] -> (rms_norm(x + residual) [T,H], x + residual [T,H])."""
    y, h = _norm(x, residual, weight, eps)
    return y, h  # type: ignore[return-value]


def rope_qkv_write(
    qkv: torch.Tensor,  # [T, (nh + 2 nkv) d], last dim contiguous
    cos: torch.Tensor,  # [P, d/2] float32, last dim contiguous
    sin: torch.Tensor,  # [P, d/2] float32
    positions: torch.Tensor | None,  # [T] int64 (rows of cos/sin must exist: not checked here); None: row t
    nh: int,
    nkv: int,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # k/v caches [N,B,nkv,d], slots [T]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on q and k, k/v to their slots (slot < 0: skipped) -> q [T,nh,d], k, v [T,nkv,d] contiguous."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (nh + 2 * nkv)
    q = torch.empty(t, nh, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, nkv, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(t, nkv, d, dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q, k, v
    if cache is not None:
        k_cache, v_cache, slots = cache
        page = k_cache.shape[1]
    else:  # unused pointers and strides
        k_cache, v_cache, slots, page = k, v, qkv, 1
    kcs = k_cache.stride()
    vcs = v_cache.stride()
    block_half = max(1, next_pow2(d // 2))
    _rope_qkv_kernel.on(qkv.device)[(t,)](
        qkv, cos, sin, positions if positions is not None else qkv, q, k, v, k_cache, v_cache, slots,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kcs[0], kcs[1], kcs[2], vcs[0], vcs[1], vcs[2],
        NH=nh, NKV=nkv, HEAD_D=d, PAGE=page,
        BLOCK_QH=next_pow2(nh), BLOCK_KH=next_pow2(nkv), BLOCK_HALF=block_half,
        HAS_POS=positions is not None, HAS_CACHE=cache is not None,
        num_warps=_warps(next_pow2(nh) * block_half * 2),
    )
    return q, k, v
