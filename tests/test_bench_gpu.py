"""``python -m infinite.bench gpu``: its CPU smoke run (every part but the kernels and the graph replay)
and its refusal without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from infinite.bench import gpu


def test_no_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert gpu.main(["--out", ""]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cpu_smoke_run(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--device", "cpu", "--shape", "smoke", "--ckpt", str(tmp_path / "ckpt"), "--batches", "1,2",
                   "--context", "8", "--prefill", "40", "--max-num-batched-tokens", "64",
                   "--parts", "decode,busy,prefill,agree", "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert rc == 0, res["errors"]
    assert [r["batch"] for r in res["decode"]["graphs"]] == [1, 2] == [r["batch"] for r in res["decode"]["eager"]]
    assert all(r["step_ms"] > 0 and r["tok_s"] > 0 for r in res["decode"]["graphs"] + res["decode"]["eager"])
    assert res["decode"]["graphs_setup"]["graphs"] is None  # no capture on CPU
    assert res["busy"]["step_ms"] > 0
    (pre,) = res["prefill"]
    assert pre["tokens"] == 40 and pre["ratio"] == pytest.approx(pre["infinite_s"] / pre["transformers_sdpa_s"])
    assert res["agree"]["greedy_agreement"] == 1.0  # float32: the engines agree token for token
    assert "decode ms/step, batch 2" in printed and "greedy agreement" in printed
