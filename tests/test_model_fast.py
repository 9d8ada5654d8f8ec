"""The speed paths of infinite.model.llama give the same numbers as the plain ones, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers_hf import dense_forward, hf_logits, make_hf_checkpoint

from infinite.model import llama, load_model
from infinite.model.rope import apply_rotary

torch.set_num_threads(1)


@pytest.mark.parametrize("kind,overrides", [("llama_gqa", {}), ("llama_gqa", {"mlp_bias": True})])
def test_split_mlp_equals_fused(tmp_path, monkeypatch, kind, overrides):
    """Long batches run gate/up as two GEMMs on views of the fused weight: identical output."""
    model = load_model(make_hf_checkpoint(tmp_path, kind, **overrides))
    assert (model.layers[0].gate_up_proj.bias is not None) == bool(overrides)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(150, model.config.hidden_size, generator=gen)
    attn = torch.randn(150, model.config.num_heads, model.config.head_dim, generator=gen)
    monkeypatch.setattr(llama, "_SPLIT_MLP_MIN_TOKENS", 10**9)
    fused = model.post_attention(1, attn, h)
    monkeypatch.setattr(llama, "_SPLIT_MLP_MIN_TOKENS", 1)
    split = model.post_attention(1, attn, h)
    torch.testing.assert_close(split, fused, rtol=0, atol=0)


def test_long_batch_logits_still_match_transformers(tmp_path):
    """T above the split threshold through the whole model, against transformers."""
    path = make_hf_checkpoint(tmp_path, "llama_gqa")
    ids = torch.randint(0, 300, (llama._SPLIT_MLP_MIN_TOKENS + 9,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dense_forward(load_model(path), ids), hf_logits(path, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2"])
def test_joint_rope_equals_separate(tmp_path, kind):
    """q and k rotated in one call equal each rotated alone; q comes back contiguous."""
    model = load_model(make_hf_checkpoint(tmp_path, kind))
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(7, cfg.hidden_size, generator=gen)
    pos = torch.tensor([0, 3, 4, 9, 10, 11, 40])
    q, k, v, res = model.pre_attention(0, h, None, model.rotary(pos, 40))
    assert res is h
    assert q.shape == (7, cfg.num_heads, cfg.head_dim) and q.is_contiguous()
    assert k.shape == v.shape == (7, cfg.num_kv_heads, cfg.head_dim)
    layer = model.layers[0]
    qkv = layer.qkv_proj(layer.input_layernorm(h))
    q0, k0, v0 = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
    cos, sin = model.rope.cos_sin(pos, 40)
    torch.testing.assert_close(q, apply_rotary(q0.reshape(7, cfg.num_heads, -1), cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(k, apply_rotary(k0.reshape(7, cfg.num_kv_heads, -1), cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(v, v0.reshape(7, cfg.num_kv_heads, -1), rtol=0, atol=0)


def test_rms_norm_bit_identical_to_spelled_out():
    norm = llama.RMSNorm(96, 1e-6, torch.float32, "cpu")
    norm.weight.copy_(torch.randn(96, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(33, 96, generator=torch.Generator().manual_seed(4)) * 5
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), ref, rtol=0, atol=0)
    xb = x.to(torch.bfloat16)
    nb = llama.RMSNorm(96, 1e-6, torch.bfloat16, "cpu")
    out = nb(xb)
    assert out.dtype == torch.bfloat16
    xf = xb.float()
    torch.testing.assert_close(out, nb.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        torch.bfloat16), rtol=0, atol=0)
