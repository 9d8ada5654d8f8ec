"""Model hyper-parameters read from a Hugging Face ``config.json``.

One frozen dataclass covers the Llama family (Llama 2/3, Mistral, Qwen2):
the three differ only in defaults and in which projections carry a bias, so
the differences are resolved here once and the model code never looks at
``model_type``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# Keys a rope-scaling dict must carry, per type (beyond rope_type itself).
_ROPE_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder.

    ``rope_scaling`` is normalised: ``None`` for plain RoPE, else a dict with
    ``rope_type`` and that type's parameters (``rope_theta`` is kept apart).
    ``attention_bias`` is the bias of q/k/v; ``o_proj_bias`` that of o_proj
    (Llama puts both under one key, Qwen2 has the first without the second).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else str(self.rope_scaling["rope_type"])

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Build from the parsed ``config.json`` (and ``generation_config.json``, whose eos ids are merged in)."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}: only 'silu' (SwiGLU) is supported")

        def req(key: str) -> Any:
            if d.get(key) is None:
                raise ValueError(f"config.json is missing required key {key!r}")
            return d[key]

        hidden_size = int(req("hidden_size"))
        num_heads = int(req("num_attention_heads"))
        num_kv_heads = d.get("num_key_value_heads")
        num_kv_heads = num_heads if num_kv_heads is None else int(num_kv_heads)
        head_dim = d.get("head_dim")
        if head_dim is None:
            if num_heads <= 0 or hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_heads}) "
                    "when head_dim is not given"
                )
            head_dim = hidden_size // num_heads
        max_pos = int(d.get("max_position_embeddings", 2048))
        rope_theta, rope_scaling = _parse_rope(d, max_pos)

        if model_type == "qwen2":
            attention_bias, o_proj_bias = True, False
        else:
            attention_bias = bool(d.get("attention_bias", False))
            o_proj_bias = attention_bias

        eos = _as_id_tuple(d.get("eos_token_id"), "eos_token_id")
        if generation_config:
            eos += tuple(i for i in _as_id_tuple(generation_config.get("eos_token_id"), "eos_token_id") if i not in eos)
        bos = d.get("bos_token_id")
        if bos is None and generation_config:
            bos = generation_config.get("bos_token_id")
        if isinstance(bos, list):
            bos = bos[0] if bos else None

        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden_size,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(dict.fromkeys(eos)),
            torch_dtype=str(dtype),
            model_type=model_type,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` (and ``generation_config.json`` if present) from a checkpoint folder."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"no config.json in {path}")
        with open(cfg_file, encoding="utf-8") as f:
            d = json.load(f)
        gen = None
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            with open(gen_file, encoding="utf-8") as f:
                gen = json.load(f)
        return cls.from_dict(d, gen)


def _as_id_tuple(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"{name} must be an int or a list of ints, got {value!r}")


def _parse_rope(d: dict[str, Any], max_pos: int) -> tuple[float, dict[str, Any] | None]:
    """Normalise old (``rope_theta`` + ``rope_scaling``) and new (``rope_parameters``) styles.

    Returns (theta, scaling) where scaling is None for plain RoPE. Like
    transformers, llama3/yarn without ``original_max_position_embeddings``
    fall back to ``max_position_embeddings``.
    """
    params = d.get("rope_parameters")
    if params is None:
        params = d.get("rope_scaling")
    params = dict(params) if params else {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters/rope_scaling must be a dict, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope parameters are not supported")
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1.0 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))
    missing = [k for k in _ROPE_REQUIRED_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(missing)}")
    return float(theta), {"rope_type": rope_type, **params}


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if c.num_heads % c.num_kv_heads:
        raise ValueError(
            f"num_heads ({c.num_heads}) must be a multiple of num_kv_heads ({c.num_kv_heads})"
        )
    if c.head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {c.head_dim}")
    if not c.rms_norm_eps > 0:
        raise ValueError(f"rms_norm_eps must be > 0, got {c.rms_norm_eps}")
    if not c.rope_theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {c.rope_theta}")
    if c.torch_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported torch_dtype {c.torch_dtype!r}: supported are {', '.join(SUPPORTED_DTYPES)}")
    if c.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {c.model_type!r}")
    if c.rope_scaling is not None:
        rt = c.rope_scaling.get("rope_type")
        if rt not in SUPPORTED_ROPE_TYPES or rt == "default":
            raise ValueError(f"rope_scaling must have a scaling rope_type, got {rt!r}")
        factor = c.rope_scaling.get("factor")
        if factor is not None and not float(factor) > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {factor}")
    for t in c.eos_token_ids:
        if not 0 <= t < c.vocab_size:
            raise ValueError(f"eos token id {t} outside vocab of size {c.vocab_size}")
    if c.bos_token_id is not None and not 0 <= c.bos_token_id < c.vocab_size:
        raise ValueError(f"bos_token_id {c.bos_token_id} outside vocab of size {c.vocab_size}")
