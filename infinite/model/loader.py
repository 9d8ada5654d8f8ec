"""Load a Hugging Face Llama-family checkpoint folder into LlamaForCausalLM.

Tensors are read through ``safetensors.safe_open`` (memory-mapped), one at a
time, straight into the fused layout of the model, so peak memory stays near
the size of the model in its target dtype. Sharded checkpoints are found via
``model.safetensors.index.json``. A rank of a tensor-parallel group reads only
its slices of each tensor (``get_slice``): its heads' rows of q/k/v, its columns
of o_proj and down, its rows of gate/up and of the vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import ModelConfig
from .llama import LlamaForCausalLM
from .parallel import TPGroup, TPShard

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Buffers older checkpoints saved that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    """None -> the checkpoint's torch_dtype; strings like 'bfloat16' accepted."""
    if dtype is None:
        dtype = cfg.torch_dtype
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}: supported are {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}: supported are {', '.join(DTYPES)}")
    return dtype


def weight_map(cfg: ModelConfig) -> dict[str, list[str]]:
    """Model parameter name -> the HF tensor names concatenated (dim 0) to form it."""
    m: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"],
                               "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = ["lm_head.weight"]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        o = f"layers.{i}."
        m[o + "input_layernorm.weight"] = [p + "input_layernorm.weight"]
        m[o + "post_attention_layernorm.weight"] = [p + "post_attention_layernorm.weight"]
        m[o + "qkv_proj.weight"] = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        if cfg.attention_bias:
            m[o + "qkv_proj.bias"] = [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        m[o + "o_proj.weight"] = [p + "self_attn.o_proj.weight"]
        if cfg.o_proj_bias:
            m[o + "o_proj.bias"] = [p + "self_attn.o_proj.bias"]
        m[o + "gate_up_proj.weight"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        m[o + "down_proj.weight"] = [p + "mlp.down_proj.weight"]
        if cfg.mlp_bias:
            m[o + "gate_up_proj.bias"] = [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"]
            m[o + "down_proj.bias"] = [p + "mlp.down_proj.bias"]
    return m


def safetensors_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            wm = json.load(f).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index} has no weight_map")
        out = {name: path / fname for name, fname in wm.items()}
        for f_ in set(out.values()):
            if not f_.is_file():
                raise ValueError(f"shard {f_.name} listed in {index.name} is missing from {path}")
        return out
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    out = {}
    for f_ in files:
        with safe_open(str(f_), framework="pt") as sf:
            for name in sf.keys():
                out[name] = f_
    return out


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", tp: TPGroup | None = None) -> LlamaForCausalLM:
    """Build the model of ``path/config.json`` and fill it from ``path/*.safetensors``.

    dtype None means the checkpoint's ``torch_dtype`` (float32 if absent). With ``tp`` the model is
    that rank's shard, read slice by slice. Raises ValueError naming the tensor on a missing tensor
    or a shape mismatch (shapes are checked against the whole model's config.json).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint folder {path} does not exist")
    cfg = ModelConfig.from_pretrained(path)
    dtype = resolve_dtype(dtype, cfg)
    device = torch.device(device)
    model = LlamaForCausalLM(cfg, dtype=dtype, device="meta", tp=tp)
    where = safetensors_files(path)
    wmap = weight_map(cfg)

    needed = {hf for names in wmap.values() for hf in names}
    missing = sorted(n for n in needed if n not in where)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"checkpoint {path} is missing tensors: {shown}")
    extra = sorted(n for n in where if n not in needed and not n.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        log.warning("ignoring %d unexpected tensors in %s, e.g. %s", len(extra), path, extra[:3])

    expected = dict(model.named_parameters())
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(name: str):
            f_ = where[name]
            if f_ not in handles:
                handles[f_] = stack.enter_context(safe_open(str(f_), framework="pt", device="cpu"))
            return handles[f_].get_slice(name)  # type: ignore[attr-defined]

        for pname, hf_names in wmap.items():
            if pname not in expected:
                continue  # a row-parallel bias: the group's first rank holds it
            parts = list(_checked_parts(pname, hf_names, get, cfg, model.shard))
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            _set_param(model, pname, t.to(device=device, dtype=dtype))
    model.rope.to(device)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # a bug in weight_map, not in the checkpoint
        raise RuntimeError(f"parameters left uninitialised: {left}")
    return model.eval()


def _checked_parts(pname: str, hf_names: list[str], get, cfg: ModelConfig,
                   shard: TPShard | None) -> Iterator[torch.Tensor]:
    """The tensors that make up ``pname``, each checked against the whole model's shape, read whole or
    (a tensor-parallel rank) only this rank's slice."""
    shapes = _expected_part_shapes(pname, hf_names, cfg)
    cuts = [None] * len(hf_names) if shard is None else shard_cuts(pname, cfg, shard)
    for hf, shape, cut in zip(hf_names, shapes, cuts):
        sl = get(hf)
        got = tuple(sl.get_shape())
        if got != shape:
            raise ValueError(f"tensor {hf} has shape {got}, expected {shape} from config.json")
        if cut is None:
            yield sl[:]
            continue
        dim, lo, hi, rows = cut
        t = sl[lo:min(hi, shape[0])] if dim == 0 else sl[:, lo:hi]
        if dim == 0 and t.shape[0] < rows:  # the vocabulary's padding rows: never looked up, logits cut off
            t = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
        elif t.untyped_storage().nbytes() > t.nbytes:
            t = t.clone()  # a row range comes as a view of the whole (memory-mapped) tensor: keep only the slice
        yield t


def _kind(pname: str) -> str:
    """'layers.3.qkv_proj.weight' -> 'qkv_proj'; 'embed_tokens.weight' -> 'embed_tokens'."""
    return pname.rsplit(".", 2)[-2] if pname.count(".") >= 2 else pname.split(".")[0]


def _expected_part_shapes(pname: str, hf_names: list[str], cfg: ModelConfig) -> list[tuple[int, ...]]:
    """The checkpoint's shape of each tensor making up ``pname`` (the whole model's, from config.json)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    kind = _kind(pname)
    bias = pname.endswith(".bias")
    if kind == "qkv_proj":
        rows = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return [(r,) if bias else (r, H) for r in rows]
    if kind == "gate_up_proj":
        return [(I,) if bias else (I, H)] * 2
    if kind == "o_proj":
        return [(H,) if bias else (H, cfg.q_size)]
    if kind == "down_proj":
        return [(H,) if bias else (H, I)]
    if kind in ("embed_tokens", "lm_head"):
        return [(cfg.vocab_size, H)]
    return [(H,)]  # the norms


def shard_cuts(pname: str, cfg: ModelConfig, shard: TPShard) -> list[tuple[int, int, int, int] | None]:
    """Per tensor making up ``pname``: (dim, start, end, rows) of the slice a rank reads, or None for the
    whole tensor (norms, and the row-parallel biases the first rank holds)."""
    d = cfg.head_dim
    kind = _kind(pname)
    bias = pname.endswith(".bias")
    (h0, h1), (k0, k1), (i0, i1), (v0, v1) = shard.heads, shard.kv_heads, shard.intermediate, shard.vocab
    if kind == "qkv_proj":
        q, kv = (0, h0 * d, h1 * d, (h1 - h0) * d), (0, k0 * d, k1 * d, (k1 - k0) * d)
        return [q, kv, kv]
    if kind == "gate_up_proj":
        return [(0, i0, i1, i1 - i0)] * 2
    if kind == "o_proj":
        return [None if bias else (1, h0 * d, h1 * d, 0)]
    if kind == "down_proj":
        return [None if bias else (1, i0, i1, 0)]
    if kind in ("embed_tokens", "lm_head"):
        return [(0, v0, v1, v1 - v0)]
    return [None]


def _set_param(model: nn.Module, pname: str, t: torch.Tensor) -> None:
    mod_name, _, attr = pname.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(t.contiguous(), requires_grad=False))
