"""infinite.model against transformers, on checkpoints transformers itself writes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers_hf import KINDS, dense_attention, dense_forward, hf_logits, make_hf_checkpoint
from safetensors.torch import load_file, save_file

from infinite.model import LlamaForCausalLM, ModelConfig, load_model
from infinite.model.rope import RotaryEmbedding, inv_freq_and_scale

torch.set_num_threads(1)

T = 40


def _ids(n: int = T, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tmp_path, kind):
    # max_position_embeddings=16 < T makes dynamic NTK actually rescale.
    over = {"max_position_embeddings": 16} if kind == "llama_dynamic" else {}
    path = make_hf_checkpoint(tmp_path, kind, **over)
    ids = _ids()
    ref = hf_logits(path, ids)
    model = load_model(path)
    out = dense_forward(model, ids)
    assert out.dtype == torch.float32 and out.shape == (T, 300)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama3_scaling", "llama_linear", "llama_dynamic", "llama_yarn"])
def test_rope_scaling_changes_logits(tmp_path, kind):
    """The scaled checkpoints would pass the exactness test by accident if scaling were a no-op."""
    over = {"max_position_embeddings": 16} if kind == "llama_dynamic" else {}
    path = make_hf_checkpoint(tmp_path, kind, **over)
    model = load_model(path)
    scaled = dense_forward(model, _ids())
    plain = LlamaForCausalLM(dataclasses.replace(model.config, rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    assert (dense_forward(plain, _ids()) - scaled).abs().max() > 1e-3


def test_dynamic_within_max_positions_is_plain_rope(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama_dynamic")  # max_position_embeddings 256 > T
    model = load_model(path)
    torch.testing.assert_close(dense_forward(model, _ids()), hf_logits(path, _ids()), atol=1e-4, rtol=1e-4)
    inv, _ = inv_freq_and_scale(model.config, seq_len=10)
    plain, _ = inv_freq_and_scale(dataclasses.replace(model.config, rope_scaling=None))
    torch.testing.assert_close(inv, plain, rtol=0, atol=0)


def test_sharded_checkpoint(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama_gqa", max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = _ids()
    torch.testing.assert_close(dense_forward(load_model(path), ids), hf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_bfloat16(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama_gqa")
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids()
    out = dense_forward(model, ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hf_logits(path, ids, dtype=torch.bfloat16), atol=0.1, rtol=0.05)
    torch.testing.assert_close(out, hf_logits(path, ids), atol=0.15, rtol=0.05)
    # A checkpoint saved in bf16 loads in bf16 by default (config dtype).
    path16 = make_hf_checkpoint(tmp_path / "b", "qwen2", save_dtype=torch.bfloat16)
    m16 = load_model(path16)
    assert m16.embed_tokens.weight.dtype == torch.bfloat16
    assert load_model(path16, dtype="float32").embed_tokens.weight.dtype == torch.float32


def test_token_by_token_matches_full_sequence(tmp_path):
    """pre_attention for one position at a time gives the rows of the full call (RoPE table).

    Not bit-exact: BLAS takes another path for a single row.
    """
    model = load_model(make_hf_checkpoint(tmp_path, "llama3_scaling"))
    ids = _ids(12)
    h = model.embed(ids)
    q, k, v, _ = model.pre_attention(0, h, None, model.rotary(torch.arange(12), 11))
    for t in range(12):
        qt, kt, vt, _ = model.pre_attention(0, h[t:t + 1], None, model.rotary(torch.tensor([t]), t))
        torch.testing.assert_close(qt, q[t:t + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kt, k[t:t + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vt, v[t:t + 1], rtol=1e-5, atol=1e-5)
    # Shifted positions rotate differently, and equal the same positions built afresh.
    a = model.pre_attention(0, h, None, model.rotary(torch.arange(12), 11))[0]
    b = model.pre_attention(0, h, None, model.rotary(torch.arange(3, 15), 14))[0]
    assert not torch.equal(a, b)
    torch.testing.assert_close(b, model.pre_attention(0, h, None, model.rotary(torch.arange(3, 15), 14))[0],
                               rtol=0, atol=0)


def test_post_attention_shapes_and_tied_head(tmp_path):
    model = load_model(make_hf_checkpoint(tmp_path, "qwen2"))
    assert model.lm_head is None and model.config.tie_word_embeddings
    h = model.embed(_ids(5))
    q, k, v, res = model.pre_attention(1, h, None, model.rotary(torch.arange(5), 4))
    assert q.shape == (5, 4, 16) and k.shape == (5, 2, 16) and v.shape == (5, 2, 16)
    out, res = model.post_attention(1, dense_attention(q, k, v), res)
    assert out.shape == h.shape and res.shape == h.shape
    assert model.compute_logits(out, res).shape == (5, 300)


def test_rope_table_grows_past_max_positions():
    cfg = ModelConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_position_embeddings=32)
    rope = RotaryEmbedding(cfg)
    pos = torch.tensor([0, 5, 31, 5000])
    cos, sin = rope.cos_sin(pos, 5000)
    inv, _ = inv_freq_and_scale(cfg)
    ang = pos.float()[:, None] * inv[None]
    torch.testing.assert_close(cos, ang.cos(), rtol=0, atol=0)
    torch.testing.assert_close(sin, ang.sin(), rtol=0, atol=0)
    with pytest.raises(ValueError, match=">= 0"):
        rope.cos_sin(torch.tensor([-1]), -1)


BASE = dict(model_type="llama", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def test_config_old_and_new_rope_styles():
    old = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0,
                                 "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 500000.0}})
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert old.head_dim == 8 and old.rope_type == "linear"
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0e4}})
    assert plain.rope_scaling is None and plain.rope_type == "default"
    l3 = ModelConfig.from_dict({**BASE, "max_position_embeddings": 64,
                                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0}})
    assert l3.rope_scaling["original_max_position_embeddings"] == 64


def test_config_tokens_dtype_and_biases():
    c = ModelConfig.from_dict({**BASE, "eos_token_id": [7, 8], "bos_token_id": 3, "torch_dtype": "bfloat16"},
                              generation_config={"eos_token_id": [8, 9]})
    assert c.eos_token_ids == (7, 8, 9) and c.bos_token_id == 3 and c.torch_dtype == "bfloat16"
    assert ModelConfig.from_dict({**BASE, "dtype": "float16"}).torch_dtype == "float16"
    q = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "eos_token_id": None})
    assert q.attention_bias and not q.o_proj_bias and q.eos_token_ids == ()
    lb = ModelConfig.from_dict({**BASE, "attention_bias": True})
    assert lb.attention_bias and lb.o_proj_bias


@pytest.mark.parametrize("bad, match", [
    ({"model_type": "gpt2"}, "unsupported model_type"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_size": 30}, "divisible"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "unsupported rope type"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs factor"),
    ({"vocab_size": None}, "vocab_size"),
    ({"eos_token_id": 100}, "outside vocab"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**BASE, **bad})


def test_loader_errors(tmp_path):
    path = make_hf_checkpoint(tmp_path, "llama_gqa")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(path, dtype=torch.int32)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="gate_proj.weight has shape"):
        load_model(path)
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensors: model.layers.1.self_attn.k_proj.weight"):
        load_model(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
