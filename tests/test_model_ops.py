"""infinite.model.ops: the torch twins equal transformers' math bit for bit (float32), and the Triton
kernels (interpreted on CPU) equal the twins to rounding, against a float64 reference too."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import infinite.attention as attention  # noqa: E402
from infinite.attention import torch_ops  # noqa: E402
from infinite.model import ops, triton_ops  # noqa: E402

torch.set_num_threads(1)

# Kernel rounding: float32 kernels differ from the twins by reduction order / fused multiply-adds;
# in bf16 the interpreter rounds by truncation (the GPU rounds to nearest) and the twins round after
# every op, so kernel and twin may each be 1-2 ulps (2^-7 relative each) off the exact value.
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}


def test_torch_twins_equal_transformers_math_bit_for_bit():
    """float32: the twins give transformers' LlamaRMSNorm and rotate_half RoPE bit for bit, and write
    exactly the rotated k / the v rows into the kept slots."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    gen = torch.Generator().manual_seed(0)
    t, hid, nh, nkv, d, eps = 9, 96, 6, 2, 16, 1e-6
    hf_norm = LlamaRMSNorm(hid, eps)
    with torch.no_grad():
        hf_norm.weight.copy_(torch.rand(hid, generator=gen) + 0.5)
    w = hf_norm.weight.detach()
    x = torch.randn(t, hid, generator=gen) * 3
    res = torch.randn(t, hid, generator=gen)
    assert torch.equal(ops.rms_norm(x, w, eps), hf_norm(x))
    normed, h = ops.add_rms_norm(x, res, w, eps)
    assert torch.equal(h, res + x) and torch.equal(normed, hf_norm(res + x))

    qkv, cos, sin, pos, slots, kc, vc = _rope_inputs(t, nh, nkv, d, torch.float32, gen)
    q, k, v = ops.rope_qkv_write(qkv, cos, sin, pos, nh, nkv, (kc, vc, slots))
    c, s = torch.cat((cos[pos], cos[pos]), -1)[:, None], torch.cat((sin[pos], sin[pos]), -1)[:, None]  # [T,1,d]
    x3 = qkv.view(t, nh + 2 * nkv, d)
    hf = x3[:, :nh + nkv] * c + rotate_half(x3[:, :nh + nkv]) * s
    assert torch.equal(q, hf[:, :nh]) and torch.equal(k, hf[:, nh:]) and torch.equal(v, x3[:, nh + nkv:])
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    keep = slots >= 0
    ref_kc, ref_vc = torch.zeros_like(kc), torch.zeros_like(vc)
    ref_kc.view(-1, nkv, d)[slots[keep]] = k[keep]
    ref_vc.view(-1, nkv, d)[slots[keep]] = v[keep]
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
    # Without a cache: the same q/k/v, nothing written.
    kc.zero_()
    q2, k2, v2 = ops.rope_qkv_write(qkv, cos, sin, pos, nh, nkv)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v) and not kc.any()


def _rope_inputs(t, nh, nkv, d, dtype, gen, nblk=8, bsz=4):
    qkv = (torch.randn(t, (nh + 2 * nkv) * d, generator=gen) * 2).to(dtype)
    p = 64
    freqs = torch.arange(p, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, d, 2) / d))[None, :]
    cos, sin = freqs.cos(), freqs.sin()  # [P, d/2] float32
    pos = torch.randint(0, p, (t,), generator=gen)
    slots = torch.randperm(nblk * bsz, generator=gen)[:t]
    slots[::3] = -1  # some tokens' slots live elsewhere
    kc = torch.zeros(nblk, bsz, nkv, d, dtype=dtype)
    return qkv, cos, sin, pos, slots, kc, kc.clone()


def _rope_f64(qkv, cos, sin, pos, nh, nkv):
    """q, k, v in float64 from the stored qkv values and the float32 tables."""
    return ops.rope_qkv_torch(qkv.double(), cos.double(), sin.double(), pos, nh, nkv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh,nkv,d", [(4, 2, 16), (6, 1, 8), (8, 8, 64)])
def test_rope_kernel_matches_twin_and_float64(dtype, nh, nkv, d):
    gen = torch.Generator().manual_seed(nh * 100 + d)
    qkv, cos, sin, pos, slots, kc, vc = _rope_inputs(7, nh, nkv, d, dtype, gen)
    q, k, v = triton_ops.rope_qkv_write(qkv, cos, sin, pos, nh, nkv, (kc, vc, slots))
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    q2, k2, v2 = ops.rope_qkv_write_torch(qkv, cos, sin, pos, nh, nkv, (kc2, vc2, slots))
    qr, kr, vr = _rope_f64(qkv, cos, sin, pos, nh, nkv)
    # The bf16 twin rounds cos/sin and each product before subtracting: where the two terms nearly
    # cancel its error is an ulp of the terms, not of the result, so compare it on the inputs' scale.
    twin_tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=0, atol=2**-6 * qkv.float().abs().max().item())
    for got, twin, ref in ((q, q2, qr), (k, k2, kr), (v, v2, vr)):
        assert got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), twin.float(), **twin_tol)
        torch.testing.assert_close(got.double(), ref, **TOL[dtype])
    assert torch.equal(v, v2)  # a copy, no arithmetic
    # The cache holds exactly the returned k/v rows at the kept slots, nothing elsewhere.
    keep = slots >= 0
    ref_kc, ref_vc = torch.zeros_like(kc), torch.zeros_like(vc)
    torch_ops.write_kv(ref_kc, ref_vc, k[keep], v[keep], slots[keep])
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


def test_rope_without_positions_uses_row_t():
    """positions=None: token t uses table row t (per-token tables, as dynamic NTK passes)."""
    gen = torch.Generator().manual_seed(1)
    nh, nkv, d = 4, 2, 16
    qkv, cos, sin, pos, slots, kc, vc = _rope_inputs(5, nh, nkv, d, torch.float32, gen)
    per_token_cos, per_token_sin = cos[pos].contiguous(), sin[pos].contiguous()  # [T, d/2]
    for impl in (triton_ops.rope_qkv_write, ops.rope_qkv_write_torch):
        caches = [(kc.clone(), vc.clone(), slots) for _ in range(2)]
        a = impl(qkv, cos, sin, pos, nh, nkv, caches[0])
        b = impl(qkv, per_token_cos, per_token_sin, None, nh, nkv, caches[1])
        for x, y in zip(a + caches[0][:2], b + caches[1][:2]):
            assert torch.equal(x, y)
    # No cache: the kernel returns the same rows and writes nothing.
    q, k, v = triton_ops.rope_qkv_write(qkv, cos, sin, pos, nh, nkv)
    q2, k2, v2 = ops.rope_qkv_write_torch(qkv, cos, sin, pos, nh, nkv)
    torch.testing.assert_close(q, q2, **TOL[torch.float32])
    assert torch.equal(v, v2) and not kc.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h", [96, 64, 200])
def test_norm_kernels_match_twins_and_float64(dtype, h):
    gen = torch.Generator().manual_seed(h)
    t, eps = 6, 1e-5
    x = (torch.randn(t, h, generator=gen) * 4).to(dtype)
    res = (torch.randn(t, h, generator=gen) * 4).to(dtype)
    w = (torch.rand(h, generator=gen) + 0.5).to(dtype)

    def f64(v):
        vd = v.double()
        return (vd * torch.rsqrt(vd.pow(2).mean(-1, keepdim=True) + eps)) * w.double()

    y = triton_ops.rms_norm(x, w, eps)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ops.rms_norm_torch(x, w, eps).float(), **TOL[dtype])
    torch.testing.assert_close(y.double(), f64(x), **TOL[dtype])

    normed, h_out = triton_ops.add_rms_norm(x, res, w, eps)
    n2, h2 = ops.add_rms_norm_torch(x, res, w, eps)
    torch.testing.assert_close(h_out.float(), h2.float(), **TOL[dtype])
    if dtype == torch.float32:
        assert torch.equal(h_out, h2)  # one float32 add: no rounding freedom
    torch.testing.assert_close(normed.float(), n2.float(), **TOL[dtype])
    torch.testing.assert_close(normed.double(), f64(h_out), **TOL[dtype])


def test_empty_batches():
    x = torch.empty(0, 32)
    w = torch.ones(32)
    assert triton_ops.rms_norm(x, w, 1e-6).shape == (0, 32)
    n, h = triton_ops.add_rms_norm(x, x, w, 1e-6)
    assert n.shape == h.shape == (0, 32)
    kc = torch.zeros(2, 4, 1, 8)
    q, k, v = triton_ops.rope_qkv_write(torch.empty(0, 32), torch.zeros(4, 4), torch.zeros(4, 4), None, 2, 1,
                                        (kc, kc.clone(), torch.empty(0, dtype=torch.int64)))
    assert q.shape == (0, 2, 8) and k.shape == v.shape == (0, 1, 8)


def test_dispatch_follows_the_attention_backend(monkeypatch):
    """CPU tensors take the torch twins; INFINITE_ATTENTION_BACKEND=triton sends them to the kernels."""
    calls = []
    monkeypatch.setattr(triton_ops, "rms_norm", lambda *a: calls.append("triton") or ops.rms_norm_torch(*a))
    monkeypatch.setattr(ops, "rms_norm_torch", lambda *a: calls.append("torch") or torch.zeros(1))
    monkeypatch.setattr(attention, "_forced", None)
    ops.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)
    monkeypatch.setattr(attention, "_forced", "triton")
    ops.rms_norm(torch.ones(1, 4), torch.ones(4), 1e-6)
    assert calls == ["torch", "triton", "torch"]  # the patched kernel itself calls the twin
