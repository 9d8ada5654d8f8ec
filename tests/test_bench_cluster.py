"""The cluster bench: its pure helpers, and main() end to end at a tiny size on 2 CPU ranks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from infinite.bench import cluster
from infinite.bench.workload import TRACES, Record, decode_ms_per_token, make_workload, percentile, summarize


def test_workload_is_seeded_poisson_with_long_requests_spread():
    kw = dict(long_prompt=(50, 60), long_output=(5, 5), short_prompt=(3, 8), short_output=(2, 4), rate=20.0,
              vocab=(10, 100))
    w = make_workload(2, 8, seed=3, **kw)
    assert w == make_workload(2, 8, seed=3, **kw)
    assert w != make_workload(2, 8, seed=4, **kw)
    assert [x.kind for x in w].count("long") == 2 and w[0].kind == "long" and w[5].kind == "long"
    assert w[0].arrival_s == 0.0 and all(a.arrival_s < b.arrival_s for a, b in zip(w, w[1:]))
    assert len({x.request_id for x in w}) == 10
    for x in w:
        lo, hi = kw["long_prompt"] if x.kind == "long" else kw["short_prompt"]
        assert lo <= len(x.prompt) <= hi and all(10 <= t < 100 for t in x.prompt)
    big = make_workload(0, 4000, (1, 1), (1, 1), (1, 1), (1, 1), rate=50.0, vocab=(10, 11), seed=0)
    assert big[-1].arrival_s / 3999 == pytest.approx(1 / 50, rel=0.1)  # mean gap 1/rate
    with pytest.raises(ValueError, match="rate"):
        make_workload(1, 1, seed=0, **{**kw, "rate": 0.0})
    with pytest.raises(ValueError, match="need some requests"):
        make_workload(0, 0, seed=0, **kw)


def test_percentile_and_summary():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    recs = [
        Record("a", "short", 5, 4, submitted=100.0, first_token=100.5, finished=102.0, output_tokens=4),
        Record("b", "long", 50, 8, submitted=101.0, first_token=103.0, finished=110.0, output_tokens=8),
        Record("c", "long", 500, 8, rejected=True, error="too long"),
        Record("d", "short", 5, 4, submitted=101.5, error="lost"),
    ]
    s = summarize(recs)
    assert (s["served"], s["rejected"], s["failed"], s["unfinished"]) == (2, 1, 1, 0)
    assert s["generated_tokens"] == 12 and s["makespan_s"] == 10.0 and s["tokens_per_s"] == 1.2
    assert s["ttft_s"]["mean"] == pytest.approx(1.25) and s["e2e_s"]["p50"] == pytest.approx(5.5)
    assert s["by_kind"]["long"] == {"total": 2, "served": 1, "rejected": 1,
                                    "ttft_s": {"mean": 2.0, "p50": 2.0, "p99": 2.0},
                                    "e2e_s": {"mean": 9.0, "p50": 9.0, "p99": 9.0}}


def test_decode_latency_and_bad_flags():
    out = SimpleNamespace(request_id="r", outputs=[SimpleNamespace(token_ids=[1, 2, 3, 4, 5])],
                          metrics=SimpleNamespace(first_token_time=10.0, finished_time=10.2))
    assert decode_ms_per_token(out) == pytest.approx(50.0)
    out.outputs[0].token_ids = [1]
    with pytest.raises(ValueError, match=">= 2 tokens"):
        decode_ms_per_token(out)
    for bad in (["--decode-tokens", "1"], ["--modes", "on,sideways"], ["--short-prompt", "9-3"], ["--rate", "0"]):
        with pytest.raises(SystemExit):
            cluster.parse_args(bad)
    assert cluster.parse_args(["--short-prompt", "4-9", "--modes", "on"]).short_prompt == (4, 9)
    # a mode named twice runs twice: the A/A control beside the ratio being judged
    assert cluster.parse_args(["--modes", "on,off-routed,off-routed"]).modes == ["on", "off-routed", "off-routed#2"]
    args = cluster.parse_args(["--trace", "long", "--rate", "3"])
    assert (args.num_long, args.pool_blocks, args.rate) == (TRACES["long"].num_long, TRACES["long"].pool_blocks, 3.0)
    # each named trace says what it is, and its long requests fit one pool or not as it says
    for t in TRACES.values():
        assert t.about and t.rate > 0
    assert TRACES["long"].long_prompt[0] > TRACES["long"].pool_blocks * 16
    assert TRACES["mixed-saturated"].long_prompt[1] + TRACES["mixed-saturated"].long_output[1] < 96 * 16


def test_cluster_bench_main_tiny(tmp_path, capsys):
    out = tmp_path / "cluster.json"
    rc = cluster.main([
        "--context", "200", "--decode-tokens", "6", "--repeats", "1",
        "--modes", "on,off-routed,round-robin", "--pool-blocks", "16", "--num-long", "1", "--num-short", "5",
        "--long-prompt", "300", "--long-output", "8", "--short-prompt", "8-16", "--short-output", "4-6",
        "--rate", "40", "--timeout", "60", "--out", str(out),
        "--contexts", "64,1024", "--context-steps", "3", "--context-warmup", "2", "--context-repeats", "1",
        "--context-cold-mb", "8",
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "(0) remote MicroAttention round trip" in printed and "(a) decode latency" in printed and "(b) trace" in printed and "tokens/s on/off-routed" in printed
    assert "(e) a decode step's host work" in printed
    res = json.loads(out.read_text())
    assert res["bench"] == "cluster" and {"torch", "cpu_count", "git_commit"} <= set(res["env"])

    rt = res["roundtrip"]
    for plane in ("p2p", "rpc"):
        assert rt[plane]["probes"] == 20 and 0 < rt[plane]["min_us"] <= rt[plane]["median_us"] <= rt[plane]["p90_us"]
    assert rt["rpc_over_p2p"] == pytest.approx(rt["rpc"]["median_us"] / rt["p2p"]["median_us"])

    a = res["split"]
    assert a["config"]["request_blocks"] == 13  # 206 tokens in blocks of 16
    assert a["one"]["kv_blocks"] == [{next(iter(a["one"]["kv_blocks"][0])): 13}]  # all on one rank
    split_kv = a["split"]["kv_blocks"][0]
    assert set(split_kv) == {"0", "1"} and sum(split_kv.values()) == 13 and min(split_kv.values()) >= 6
    assert a["same_tokens"] is True  # float32 greedy: splitting the KV must not change a token
    assert a["one"]["remote_calls"] == 0 and a["split"]["remote_calls"] >= 4 * 5  # 4 layers x 5 decode steps
    # decode steps are counted apart from the prefill's chunks: a decode step of a request on 2
    # ranks calls its one creditor once per layer
    assert a["split"]["remote_calls"] > a["split"]["decode_remote_calls"] > 0
    assert a["split"]["remote_calls_per_decode_step"] == pytest.approx(4.0, abs=0.5)
    assert a["split"]["creditor_ms_per_call"] > 0 and a["one"]["creditor_ms_per_call"] == 0
    for cfg in ("one", "split"):
        assert all(0 < t < 5000 for t in a[cfg]["ms_per_token"])
    assert a["ratio"] == pytest.approx(a["split"]["median_ms_per_token"] / a["one"]["median_ms_per_token"])
    assert a["meets_target"] == (a["ratio"] <= 1.3)

    b = res["mixed"]
    rr, routed, on = b["modes"]["round-robin"], b["modes"]["off-routed"], b["modes"]["on"]
    assert sum(on["requests_by_home"].values()) == on["served"] and set(on["tokens_by_home"]) <= {"0", "1"}
    # The long request (19 blocks) is larger than one 16-block pool: only lending can serve it.
    for off in (rr, routed):
        assert (off["served"], off["rejected"]) == (5, 1) and off["by_kind"]["long"]["rejected"] == 1
    assert (on["served"], on["rejected"]) == (6, 0) and on["by_kind"]["long"]["served"] == 1
    assert set(on["long_kv_blocks"]["long-0"]) == {"0", "1"}  # its KV really spans both instances
    for s in (rr, routed, on):
        assert s["failed"] == 0 and s["unfinished"] == 0
        assert s["makespan_s"] > 0 and s["tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["makespan_s"])
        assert 0 <= s["ttft_s"]["p50"] <= s["ttft_s"]["p99"] <= s["e2e_s"]["p99"] < 60
    assert on["generated_tokens"] == rr["generated_tokens"] + 8 == routed["generated_tokens"] + 8
    assert b["ratios"]["on/off-routed"] == pytest.approx(on["tokens_per_s"] / routed["tokens_per_s"])
    assert b["ratios"]["on/round-robin"] == pytest.approx(on["tokens_per_s"] / rr["tokens_per_s"])
    assert b["no_regret"] == (b["ratios"]["on/off-routed"] >= 0.95)

    e = res["context"]
    assert e["config"]["contexts"] == [64, 1024] and set(e["cases"]) == {"stream", "final", "final-cold"}
    for mode, by_ctx in e["cases"].items():
        lo, hi = by_ctx["64"], by_ctx["1024"]
        assert lo["steps"] == hi["steps"] == 3 and 0 < lo["host_ms"] and 0 < hi["host_ms"]
        assert e["ratios"][mode] == pytest.approx(hi["host_ms"] / lo["host_ms"])
        for case in (lo, hi):  # a steady decode step tells each creditor only its request's header
            assert case["meta_bytes_per_creditor"] == {"1": 64 + 6 * 8, "2": 64 + 6 * 8}
            assert case["bytes_per_creditor"]["1"] == 64 + 6 * 8 + 4 * 8 * 64 * 4  # + 4 layers of [1, 8, 64] f32
        # the first step sends each creditor the request's whole rows there: a third of its blocks each
        assert hi["first_step_meta_bytes"]["1"] > lo["first_step_meta_bytes"]["1"]
    assert e["cases"]["final"]["1024"]["outputs_bytes"] < e["cases"]["stream"]["1024"]["outputs_bytes"]
    hp = e["host_path_us"]
    for k in ("warm", "cold"):
        assert set(hp[k]) == {"64", "1024"} and all(v > 0 for v in hp[k].values())
        assert hp["ratios"][k] == pytest.approx(hp[k]["1024"] / hp[k]["64"])


def test_cluster_bench_sp_prefill_tiny(tmp_path, capsys):
    """The sp-prefill part, small: every group size and both modes of the mixed trace run, the first
    token is the same whatever the group, and the trace's long prompts ran on groups only there."""
    out = tmp_path / "sp.json"
    rc = cluster.main(["--part", "sp-prefill", "--sp-prompt", "600", "--sp-ranks", "1,2", "--sp-hidden", "128",
                       "--sp-intermediate", "256", "--sp-budget", "128", "--sp-mixed-long", "2",
                       "--sp-mixed-short", "6", "--sp-mixed-long-prompt", "400", "--sp-mixed-rate", "30", "--sp-repeats", "2",
                       "--timeout", "60", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sp-prefill: TTFT of one 600-token prompt" in printed and "sp-prefill mixed" in printed
    r = json.loads(out.read_text())["sp_prefill"]
    assert r["same_token"] and set(r["single"]) == {"1", "2"}
    one, two = r["single"]["1"], r["single"]["2"]
    assert one["group"] is None and two["group"]["members"] == [0, 1] and two["group"]["outcome"] == "done"
    assert two["ratio_to_one"] == pytest.approx(two["ttft_s"] / one["ttft_s"]) and two["target"] == 0.6
    assert len(two["ttft_runs_s"]) == 2 and two["ttft_s"] == min(two["ttft_runs_s"]) and two["parallel_capacity"] > 0
    assert len(one["cpu_s"]) == 1 and len(two["cpu_s"]) == 2 and min(two["cpu_s"]) > 0
    assert two["cpu_ratio_to_one"] == pytest.approx(max(two["cpu_s"]) / one["cpu_s"][0])
    m = r["mixed"]
    assert m["alone"]["groups_done"] == 0 and m["groups"]["groups_done"] >= 1
    assert m["alone"]["served"] == m["groups"]["served"] == 8
