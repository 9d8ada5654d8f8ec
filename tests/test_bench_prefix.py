"""The prefix bench: its traces and verdicts, and main() end to end at a tiny size on one CPU rank."""

from __future__ import annotations

import json

import pytest

from infinite.bench import prefix


def test_doc_trace_interleaves_questions_over_shared_documents():
    w = prefix.doc_trace(2, 40, 3, 5, 4, rate=10.0, vocab=(10, 100), seed=1)
    assert w == prefix.doc_trace(2, 40, 3, 5, 4, rate=10.0, vocab=(10, 100), seed=1)
    assert len(w) == 6 and sorted(x.kind for x in w) == ["doc0"] * 3 + ["doc1"] * 3
    by_doc = {}
    for x in w:
        assert len(x.prompt) == 45 and x.max_tokens == 4
        by_doc.setdefault(x.kind, set()).add(x.prompt[:40])
    assert all(len(docs) == 1 for docs in by_doc.values()), "every question of a document starts with it"
    assert by_doc["doc0"] != by_doc["doc1"]
    assert len({x.prompt[40:] for x in w}) == 6 and w[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(w, w[1:]))
    with pytest.raises(ValueError):
        prefix.doc_trace(0, 40, 3, 5, 4, rate=1.0, vocab=(10, 100), seed=1)


def test_noshare_trace_and_chat_turns():
    w = prefix.noshare_trace(5, (8, 12), (2, 3), 4.0, (10, 100), seed=2)
    assert len(w) == 5 and all(8 <= len(x.prompt) <= 12 and 2 <= x.max_tokens <= 3 for x in w)
    assert len({x.prompt[:8] for x in w}) == 5, "no two prompts share a first block"
    assert prefix.next_turn((1, 2), [3], (4, 5)) == (1, 2, 3, 4, 5)
    assert prefix.ratio(6.0, 2.0) == 3.0 and prefix.ratio(None, 2.0) is None and prefix.ratio(1.0, 0.0) is None


def test_verdicts_judge_only_what_ran():
    payload = {"doc": {"instances": {"1": {"ratios": {"ttft_p50": 6.0, "tokens_per_s": 1.5}}}},
               "remote": {"ratio_ttft_p50": None}}
    v = prefix.verdicts(payload)
    assert v["doc_ttft_p50"]["met"] and not v["doc_tokens_per_s"]["met"] and not v["remote_ttft_p50"]["met"]
    assert "noshare_tokens_per_s" not in v


def test_bad_flags():
    with pytest.raises(SystemExit):
        prefix.parse_args(["--parts", "doc,nope"])
    with pytest.raises(SystemExit):
        prefix.parse_args(["--instances", "3"])
    assert prefix.parse_args(["--quick"]).doc_tokens == 256


def test_main_end_to_end_on_one_rank(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    assert prefix.main(["--quick", "--parts", "doc", "--instances", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    on, off = res["doc"]["instances"]["1"]["on"], res["doc"]["instances"]["1"]["off"]
    assert on["served"] == off["served"] == 3
    assert on["hit_rate"] > 0.5 and off["hit_rate"] == 0.0  # 2 of 3 questions reuse the 256-token document
    assert set(res["targets"]) == {"doc_ttft_p50", "doc_tokens_per_s"}
    assert "(a) doc" in capsys.readouterr().out
