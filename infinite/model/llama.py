"""Llama-family decoder split around attention.

The model never runs attention: each layer is exposed as ``pre_attention``
(norm, QKV, RoPE) and ``post_attention`` (o_proj, residual, MLP) so the
runtime can place attention wherever the KV blocks live. Tokens are a flat
[T] batch (all requests concatenated); nothing here knows about requests.

q/k/v and gate/up are fused into one matmul each (concatenated at load
time); the numbers match transformers in float32. With a tensor-parallel
group (``tp``) the model holds one rank's shard (infinite/model/parallel.py):
``config`` is then that rank's architecture (its heads, KV heads and MLP
width), and the layer halves add the group's all-reduces. The weights stay
row-major like transformers': a column-major copy makes MKL's sgemm faster
only while the weights sit in cache, and slower once they come from DRAM,
which is the case in a decode step of a real model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import KVWrite
from .config import ModelConfig
from .parallel import TPGroup, TPShard, local_config, shard_of
from .rope import RotaryEmbedding


# From this many tokens in a step on, post_attention runs gate and up as two GEMMs (see there).
_SPLIT_MLP_MIN_TOKENS = 128


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as in transformers."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device | str) -> nn.Linear:
    # skip_init: weights come from the checkpoint, random init would only cost time.
    lin = torch.nn.utils.skip_init(nn.Linear, n_in, n_out, bias=bias, dtype=dtype, device=device)
    lin.requires_grad_(False)
    return lin


class Rotary(NamedTuple):
    """cos/sin [T, d/2] float32 of one step's positions."""

    cos: torch.Tensor
    sin: torch.Tensor


class DecoderLayer(nn.Module):
    """Weights of one layer; the computation lives in LlamaForCausalLM so the two halves read together."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, row_bias: bool = True) -> None:
        """``row_bias``: whether o_proj and down carry their biases (in a tensor-parallel group only the
        first rank does: the all-reduce of the partial products adds them once)."""
        super().__init__()
        H = cfg.hidden_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.qkv_proj = _linear(H, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias, dtype, device)
        self.o_proj = _linear(cfg.q_size, H, cfg.o_proj_bias and row_bias, dtype, device)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype, device)
        self.gate_up_proj = _linear(H, 2 * cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.down_proj = _linear(cfg.intermediate_size, H, cfg.mlp_bias and row_bias, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Llama / Mistral / Qwen2 weights with the attention-free layer halves of docs/architecture.md."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", tp: TPGroup | None = None) -> None:
        """``config`` is the checkpoint's; with ``tp`` (a group of more than one rank) the model is
        that rank's shard and ``self.config`` its share of the architecture."""
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.shard: TPShard | None = shard_of(config, tp.rank, tp.size) if self.tp is not None else None
        self.config = cfg = config if self.shard is None else local_config(config, self.shard)
        vocab_rows = cfg.vocab_size if self.shard is None else self.shard.vocab_per_rank
        self.embed_tokens = nn.Embedding(vocab_rows, cfg.hidden_size, dtype=dtype, device=device,
                                         _weight=torch.empty(vocab_rows, cfg.hidden_size, dtype=dtype,
                                                             device=device))
        self.embed_tokens.requires_grad_(False)
        row_bias = self.shard is None or self.shard.first
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, device, row_bias) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(cfg.hidden_size, vocab_rows, False, dtype, device)
        self.rope = RotaryEmbedding(cfg, "cpu" if str(device) == "meta" else device)
        # Two GEMMs for gate/up on long batches is a CPU (MKL) win only (see post_attention).
        self._split_mlp = torch.device(device).type == "cpu"

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
            self._split_mlp = dev.type == "cpu"
        return out

    # --- the contract of docs/architecture.md -------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] int64 -> residual stream [T, H]."""
        if self.tp is None:
            return F.embedding(input_ids, self.embed_tokens.weight)
        # Vocabulary-parallel: each rank looks up the ids in its rows, zeros for the others; the sum is exact.
        local = input_ids - self.shard.vocab[0]
        outside = (local < 0) | (local >= self.shard.vocab_per_rank)  # [T]
        h = F.embedding(local.masked_fill(outside, 0), self.embed_tokens.weight)  # [T, H]
        return self.tp.all_reduce(h.masked_fill_(outside[:, None], 0))

    def rotary(self, positions: torch.Tensor, max_position: int) -> Rotary:
        """The step's cos/sin for ``positions`` [T] (every layer reuses them). ``max_position`` is the
        largest position, known on the host: no device sync (it picks dynamic NTK's stretch)."""
        return Rotary(*self.rope.cos_sin(positions, max_position))

    def pre_attention(self, i: int, h: torch.Tensor, residual: torch.Tensor | None, rot: Rotary,
                      cache: KVWrite | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i up to attention -> (q [T,nh,d], k [T,nkv,d], v [T,nkv,d], residual [T,H]).

        ``h`` is the last layer's output and ``residual`` the stream before it (None at layer 0,
        where h is the embedding): their sum is the residual stream, added in the same kernel as the
        norm. With ``cache`` = (k_cache, v_cache, slots [T]) the new K/V are written there (slot < 0:
        not here) in the same kernel as RoPE."""
        cfg = self.config
        layer = self.layers[i]
        norm = layer.input_layernorm
        if residual is None:
            x, residual = norm(h), h
        else:
            x, residual = ops.add_rms_norm(h, residual, norm.weight, norm.eps)
        qkv = layer.qkv_proj(x)  # [T, (nh + 2 nkv) d]
        q, k, v = ops.rope_qkv_write(qkv, rot.cos, rot.sin, None, cfg.num_heads, cfg.num_kv_heads, cache)
        return q, k, v, residual

    def post_attention(self, i: int, attn: torch.Tensor, residual: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i after attention: attn [T,nh,d] -> (h [T,H] the MLP's output, residual [T,H]).
        The MLP output is added to the residual by the next layer's norm (or compute_logits)."""
        layer = self.layers[i]
        T = attn.shape[0]
        o = layer.o_proj(attn.reshape(T, self.config.q_size))  # [T, H]: this rank's heads' share
        if self.tp is not None:
            self.tp.all_reduce(o)
        norm = layer.post_attention_layernorm
        x, residual = ops.add_rms_norm(o, residual, norm.weight, norm.eps)
        if self._split_mlp and T >= _SPLIT_MLP_MIN_TOKENS:
            # Long batches on CPU (prefill): two GEMMs on the row halves of the fused weight (views, no
            # copy) beat one wide GEMM by ~15% with MKL and give contiguous gate/up. Same numbers bit for bit.
            I = self.config.intermediate_size
            w, b = layer.gate_up_proj.weight, layer.gate_up_proj.bias
            gate = F.linear(x, w[:I], None if b is None else b[:I])  # [T, I]
            up = F.linear(x, w[I:], None if b is None else b[I:])
        else:
            gate, up = layer.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        out = layer.down_proj(F.silu(gate) * up)  # [T, H]: this rank's columns' share
        if self.tp is not None:
            self.tp.all_reduce(out)
        return out, residual

    def compute_logits(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | None:
        """Final norm + lm_head: h [N,H] (plus the residual it belongs to) -> logits [N,V] float32.
        In a tensor-parallel group the first rank gets them all (it samples); the others get None."""
        if residual is None:
            x = self.norm(h)
        else:
            x, _ = ops.add_rms_norm(h, residual, self.norm.weight, self.norm.eps)
        logits = F.linear(x, self.lm_head_weight).float()  # [N, V] (a group: [N, V/tp] of its rows)
        if self.tp is None:
            return logits
        return self.tp.gather_columns(logits, self.config.vocab_size)
