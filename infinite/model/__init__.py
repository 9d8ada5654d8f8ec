"""Llama-family model: config, safetensors loader, and the layer halves around attention."""

from .config import ModelConfig
from .llama import LlamaForCausalLM, RMSNorm
from .loader import load_model
from .rope import RotaryEmbedding, apply_rotary, inv_freq_and_scale

__all__ = [
    "ModelConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "load_model",
    "RotaryEmbedding",
    "apply_rotary",
    "inv_freq_and_scale",
]
