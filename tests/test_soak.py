"""The soak benchmark as a short CI run: a rank killed under streaming load, a new one joining,
nothing lost, nothing leaked, no process left behind."""

from __future__ import annotations

import json

from infinite.bench import soak
from infinite.cluster.membership import DETECTION_BOUND_S


def test_classify_tells_ok_failed_mismatch_and_lost_apart():
    done = [{"choices": [{"text": "ab", "finish_reason": None}]}, {"choices": [{"text": "c", "finish_reason": "length"}]}]
    assert soak.classify(200, done, True, "abc", "abc") == ("ok", "")
    assert soak.classify(200, done, True, "abc", "abd") == ("mismatch", "different text")
    assert soak.classify(200, done[:1], True, "ab", "abc") == ("lost", "no normal end")
    assert soak.classify(200, done, False, "abc", "abc") == ("lost", "no [DONE]")
    aborted = [{"choices": [{"text": "ab", "finish_reason": "abort"}]}]
    assert soak.classify(200, aborted, True, "ab", "abc")[0] == "lost"  # cut short with no error: lost
    errored = done[:1] + [{"choices": [{"text": "", "finish_reason": "error"}]}, {"error": {"code": 503}}]
    assert soak.classify(200, errored, True, "ab", "abc") == ("failed", "error 503")
    assert soak.classify(503, [{"error": {"code": 503}}], True, "", "abc") == ("failed", "http 503")
    assert soak.text_of(soak.Job("p", 4, chat=False, stream=True), done) == "abc"


def test_soak_short_run_loses_nothing_and_leaks_nothing(tmp_path, capsys):
    out = tmp_path / "soak.json"
    code = soak.main(["--ranks", "3", "--duration", "8", "--kill-at", "2", "--join-at", "4", "--concurrency", "4",
                      "--prompts", "8", "--long-words", "200", "--num-kv-blocks", "16", "--out", str(out)])
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert code == 0, printed
    assert r["lost"] == 0 and r["blocks_leaked"] == 0 and r["orphans"] == []
    assert r["ok"] >= 4 and r["requests"] == r["ok"] + sum(r["failed"].values())
    assert r["kill_detected_after_s"] <= DETECTION_BOUND_S + 1.0
    assert r["health_after"]["status"] == "ok" and r["health_after"]["instances"] == 3  # the new rank replaced it
    assert [x["rank"] for x in r["health_after"]["lost"]] == [2]
    assert "requests" in printed and "blocks leaked" in printed and "rank memory MiB after" in printed
    cm = r["cost_model"]
    assert cm["looks"] >= 4 and "stayed calibrated to the end" in printed
    assert all(isinstance(x["calibrated"], bool) for x in cm["timeline"]), cm["timeline"]  # /status carries it
    assert cm["first_calibrated_s"] is None or cm["stayed_calibrated"], cm["timeline"]


def test_the_soak_says_whether_the_cost_model_stayed_calibrated():
    look = lambda t, c: {"t": t, "calibrated": c, "samples_remote": 8 if c else 0}  # noqa: E731
    stayed = soak.calibration_summary([look(1, False), look(2, True), look(3, True)])
    assert stayed["first_calibrated_s"] == 2 and stayed["stayed_calibrated"] and stayed["remote_samples_at_end"] == 8
    lapsed = soak.calibration_summary([look(1, True), look(2, False), look(3, True)])
    assert not lapsed["stayed_calibrated"] and lapsed["uncalibrated_looks_after_first"] == 1
    never = soak.calibration_summary([look(1, False)])
    assert never["first_calibrated_s"] is None and not never["stayed_calibrated"]
