"""Tile table lookup, the tuned-tiles cache file, and the autotuner (interpreted kernels, injected timer)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from infinite.attention.triton import autotune, tiles  # noqa: E402
from infinite.attention.triton.tiles import DecodeTile, PrefillTile  # noqa: E402


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private user cache dir; lookups forget what they memoized before and after."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tiles.reset()
    yield tmp_path / "infinite"
    tiles.reset()


def test_table_by_generation_head_dim_and_dtype():
    bf16, f32 = torch.bfloat16, torch.float32
    assert tiles.table_tile("prefill", 9, 128, bf16) == PrefillTile(128, 64, 8, 3)  # Hopper
    assert tiles.table_tile("decode", 9, 128, torch.float16) == DecodeTile(64, 4, 3)
    assert tiles.table_tile("prefill", 8, 128, bf16) == PrefillTile(64, 64, 4, 2)  # Ampere
    # An unlisted generation (Turing, Blackwell, the CPU interpreter) gets the safe default row.
    for cc in (7, 10, 0):
        assert tiles.table_tile("decode", cc, 128, bf16) == tiles.TABLE["decode", 0, 128, "bfloat16"]
    assert tiles.table_tile("decode", 9, 80, bf16) == tiles.table_tile("decode", 9, 128, bf16)  # padded to 128
    assert tiles.table_tile("decode", 9, 8, bf16) == tiles.table_tile("decode", 9, 64, bf16)
    assert tiles.table_tile("decode", 9, 128, f32).block_n < tiles.table_tile("decode", 9, 128, bf16).block_n
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        tiles.table_tile("decode", 9, 128, torch.float64)
    with pytest.raises(ValueError, match="kind"):
        tiles.table_tile("attention", 9, 128, bf16)


def test_cache_file_round_trip(cache_dir):
    cpu = torch.device("cpu")
    table = tiles.tile_for("decode", cpu, 64, torch.float32)
    assert table == tiles.table_tile("decode", 0, 64, torch.float32)  # no file: the table
    tuned = DecodeTile(16, 2, 5)
    tiles.save_tuned(tiles.cache_path(), "cpu", tiles.tuned_key("decode", 64, torch.float32), tuned)
    tiles.save_tuned(tiles.cache_path(), "NVIDIA H200", "prefill/128/bfloat16", PrefillTile(128, 128, 8, 3))
    assert tiles.cache_path() == cache_dir / tiles.CACHE_FILE
    data = json.loads(tiles.cache_path().read_text())
    assert data["devices"]["cpu"]["decode/64/float32"] == {"block_n": 16, "num_warps": 2, "num_stages": 5}
    assert tiles.load_tuned(tiles.cache_path())["NVIDIA H200"]["prefill/128/bfloat16"] == PrefillTile(128, 128, 8, 3)
    assert tiles.tile_for("decode", cpu, 64, torch.float32) == tuned  # save_tuned reset the memo
    assert tiles.tile_for("decode", cpu, 64, torch.bfloat16) == tiles.table_tile("decode", 0, 64, torch.bfloat16)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"format": 99, "devices": {}}),
    json.dumps({"format": 1, "devices": {"cpu": {"decode/64/float32": {"block_n": 48, "num_warps": 4,
                                                                        "num_stages": 2}}}}),
    json.dumps({"format": 1, "devices": {"cpu": {"decode/64/float32": {"block_n": 64}}}}),
    json.dumps({"format": 1, "devices": {"cpu": {"decode/96/float32": {"block_n": 64, "num_warps": 4,
                                                                        "num_stages": 2}}}}),
])
def test_corrupt_cache_falls_back_to_the_table_with_a_warning(cache_dir, content):
    cache_dir.mkdir(parents=True)
    tiles.cache_path().write_text(content)
    with pytest.warns(UserWarning, match="corrupt tuned attention tiles"):
        got = tiles.tile_for("decode", torch.device("cpu"), 64, torch.float32)
    assert got == tiles.table_tile("decode", 0, 64, torch.float32)
    # A later save replaces the corrupt file with a valid one (saying what it drops).
    with pytest.warns(UserWarning, match="corrupt tuned attention tiles"):
        tiles.save_tuned(tiles.cache_path(), "cpu", "decode/64/float32", DecodeTile(32, 4, 1))
    assert tiles.tile_for("decode", torch.device("cpu"), 64, torch.float32) == DecodeTile(32, 4, 1)


def test_candidates_are_valid_tiles():
    for kind, make in (("decode", autotune.decode_candidates), ("prefill", autotune.prefill_candidates)):
        for d, dt in ((128, torch.bfloat16), (256, torch.float16), (64, torch.float32)):
            cands = make(d, dt)
            assert len(cands) == len(set(cands)) >= 12
            for c in cands:
                assert tiles.parse_tile(kind, c.__dict__) == c


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_autotune_picks_the_fastest_correct_tile_and_caches_it(cache_dir, monkeypatch, kind):
    """The interpreter runs each candidate for real; the injected timer makes the 32-key tiles fastest;
    a tile whose output is wrong (simulated) is rejected, never cached."""
    dev = torch.device("cpu")
    if kind == "decode":
        q, k, v, meta = autotune.decode_problem(2, 70, 4, 2, 16, 16, torch.float32, dev)
        cands = [DecodeTile(16, 4, 1), DecodeTile(32, 4, 1), DecodeTile(64, 4, 1)]
    else:
        q, k, v, meta = autotune.prefill_problem(40, 4, 2, 16, 16, torch.float32, dev)
        cands = [PrefillTile(32, 16, 4, 1), PrefillTile(32, 32, 4, 1), PrefillTile(64, 32, 4, 1)]
    current = {}
    real = autotune.decode_attention if kind == "decode" else autotune.prefill_attention

    def spy(*a, tile, **kw):
        current["tile"] = tile
        out, lse = real(*a, tile=tile, **kw)
        if tile == cands[0]:
            out = out + 1.0  # a miscompiled candidate
        return out, lse

    monkeypatch.setattr(autotune, f"{kind}_attention", spy)
    result = autotune.autotune(kind, q, k, v, meta, candidates=cands,
                               timer=lambda fn: (fn(), 1.0 if current["tile"].block_n == 32 else 2.0)[1])
    assert cands[0] in result.rejected and "differs" in result.rejected[cands[0]]
    assert result.winner.block_n == 32 and result.seconds[result.winner] == 1.0
    assert result.table in result.seconds  # the table tile always competes
    assert tiles.tile_for(kind, dev, 16, torch.float32) == result.winner
