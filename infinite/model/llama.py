"""Llama-family decoder split around attention.

The model never runs attention: each layer is exposed as ``pre_attention``
(norm, QKV, RoPE) and ``post_attention`` (o_proj, residual, MLP) so the
runtime can place attention wherever the KV blocks live. Tokens are a flat
[T] batch (all requests concatenated); nothing here knows about requests.

q/k/v and gate/up are fused into one matmul each (concatenated at load
time); the numbers match transformers in float32. The weights stay
row-major like transformers': a column-major copy makes MKL's sgemm faster
only while the weights sit in cache, and slower once they come from DRAM,
which is the case in a decode step of a real model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import RotaryEmbedding, apply_rotary


# From this many tokens in a step on, post_attention runs gate and up as two GEMMs (see there).
_SPLIT_MLP_MIN_TOKENS = 128


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as in transformers."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm: fewer dispatches than the spelled-out ops, and bit-identical to them in float32.
        xf = F.rms_norm(x.to(torch.float32), (x.shape[-1],), None, self.eps)
        return self.weight * xf.to(x.dtype)


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device | str) -> nn.Linear:
    # skip_init: weights come from the checkpoint, random init would only cost time.
    lin = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, dtype=dtype, device=device)
    lin.requires_grad_(False)
    return lin


class DecoderLayer(nn.Module):
    """Weights of one layer; the computation lives in LlamaForCausalLM so the two halves read together."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.qkv_proj = _linear(H, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias, dtype, device)
        self.o_proj = _linear(cfg.q_size, H, cfg.o_proj_bias, dtype, device)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.gate_up_proj = _linear(H, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = _linear(cfg.intermediate_size, H, cfg.mlp_bias, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 weights with the attention-free layer halves of docs/architecture.md."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                                             device=device))
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        self.rope = RotaryEmbedding(cfg, "cpu" if str(device) == "meta" else device)
        # cos/sin of the last positions tensor: every layer of a step reuses them.
        self._rope_key: tuple[torch.Tensor, int, torch.dtype] | None = None
        self._rope_val: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- plumbing -----------------------------------------------------------------

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Keep the float32 RoPE tables on the model's device through .to()/.cuda().
        out = super()._apply(fn, recurse)
        dev = self.embed_tokens.weight.device
        if dev.type != "meta" and dev != self.rope.device:
            self.rope.to(dev)
            self._rope_key = self._rope_val = None
        return out

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Inference tensors have no version counter; the engine never edits positions in place.
        version = None if positions.is_inference() else positions._version
        key = self._rope_key
        if key is not None and key[0] is positions and key[1] == version and key[2] == dtype:
            return self._rope_val  # type: ignore[return-value]
        val = self.rope.cos_sin(positions, dtype)
        self._rope_key, self._rope_val = (positions, version, dtype), val
        return val

    # --- the contract of docs/architecture.md -------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> residual stream [T, H]."""
        return F.embedding(input_ids, self.embed_tokens.weight)

    def pre_attention(self, i: int, h: torch.Tensor, positions: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i up to attention: h [T,H], positions [T] -> q [T,nh,d], k [T,nkv,d], v [T,nkv,d] (RoPE on q, k)."""
        cfg = self.config
        layer = self.layers[i]
        T = h.shape[0]
        x = layer.input_layernorm(h)
        qkv = layer.qkv_proj(x)  # [T, (nh + 2 nkv) d]
        nh = cfg.num_heads
        # q and k sit side by side in qkv: rotate them in one call (half the small ops of a decode step).
        qk = qkv[:, :cfg.q_size + cfg.kv_size].view(T, nh + cfg.num_kv_heads, cfg.head_dim)  # [T, nh+nkv, d]
        v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(T, cfg.num_kv_heads, cfg.head_dim).contiguous()  # [T, nkv, d]
        cos, sin = self._cos_sin(positions, qkv.dtype)  # [T, d/2]
        qk = apply_rotary(qk, cos, sin)
        return qk[:, :nh].contiguous(), qk[:, nh:], v  # [T, nh, d] contiguous, [T, nkv, d] a view

    def post_attention(self, i: int, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Layer i after attention: h [T,H] residual in, attn [T,nh,d] -> residual out [T,H]."""
        layer = self.layers[i]
        T = h.shape[0]
        h = h + layer.o_proj(attn.reshape(T, self.config.q_size))
        x = layer.post_attention_layernorm(h)
        if T >= _SPLIT_MLP_MIN_TOKENS:
            # Long batches (prefill): two GEMMs on the row halves of the fused weight (views, no copy)
            # beat one wide GEMM by ~15% on CPU and give contiguous gate/up. Same numbers bit for bit.
            I = self.config.intermediate_size
            w, b = layer.gate_up_proj.weight, layer.gate_up_proj.bias
            gate = F.linear(x, w[:I], None if b is None else b[:I])  # [T, I]
            up = F.linear(x, w[I:], None if b is None else b[I:])
        else:
            gate, up = layer.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return h + layer.down_proj(F.silu(gate) * up)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head: h [N,H] -> logits [N,V] float32."""
        return F.linear(self.norm(h), self.lm_head_weight).float()
