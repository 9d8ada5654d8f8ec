"""Model shapes the simulator costs: Llama 2 7B/13B/70B, or any checkpoint folder's config.json.

Only the shapes matter here (no weights): how many bytes of weights a step
reads, how many FLOPs a token costs, how many bytes of KV cache a token holds.
The built-in shapes are the Hugging Face ``config.json`` values of
``meta-llama/Llama-2-{7b,13b,70b}-hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelSpec", "MODELS", "model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2  # bf16/fp16 weights and KV cache

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "vocab",
                  "dtype_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelSpec.{f} must be a positive integer, got {v!r}")

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer: q, k, v, o projections and the SwiGLU MLP."""
        h, q, kv = self.hidden, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate

    @property
    def params(self) -> int:
        """All weights: the layers, the embedding and an untied LM head."""
        return self.num_layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_layer

    @property
    def query_bytes(self) -> int:
        """One token's query in one layer (what a remote MicroAttention call sends)."""
        return self.num_heads * self.head_dim * self.dtype_bytes

    @property
    def partial_bytes(self) -> int:
        """One token's partial attention output plus its float32 log-sum-exp per head (what comes back)."""
        return self.num_heads * self.head_dim * self.dtype_bytes + 4 * self.num_heads

    @classmethod
    def from_dir(cls, path: str | Path, dtype_bytes: int | None = None) -> ModelSpec:
        """Shapes of a Hugging Face checkpoint folder (its config.json, read by the project's loader)."""
        from infinite.model.config import ModelConfig

        cfg = ModelConfig.from_pretrained(str(path))
        if dtype_bytes is None:
            dtype_bytes = 4 if cfg.torch_dtype == "float32" else 2
        return cls(Path(path).name or str(path), cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                   cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, dtype_bytes)


MODELS: dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", 32, 4096, 32, 32, 128, 11008, 32000),
    "llama2-13b": ModelSpec("llama2-13b", 40, 5120, 40, 40, 128, 13824, 32000),
    "llama2-70b": ModelSpec("llama2-70b", 80, 8192, 64, 8, 128, 28672, 32000),
}


def model_spec(name_or_dir: str, dtype_bytes: int | None = None) -> ModelSpec:
    """A built-in model by name, or the shapes of a checkpoint folder."""
    if name_or_dir in MODELS:
        spec = MODELS[name_or_dir]
        if dtype_bytes is not None and dtype_bytes != spec.dtype_bytes:
            from dataclasses import replace

            spec = replace(spec, dtype_bytes=dtype_bytes)
        return spec
    if Path(name_or_dir, "config.json").is_file():
        return ModelSpec.from_dir(name_or_dir, dtype_bytes)
    raise ValueError(f"unknown model {name_or_dir!r}: expected one of {', '.join(MODELS)} or a folder with config.json")
