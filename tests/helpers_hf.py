"""Tiny checkpoints written by transformers itself, and a dense reference forward.

Shared by the model tests and the engine's exactness tests: keep
``make_hf_checkpoint``'s signature stable. Import as ``from helpers_hf import ...``
(pytest puts tests/ on sys.path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

KINDS = ("llama_gqa", "llama3_scaling", "qwen2", "mistral", "llama_linear", "llama_dynamic", "llama_yarn")

_BASE: dict[str, Any] = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

_KIND_CONFIG: dict[str, dict[str, Any]] = {
    "llama_gqa": dict(num_hidden_layers=3),
    "llama3_scaling": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama_yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "mistral": dict(sliding_window=None),
}


def make_hf_checkpoint(tmp_path: Path, kind: str, *, seed: int = 0, max_shard_size: str | int | None = None,
                       save_dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
    """Write a tiny random ``kind`` checkpoint with ``save_pretrained`` into ``tmp_path/kind`` and return the folder.

    ``overrides`` are config keyword arguments (e.g. ``max_position_embeddings=16``).
    Norm weights and biases are randomised too (transformers inits them to 1/0,
    which would hide bugs in their use). No tokenizer files are written.
    """
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}: choose from {', '.join(KINDS)}")
    kw = {**_BASE, **_KIND_CONFIG[kind], **overrides}
    if kind == "qwen2":
        cfg_cls, model_cls = Qwen2Config, Qwen2ForCausalLM
    elif kind == "mistral":
        cfg_cls, model_cls = MistralConfig, MistralForCausalLM
    else:
        cfg_cls, model_cls = LlamaConfig, LlamaForCausalLM
    rope_theta = kw.pop("rope_theta", None)
    scaling = kw.pop("rope_scaling", None)
    if rope_theta is not None or scaling is not None:
        kw["rope_parameters"] = {"rope_type": "default", **(scaling or {}),
                                 "rope_theta": rope_theta if rope_theta is not None else 10000.0}
    config = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = model_cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    out = Path(tmp_path) / kind
    model = model.to(save_dtype)
    if max_shard_size is not None:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(out)
    return out


def hf_logits(path: Path, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' own forward over one sequence: input_ids [T] -> logits [T, V] float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids[None]).logits[0].float()


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over one whole sequence: q [T,nh,d], k/v [T,nkv,d] -> [T,nh,d]."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # [T, nh, d]
    v = v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True)  # [nh, T, d]
    return out.transpose(0, 1)


def dense_forward(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Run an infinite LlamaForCausalLM layer by layer over one sequence: [T] -> logits [T, V] float32."""
    positions = torch.arange(input_ids.shape[0], dtype=torch.int64)
    with torch.no_grad():
        h, res = model.embed(input_ids), None
        rot = model.rotary(positions, input_ids.shape[0] - 1)
        for i in range(model.config.num_layers):
            q, k, v, res = model.pre_attention(i, h, res, rot)
            h, res = model.post_attention(i, dense_attention(q, k, v), res)
        return model.compute_logits(h, res)
