"""Rotary position embedding with the scaling schemes of the Llama family.

Numbers follow transformers' ``modeling_rope_utils`` exactly (same float32
formulas), and the rotation uses the non-interleaved "rotate_half" layout of
Hugging Face checkpoints. Static schemes keep a lazily grown cos/sin table
indexed by position, so a decode step is a gather; dynamic NTK depends on the
longest position of the call (as in transformers) and is computed on the fly
only past ``max_position_embeddings``.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq_and_scale(cfg: ModelConfig, seq_len: int | None = None,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] float32 and the cos/sin multiplier ("attention factor").

    ``seq_len`` only matters for dynamic NTK (the length the frequencies are
    stretched to); it is ignored by the static schemes.
    """
    dim = cfg.head_dim
    base = cfg.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim  # [d/2]
    sc = cfg.rope_scaling
    rope_type = cfg.rope_type
    if rope_type == "default":
        return 1.0 / (base ** exps), 1.0
    if rope_type == "linear":
        return (1.0 / (base ** exps)) / float(sc["factor"]), 1.0
    if rope_type == "dynamic":
        return _dynamic_inv_freq(cfg, exps, seq_len), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(cfg, 1.0 / (base ** exps)), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(cfg, exps, device)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _dynamic_inv_freq(cfg: ModelConfig, exps: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    # transformers does this arithmetic on float32 tensors; mirror it so the bits match.
    dim = cfg.head_dim
    factor = float(cfg.rope_scaling["factor"])
    mpe = cfg.max_position_embeddings
    n = torch.tensor(max(seq_len or mpe, mpe), dtype=torch.int64)
    base = cfg.rope_theta * ((factor * n / mpe) - (factor - 1)) ** (dim / (dim - 2))  # 0-dim float32
    return 1.0 / (base.to(exps.device) ** exps)


def _llama3_inv_freq(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    sc = cfg.rope_scaling
    factor = float(sc["factor"])
    low = float(sc["low_freq_factor"])
    high = float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig, exps: torch.Tensor,
                   device: torch.device | str | None) -> tuple[torch.Tensor, float]:
    sc = cfg.rope_scaling
    dim = cfg.head_dim
    base = cfg.rope_theta
    factor = float(sc["factor"])
    orig = sc["original_max_position_embeddings"]
    attention_factor = sc.get("attention_factor")
    mscale, mscale_all_dim = sc.get("mscale"), sc.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = sc.get("beta_fast") or 32
    beta_slow = sc.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp.to(device=device)
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [P, d/2]
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


class RotaryEmbedding:
    """Per-model RoPE state: the inverse frequencies and a cos/sin table.

    The table holds half-width rows ([P, d/2]: the two halves of HF's
    ``cat(freqs, freqs)`` are equal), grows on demand, and lives on the
    device of the model. Not an nn.Module so that ``model.to()`` cannot
    cast it to a low precision; call :meth:`to` to move it.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.inv_freq, self.scale = inv_freq_and_scale(cfg, None, self.device)  # [d/2] f32
        self._cos = torch.empty(0, cfg.head_dim // 2, dtype=torch.float32, device=self.device)
        self._sin = self._cos

    def to(self, device: torch.device | str) -> "RotaryEmbedding":
        self.device = torch.device(device)
        self.inv_freq = self.inv_freq.to(self.device)
        self._cos, self._sin = self._cos.to(self.device), self._sin.to(self.device)
        return self

    def reserve(self, num_positions: int) -> None:
        """Grow the table to cover positions [0, num_positions) now (before graph capture: a captured
        step must never need to grow it)."""
        have = self._cos.shape[0]
        if num_positions <= have:
            return
        cap = max(num_positions, 2 * have, min(self.cfg.max_position_embeddings, 4096))
        pos = torch.arange(cap, dtype=torch.int64, device=self.device)
        self._cos, self._sin = _cos_sin(pos, self.inv_freq, self.scale)  # [cap, d/2]

    def cos_sin(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, d/2] float32 for ``positions`` [T] int64 whose largest value is ``max_position``
        (known on the host, so no device sync)."""
        if positions.dim() != 1:
            raise ValueError(f"positions must be 1-D [T], got shape {tuple(positions.shape)}")
        if max_position < 0 and positions.numel():
            raise ValueError(f"positions must be >= 0, got a largest position of {max_position}")
        seq_len = max_position + 1
        if self.cfg.rope_type == "dynamic" and seq_len > self.cfg.max_position_embeddings:
            # transformers stretches the base to the longest position of the call.
            inv_freq, scale = inv_freq_and_scale(self.cfg, seq_len, self.device)
            return _cos_sin(positions.to(self.device), inv_freq, scale)
        self.reserve(seq_len)
        idx = positions.to(self.device)
        return self._cos[idx], self._sin[idx]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, n, d] by cos/sin [T, d/2] in HF rotate_half layout.

    ``(x1*cos - x2*sin, x2*cos + x1*sin)`` is bit-identical to HF's
    ``x*cat(cos,cos) + rotate_half(x)*cat(sin,sin)``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, n, d/2]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, d/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
