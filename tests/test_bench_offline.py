"""The offline bench at a tiny size, the bench dispatcher and the shared helpers."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from infinite.bench import __main__ as dispatcher
from infinite.bench import offline
from infinite.bench.common import format_table, write_json


def test_offline_main_tiny(tmp_path, capsys):
    out = tmp_path / "sub" / "offline.json"
    rc = offline.main(["--batch-sizes", "1,3", "--prompt-len", "6", "--max-tokens", "5", "--repeats", "2",
                       "--threads", "1", "--host-batch", "3", "--host-batch-context", "6",
                       "--host-contexts", "40", "--host-steps", "4", "--host-cold-mb", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Infinite tok/s" in printed and "transformers tok/s" in printed
    res = json.loads(out.read_text())
    assert res["bench"] == "offline"
    assert res["config"]["batch_sizes"] == [1, 3]
    assert res["config"]["prompt_len"] == 6 and res["config"]["max_tokens"] == 5
    assert set(res["env"]) >= {"torch", "device", "cpu_count", "git_commit", "torch_threads"}
    assert res["env"]["torch"] == torch.__version__
    assert [r["batch_size"] for r in res["results"]] == [1, 3]
    for r in res["results"]:
        b = r["batch_size"]
        for system in ("infinite", "transformers"):
            s = r[system]
            assert s["generated_tokens"] == b * 5
            assert len(s["seconds"]) == 2 and all(t > 0 for t in s["seconds"])
            assert s["tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["infinite"]["tokens_per_s"] / r["transformers"]["tokens_per_s"])
        assert r["greedy_agreement"] == 1.0  # float32 greedy: the engines must agree token for token
    assert res["results"][0]["target_ratio"] == 1.0 and res["results"][1]["target_ratio"] is None
    assert "host time per decode step" in printed
    assert [(h["batch"], h["context"], h["steps"], h["cold_mb"]) for h in res["host"]] == \
        [(3, 6, 4, 0), (1, 40, 4, 0), (1, 40, 4, 8)]  # the last: the control row with cold caches
    assert "8 MB touched" in printed and res["host_clock"] == "thread" and "per-thread CPU time" in printed
    for h in res["host"]:
        parts = h["schedule_ms"] + h["prepare_ms"] + h["postprocess_ms"]
        assert h["host_ms"] == pytest.approx(parts) and h["host_ms"] > 0 and h["forward_ms"] > 0
    assert res["results"][0]["meets_target"] == (res["results"][0]["ratio"] >= 1.0)


def test_offline_bad_flags():
    for bad in (["--batch-sizes", "0"], ["--batch-sizes", "a,2"], ["--max-tokens", "-1"], ["--prompt-len", "2,3"]):
        with pytest.raises(SystemExit):
            offline.parse_args(bad)
    assert offline.parse_args(["--batch-sizes", "1, 16"]).batch_sizes == [1, 16]


def test_offline_too_long_for_model(tmp_path):
    from infinite.runtime.engine import resolve_model_dir

    # From the model's own config: a hard-coded length silently turns into a full bench run
    # when the embedded model's context grows.
    ctx = offline.read_model_info(resolve_model_dir(None))["max_position_embeddings"]
    for flags in (["--prompt-len", str(ctx)], ["--prompt-lens", f"1:{ctx}"]):
        args = offline.parse_args([*flags, "--max-tokens", "1", "--out", ""])
        with pytest.raises(ValueError, match="context length"):
            offline.run(args)


def test_workload_helpers():
    p = offline.make_prompts(4, 7, vocab_size=10, exclude=[0, 1, 2], seed=3)
    assert len(p) == 4 and all(len(x) == 7 for x in p)
    assert all(3 <= t < 10 for x in p for t in x)
    assert p == offline.make_prompts(4, 7, vocab_size=10, exclude=[0, 1, 2], seed=3)
    ids, mask = offline.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert offline.agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.5
    with pytest.raises(ValueError):
        offline.agreement([[1]], [])


def test_common_table_and_json(tmp_path):
    text = format_table("t", ["a", "bb"], [[1, 2.5], [None, True]])
    lines = text.splitlines()
    assert lines[0] == "# t" and lines[1].split() == ["a", "bb"]
    assert lines[2].split() == ["1", "2.5"] and lines[3].split() == ["-", "yes"]
    with pytest.raises(ValueError, match="row 0"):
        format_table("t", ["a"], [[1, 2]])
    path = write_json(tmp_path / "x" / "r.json", {"k": 1})
    data = json.loads(path.read_text())
    assert data["k"] == 1 and data["env"]["cpu_count"] >= 1
    with pytest.raises(TypeError):
        write_json(tmp_path / "y.json", [1])  # type: ignore[arg-type]


def test_dispatcher(capsys, monkeypatch):
    assert dispatcher.main(["nope"]) == 2
    assert "unknown bench 'nope'" in capsys.readouterr().err
    assert dispatcher.main([]) == 2
    assert dispatcher.main(["--help"]) == 0
    assert "offline" in capsys.readouterr().out
    # a listed bench whose module is absent gives a clear message, not a traceback
    monkeypatch.setitem(sys.modules, "infinite.bench.cluster", None)  # makes the import fail as missing
    with pytest.raises(ValueError, match="bench .cluster. is not available"):
        dispatcher.load_bench("cluster")
    calls = []
    monkeypatch.setattr(offline, "main", lambda argv: calls.append(list(argv)) or 0)
    assert dispatcher.main(["offline", "--repeats", "1"]) == 0
    assert calls == [["--repeats", "1"]]


def test_mixed_prompt_lengths(tmp_path, capsys):
    p = offline.make_mixed_prompts(50, 3, 9, vocab_size=20, exclude=[0, 1], seed=5)
    lengths = [len(x) for x in p]
    assert min(lengths) >= 3 and max(lengths) <= 9 and len(set(lengths)) > 3  # really mixed
    assert all(2 <= t < 20 for x in p for t in x)
    assert p == offline.make_mixed_prompts(50, 3, 9, vocab_size=20, exclude=[0, 1], seed=5)
    with pytest.raises(ValueError):
        offline.make_mixed_prompts(2, 5, 4, vocab_size=20, exclude=[], seed=0)
    assert offline.parse_args(["--prompt-lens", "16:256"]).prompt_lens == (16, 256)
    for bad in (["--prompt-lens", "8"], ["--prompt-lens", "0:4"], ["--prompt-lens", "9:3"], ["--prompt-lens", "a:b"]):
        with pytest.raises(SystemExit):
            offline.parse_args(bad)
    out = tmp_path / "mixed.json"
    rc = offline.main(["--batch-sizes", "4", "--prompt-lens", "2:12", "--max-tokens", "3", "--repeats", "1",
                       "--threads", "1", "--no-host", "--out", str(out)])
    assert rc == 0
    assert "prompts uniform 2..12" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["config"]["prompt_lens"] == [2, 12]
    r = res["results"][0]
    assert 4 * 2 <= r["prompt_tokens"] <= 4 * 12
    assert r["infinite"]["generated_tokens"] == 4 * 3
    assert r["greedy_agreement"] == 1.0  # left padding must not change transformers' greedy tokens
