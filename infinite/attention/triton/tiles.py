"""Tile sizes of the attention kernels per GPU generation, and the per-device tuned overrides.

A tile that suits Hopper (228 KB of shared memory per SM, deep cp.async
pipelines) spills or fails to launch on smaller parts, and one sized for
anything runs Hopper at a fraction of its bandwidth. So the kernels ask this
module for their tile with the device's compute capability major, the head
dim and the storage dtype:

* a fixed table (``TABLE``): Hopper (sm90), Ampere/Ada (sm80/sm86/sm89 share
  major 8) and a safe default for anything else (CPU interpreter included,
  where warps and stages are ignored);
* a JSON file of tuned winners per device name under the user cache dir
  (``$XDG_CACHE_HOME/infinite/triton-tiles.json``, else
  ``~/.cache/infinite/``), written by :mod:`infinite.attention.triton.autotune`
  and read once per process. When it has an entry for the device, it wins; a
  corrupt or malformed file is reported once with a warning and the table is
  used.

The starting points follow what the Triton decode kernels of SGLang/vLLM use
(32-64 keys per tile, 4 warps, 2 stages on sm80+) and the Triton
flash-attention tutorial's forward tiles (128 query rows, 64 keys, 8 warps,
3 stages on Hopper at d=128); the autotuner exists because gather-based paged
loads are not the tutorial's TMA loads.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from infinite.attention.triton._jit import capability_major, device_name

CACHE_FILE = "triton-tiles.json"
_FORMAT = 1


@dataclass(frozen=True)
class DecodeTile:
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillTile:
    block_m: int  # query rows per program (query tokens x the query heads of one KV head)
    block_n: int  # keys per loop iteration
    num_warps: int
    num_stages: int


Tile = DecodeTile | PrefillTile
KINDS = {"decode": DecodeTile, "prefill": PrefillTile}

# (kind, capability major (0 = any other), head-dim bucket, dtype name) -> tile.
# Head dims bucket to 64 (<= 64), 128 and 256; float32 halves the key tile (4-byte elements).
TABLE: dict[tuple[str, int, int, str], Tile] = {}


def _fill_table() -> None:
    half = ("bfloat16", "float16")
    for dt in half:
        # Hopper: more bytes in flight per SM (3-stage pipeline), bigger prefill tiles.
        TABLE["decode", 9, 64, dt] = DecodeTile(128, 4, 3)
        TABLE["decode", 9, 128, dt] = DecodeTile(64, 4, 3)
        TABLE["decode", 9, 256, dt] = DecodeTile(32, 4, 3)
        TABLE["prefill", 9, 64, dt] = PrefillTile(128, 64, 4, 3)
        TABLE["prefill", 9, 128, dt] = PrefillTile(128, 64, 8, 3)
        TABLE["prefill", 9, 256, dt] = PrefillTile(64, 32, 8, 2)
        # Ampere / Ada (major 8): 2 stages fit the 100-164 KB of shared memory of every sm8x part.
        TABLE["decode", 8, 64, dt] = DecodeTile(64, 4, 3)
        TABLE["decode", 8, 128, dt] = DecodeTile(64, 4, 3)
        TABLE["decode", 8, 256, dt] = DecodeTile(32, 4, 3)
        TABLE["prefill", 8, 64, dt] = PrefillTile(128, 64, 4, 2)
        TABLE["prefill", 8, 128, dt] = PrefillTile(64, 64, 4, 2)
        TABLE["prefill", 8, 256, dt] = PrefillTile(64, 32, 4, 1)
        # Anything else: the tiles the kernels shipped with before per-device tables.
        TABLE["decode", 0, 64, dt] = DecodeTile(64, 4, 2)
        TABLE["decode", 0, 128, dt] = DecodeTile(64, 4, 2)
        TABLE["decode", 0, 256, dt] = DecodeTile(32, 4, 1)
        TABLE["prefill", 0, 64, dt] = PrefillTile(64, 64, 4, 2)
        TABLE["prefill", 0, 128, dt] = PrefillTile(64, 32, 4, 2)
        TABLE["prefill", 0, 256, dt] = PrefillTile(32, 32, 4, 1)
    for cc in (9, 8, 0):
        TABLE["decode", cc, 64, "float32"] = DecodeTile(64, 4, 2 if cc else 1)
        TABLE["decode", cc, 128, "float32"] = DecodeTile(32, 4, 2 if cc else 1)
        TABLE["decode", cc, 256, "float32"] = DecodeTile(16, 4, 1)
        TABLE["prefill", cc, 64, "float32"] = PrefillTile(64, 32, 4, 2 if cc else 1)
        TABLE["prefill", cc, 128, "float32"] = PrefillTile(64, 32, 4, 1)
        TABLE["prefill", cc, 256, "float32"] = PrefillTile(32, 16, 4, 1)


_fill_table()


def head_dim_bucket(head_dim: int) -> int:
    """64, 128 or 256: the table's rows (padded head dims of the kernels)."""
    if head_dim <= 64:
        return 64
    if head_dim <= 128:
        return 128
    return 256


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_tile(kind: str, cc_major: int, head_dim: int, dtype: torch.dtype) -> Tile:
    """The fixed table's tile: exact generation if listed, else the safe default row."""
    if kind not in KINDS:
        raise ValueError(f"tile kind must be one of {sorted(KINDS)}, got {kind!r}")
    hb, dt = head_dim_bucket(head_dim), dtype_name(dtype)
    if dt not in ("bfloat16", "float16", "float32"):
        raise TypeError(f"attention kernels support float32, bfloat16 and float16, got {dtype}")
    return TABLE.get((kind, cc_major, hb, dt)) or TABLE[kind, 0, hb, dt]


def tuned_key(kind: str, head_dim: int, dtype: torch.dtype) -> str:
    """Key of one tuned entry inside a device's section of the cache file."""
    return f"{kind}/{head_dim_bucket(head_dim)}/{dtype_name(dtype)}"


def cache_path() -> Path:
    """Where tuned tiles live: ``$XDG_CACHE_HOME/infinite`` or ``~/.cache/infinite``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "infinite" / CACHE_FILE


def _is_pow2(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def parse_tile(kind: str, raw: object) -> Tile:
    """A tile from its JSON form; ValueError naming the bad field."""
    cls = KINDS[kind]
    if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
        raise ValueError(f"a {kind} tile needs exactly the fields {sorted(cls.__dataclass_fields__)}, got {raw!r}")
    for name, value in raw.items():
        if name.startswith("block_") and not (_is_pow2(value) and value >= 16):
            raise ValueError(f"{kind} tile {name}={value!r}: expected a power of two >= 16")
        if name == "num_warps" and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"{kind} tile num_warps={value!r}: expected 1, 2, 4, 8 or 16")
        if name == "num_stages" and not (isinstance(value, int) and 1 <= value <= 8):
            raise ValueError(f"{kind} tile num_stages={value!r}: expected 1..8")
    return cls(**raw)


def load_tuned(path: Path) -> dict[str, dict[str, Tile]]:
    """{device name: {tuned_key: tile}} from the cache file; {} (with a warning) when it is unusable.

    A missing file is the normal case and warns about nothing.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"cannot read tuned attention tiles {path}: {e}; using the built-in table", stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("devices"), dict):
            raise ValueError(f"expected {{'format': {_FORMAT}, 'devices': {{...}}}}")
        out: dict[str, dict[str, Tile]] = {}
        for dev, entries in data["devices"].items():
            if not isinstance(entries, dict):
                raise ValueError(f"device {dev!r}: expected an object of tiles")
            out[dev] = {}
            for key, raw in entries.items():
                _check_key(key)
                out[dev][key] = parse_tile(key.split("/", 1)[0], raw)
        return out
    except (ValueError, KeyError) as e:
        warnings.warn(f"ignoring the corrupt tuned attention tiles file {path} ({e}); using the built-in table",
                      stacklevel=2)
        return {}


def _check_key(key: str) -> None:
    parts = key.split("/")
    if (len(parts) != 3 or parts[0] not in KINDS or parts[1] not in ("64", "128", "256")
            or parts[2] not in ("bfloat16", "float16", "float32")):
        raise ValueError(f"bad tile key {key!r}: expected kind/head-dim bucket/dtype")


def save_tuned(path: Path, device: str, key: str, tile: Tile) -> None:
    """Record one tuned winner for ``device`` (merged into the file; written atomically)."""
    _check_key(key)
    existing = {dev: {k: asdict(t) for k, t in entries.items()} for dev, entries in load_tuned(path).items()}
    existing.setdefault(device, {})[key] = asdict(tile)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": _FORMAT, "devices": existing}, indent=2, sort_keys=True))
    os.replace(tmp, path)
    reset()


@functools.cache
def _tuned() -> dict[str, dict[str, Tile]]:
    return load_tuned(cache_path())


@functools.cache
def tile_for(kind: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> Tile:
    """The tile the kernels launch with: the device's tuned entry if cached, else the table. Memoized."""
    tuned = _tuned().get(device_name(device), {}).get(tuned_key(kind, head_dim, dtype))
    return tuned or table_tile(kind, capability_major(device), head_dim, dtype)


def reset() -> None:
    """Forget the memoized file and lookups (after writing the file, or in tests)."""
    _tuned.cache_clear()
    tile_for.cache_clear()
