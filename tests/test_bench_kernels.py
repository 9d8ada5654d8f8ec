"""`python -m infinite.bench kernels` at a tiny size on CPU: every table, the JSON, the skip rule."""

from __future__ import annotations

import json

import pytest

from infinite.bench import kernels

TINY = ["--contexts", "48", "--batches", "1", "3", "--prefill", "40", "--op-tokens", "1", "5", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--hidden", "64"]


def test_kernels_bench_tiny(tmp_path, capsys):
    out = tmp_path / "k.json"
    # 3 requests of 48 tokens hold 18 KiB of float32 K/V: over a 16 KiB budget, so that case is skipped.
    assert kernels.main(TINY + ["--max-kv-gib", str(16 / 2**20), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("correctness against float64", "decode MicroAttention", "causal prefill", "fused ops"):
        assert title in printed
    res = json.loads(out.read_text())
    assert res["bench"] == "kernels" and res["device"] == "cpu" and res["env"]["device"] == "cpu"
    assert [c["case"] for c in res["correctness"]][:2] == ["decode, 1 split", "decode, 7 splits per row"]
    assert len(res["correctness"]) == 8 and all(c["ok"] for c in res["correctness"])
    assert [(r["context"], r["batch"]) for r in res["decode"]] == [(48, 1)]
    row = res["decode"][0]
    assert row["kv_bytes"] == 2 * 48 * 2 * 16 * 4 and row["timed"] == "cpu"
    assert row["ma_GBps"] * 1e9 * row["ma_us"] * 1e-6 == pytest.approx(row["kv_bytes"])
    assert row["max_diff_vs_sdpa"] < 1e-5  # the torch path and SDPA read the same keys
    assert res["skipped"] == [{"table": "decode", "context": 48, "batch": 3, "kv_bytes": 3 * 2 * 48 * 2 * 16 * 4,
                               "why": "over --max-kv-gib"}]
    (pre,) = res["prefill"]
    assert pre["tokens"] == 40 and pre["ma_ms"] > 0 and pre["sdpa_ms"] > 0
    assert pre["ma_TFLOPs"] * 1e12 * pre["ma_ms"] * 1e-3 == pytest.approx(4 * 4 * 16 * 40 * 41 / 2)
    assert [(r["op"], r["tokens"]) for r in res["ops"]] == [
        (op, t) for t in (1, 5) for op in ("rms_norm", "add_rms_norm", "rope_qkv_write")]
    assert all(r["fused_graph_us"] is None for r in res["ops"])  # no CUDA graphs on CPU
