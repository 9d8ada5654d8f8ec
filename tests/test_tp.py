"""Tensor-parallel instances: the shard arithmetic, the step broadcast and its table mirror, block
reads across the group's heads, device placement (pure, in-process); then groups of CPU ranks
(gloo) against one rank: the model's logits, the engine's tokens, a cluster of two TP2 instances
with a request whose KV spans both, and the weight memory of a rank."""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import numpy as np
import openai
import pytest
import torch
from hypothesis import given, settings

from helpers_hf import make_hf_checkpoint
from helpers_tp import greedy, run_group, weight_bytes
from test_cluster import migrate_midway
from test_input_batch import OPS, RANK, _req, apply_op
from test_launch import assert_all_exit, in_thread, kill_all, start, wait_ready
from infinite import LLM, SamplingParams
from infinite.bench.procs import descendants, free_port, get_json, rank_of, tp_rank_of
from infinite.cluster.devices import check_gpus, rank_device
from infinite.cluster.remote_attention import RemoteWire
from infinite.cluster.step_runner import MicroBatch
from infinite.cluster import messages as M
from infinite.cluster.tp_commands import get_remote, put_remote
from infinite.kv.rmanager import RBlock, RManager
from infinite.model.config import ModelConfig
from infinite.model.loader import load_model
from infinite.model.parallel import check_divisible, kv_layout, local_config, shard_of
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import resolve_model_dir
from infinite.runtime.input_batch import InputBatch
from infinite.runtime.model_runner import prepare_inputs
from infinite.runtime.request import Request
from infinite.runtime.tp import (MirrorBatch, PayloadReader, PayloadWriter, get_step, merge_heads, put_step,
                                 put_table_changes, split_heads)

CPU = torch.device("cpu")


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=301, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
                head_dim=8)
    return ModelConfig(**{**base, **kw})


# ---- the shard arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shards_cover_the_model_once_and_replicate_kv_heads_only_below_tp(tp):
    cfg = _cfg()
    shards = [shard_of(cfg, r, tp) for r in range(tp)]
    heads = [h for s in shards for h in range(*s.heads)]
    assert heads == list(range(8))  # every query head once, in order
    assert [i for s in shards for i in range(*s.intermediate)] == list(range(128))
    vocab = [v for s in shards for v in range(*s.vocab)]
    assert vocab[:301] == list(range(301)) and len(vocab) == tp * shards[0].vocab_per_rank < 301 + tp
    group = 8 // 2  # query heads per KV head
    for s in shards:
        lo, hi = s.kv_heads
        assert all(lo <= h // group < hi for h in range(*s.heads)), "a rank holds the KV heads its queries use"
        assert hi - lo == max(1, 2 // tp)
    kv = [s.kv_heads for s in shards]
    assert sorted(set(kv)) == [(0, 1), (1, 2)] if tp >= 2 else kv == [(0, 2)]
    local = local_config(cfg, shards[0])
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (8 // tp, max(1, 2 // tp), 128 // tp)
    assert (local.hidden_size, local.vocab_size, local.num_layers) == (64, 301, 2)


@pytest.mark.parametrize("kw,tp,match", [
    (dict(), 3, "does not divide the model's 8 attention heads"),
    (dict(num_kv_heads=4, num_heads=12), 6, "KV heads: one must divide the other"),
    (dict(intermediate_size=100), 8, "intermediate_size 100"),
])
def test_a_model_the_group_cannot_split_is_refused_with_the_numbers(kw, tp, match):
    with pytest.raises(ValueError, match=match):
        check_divisible(_cfg(**kw), tp)
    with pytest.raises(ValueError, match=match):
        shard_of(_cfg(**kw), 0, tp)


def test_block_contents_split_by_heads_and_merge_back():
    x = torch.randn(2, 3, 4, 2, 5)  # [L, n, B, nkv=2, d]
    for tp in (1, 2, 4):
        layout = kv_layout(2, tp)
        parts = split_heads(x, layout)
        assert [p.shape[3] for p in parts] == [hi - lo for lo, hi in layout]
        assert torch.equal(merge_heads(parts, layout), x)
    # replicated heads: the merge takes each head once (the first rank that holds it)
    parts = split_heads(x, kv_layout(2, 4))
    parts[1] = parts[1] + 100  # a replica that disagrees is not read
    assert torch.equal(merge_heads(parts, kv_layout(2, 4)), x)


# ---- devices -----------------------------------------------------------------------------------------


def test_rank_processes_get_a_gpu_each_or_a_clear_error():
    assert [rank_device(None, r, 4, 8) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert rank_device("cuda", 2, 4, 4) == "cuda:2"
    assert rank_device(None, 3, 4, 0) == "cpu" and rank_device("cpu", 7, 64, 1) == "cpu"
    assert rank_device("cuda:3", 0, 1, 4) == "cuda:3"
    with pytest.raises(ValueError, match=r"2 rank processes on this host need a GPU each, but it has 1 GPU: "
                                         r"lower --num-instances or --tensor-parallel-size.*--device cpu"):
        rank_device(None, 0, 2, 1)
    with pytest.raises(ValueError, match="has no GPU"):
        check_gpus(1, 0)
    with pytest.raises(ValueError, match="names one GPU for 2 rank processes"):
        rank_device("cuda:1", 0, 2, 4)


def test_a_host_with_fewer_gpus_than_rank_processes_is_refused_before_any_starts(monkeypatch, capsys):
    """LLM(num_instances=2) and infinite serve --num-instances 2 on a one-GPU host: a clear error, no rank
    started (before: every rank took cuda:0 and the second died out of memory)."""
    from infinite import cli
    from infinite.cluster import devices, local, spawn

    monkeypatch.setattr(devices, "host_gpus", lambda: 1)
    for module in (spawn, local):
        monkeypatch.setattr(module, "spawn_ranks", lambda *a, **k: pytest.fail("ranks were started"))
    with pytest.raises(ValueError, match="2 rank processes on this host need a GPU each, but it has 1 GPU"):
        LLM(num_instances=2)
    with pytest.raises(ValueError, match="4 rank processes on this host need a GPU each"):
        LLM(num_instances=2, tensor_parallel_size=2)
    assert cli.main(["serve", "--num-instances", "2", "--port", "0"]) == 2
    assert "need a GPU each, but it has 1 GPU" in capsys.readouterr().err


def test_tensor_parallel_config_is_validated():
    assert EngineConfig(tensor_parallel_size=2, num_instances=3).num_processes == 6
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
            EngineConfig(tensor_parallel_size=bad)
    with pytest.raises(ValueError, match="needs the point-to-point data plane"):
        EngineConfig(tensor_parallel_size=2, data_plane="rpc")


# ---- the step broadcast ----------------------------------------------------------------------------


def _payload(fill) -> PayloadReader:
    w = PayloadWriter()
    fill(w)
    return PayloadReader(w.build(CPU))


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_mirror_tables_equal_the_first_ranks_after_any_changes(ops):
    """Joins, growth, borrowed blocks, migrations, shrinking and leaves in any order: after each step's
    diff the other rank's tables equal the first rank's, and the diff is O(rows + changed entries)."""
    rm = RManager(RANK, 64, 4)
    ib = InputBatch(rm, max_rows=6, max_blocks=64, device=CPU)
    ib.mirror_rows, ib.mirror_cells = set(), []
    mirror = MirrorBatch(RANK, 6, 64, 4, CPU)
    reqs = [_req(i) for i in range(6)]
    remote_ids = iter(range(1000, 10**6))
    for op, i, n in ops:
        scheduled = apply_op(rm, reqs, op, i, n, remote_ids)
        if scheduled is None:
            continue
        ib.sync(scheduled)
        rows, cells = set(ib.mirror_rows), list(ib.mirror_cells)
        r = _payload(lambda w: put_table_changes(w, ib))
        k = ib.num_rows
        whole = sum(2 + 2 * int(ib.nb_np[row]) for row in rows if row < k)
        assert r.host.size <= 3 + whole + 4 * len(cells) + k
        mirror.apply(r)
        assert r.done and mirror.num_rows == k
        np.testing.assert_array_equal(mirror.nb_np, ib.nb_np)
        for row in range(k):
            m = int(ib.nb_np[row])
            np.testing.assert_array_equal(mirror.bt_np[row, :m], ib.bt_np[row, :m])
            np.testing.assert_array_equal(mirror.bi_np[row, :m], ib.bi_np[row, :m])


def test_a_step_with_no_table_change_sends_only_its_rows_counts():
    rm = RManager(RANK, 4096, 16)
    ib = InputBatch(rm, max_rows=4, max_blocks=4096, device=CPU)
    ib.mirror_rows, ib.mirror_cells = set(), []
    reqs = [_req(i) for i in range(3)]
    for q in reqs:
        rm.allocate(q.request_id, 1000)
    ib.sync(reqs)
    assert _payload(lambda w: put_table_changes(w, ib)).host.size == 3 + 3 * (2 + 2000) + 3  # joined: whole rows
    ib.sync(reqs)
    assert _payload(lambda w: put_table_changes(w, ib)).host.size == 3 + 3  # 3000 blocks held, 6 ints sent
    rm.allocate("r1", 1)
    ib.sync(reqs)
    assert _payload(lambda w: put_table_changes(w, ib)).host.size == 3 + 4 + 3  # one cell
    for q in reqs:
        q.num_computed_tokens = q.num_tokens - 1
    ib.sync(reqs)
    decode = prepare_inputs(ib, {q.request_id: 1 for q in reqs}, CPU)
    sent = _payload(lambda w: (put_table_changes(w, ib), put_step(w, decode))).host.size
    assert sent == 8 + 6 * 3  # a decode step of n rows: 8 + 6n int64s (docs/distributed.md)


def _batch(remote: bool):
    """A persistent batch of three requests (one prefill chunk, two decodes), some blocks on rank 1."""
    rm = RManager(RANK, 64, 4)
    ib = InputBatch(rm, max_rows=8, max_blocks=16, device=CPU)
    ib.mirror_rows, ib.mirror_cells = set(), []
    reqs = []
    for i, (plen, done) in enumerate([(11, 0), (6, 5), (9, 8)]):
        q = Request(f"r{i}", list(range(10 + i, 10 + i + plen)), SamplingParams(), max_tokens=20)
        q.num_computed_tokens = done
        if remote and i:
            rm.append_remote(q.request_id, [RBlock(1, 40 + i)])
            rm.allocate(q.request_id, -(-plen // 4) - 1)
        else:
            rm.allocate(q.request_id, -(-plen // 4))
        reqs.append(q)
    ib.sync(reqs)
    return ib, reqs, {q.request_id: q.num_tokens - q.num_computed_tokens for q in reqs}


def test_step_inputs_travel_whole():
    ib, reqs, num_new = _batch(remote=False)
    mirror = MirrorBatch(RANK, 8, 16, 4, CPU)
    for rows in (None, [2, 0]):  # the whole batch (views), and a micro-batch's rows (gathered)
        inputs = prepare_inputs(ib, num_new, CPU, rows=rows)
        r = _payload(lambda w: (put_table_changes(w, ib), put_step(w, inputs)))
        mirror.apply(r)
        got = get_step(r, mirror)
        assert r.done
        for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
            assert torch.equal(getattr(got, name), getattr(inputs, name)), name
        for name in ("cu_q", "q_pos", "block_tables", "block_idx", "num_blocks", "decode_rows", "prefill_rows"):
            a, b = getattr(got.meta, name), getattr(inputs.meta, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert (got.q_lens, got.rows, got.max_position) == (inputs.q_lens, inputs.rows, inputs.max_position)
        assert got.meta.max_q_len == inputs.meta.max_q_len and got.meta.max_prefill_q_len == inputs.meta.max_prefill_q_len


def test_micro_batches_with_remote_parts_travel_whole():
    ib, reqs, num_new = _batch(remote=True)
    mirror = MirrorBatch(RANK, 8, 16, 4, CPU)
    mbs = []
    wire = RemoteWire(RANK)
    for gi, rows in enumerate(([1, 2], [0])):
        inputs = prepare_inputs(ib, num_new, CPU, rows=rows)
        parts = wire.parts(ib, inputs.rows, inputs.q_lens, inputs.q_starts)
        mbs.append(MicroBatch(inputs, parts, M.StepKey(RANK, 7, gi)))
    assert mbs[0].parts and not mbs[1].parts
    mbs[0].parts[0].meta.drop.append(12345)  # dropped handles travel too
    r = _payload(lambda w: (put_table_changes(w, ib), put_remote(w, mbs)))
    mirror.apply(r)
    got = get_remote(r, mirror)
    assert r.done and [g.key for g in got] == [m.key for m in mbs]
    for g, m in zip(got, mbs):
        assert torch.equal(g.inputs.input_ids, m.inputs.input_ids) and torch.equal(g.inputs.meta.block_tables,
                                                                                  m.inputs.meta.block_tables)
        assert len(g.parts) == len(m.parts)
        for a, b in zip(g.parts, m.parts):
            assert a.creditor == b.creditor and a.meta == b.meta
            for name in ("rows", "write_rows", "write_slots"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


# ---- groups of CPU ranks ------------------------------------------------------------------------------


PROMPT = [5 + (7 * i) % 250 for i in range(40)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("tp")
    return {
        "tiny": resolve_model_dir(None),
        # 2 KV heads for 4 query heads: replicated on TP4; biases everywhere (the row-parallel ones on the
        # first rank only); a vocabulary of 302 rows that 4 ranks split with padding
        "gqa_bias": str(make_hf_checkpoint(base / "a", "llama_gqa", attention_bias=True, mlp_bias=True,
                                           vocab_size=302, max_position_embeddings=1024)),
        "qwen2_tied": str(make_hf_checkpoint(base / "b", "qwen2")),  # tied embeddings: lm_head is the vocab shard
    }


@pytest.mark.parametrize("kind,tp", [("tiny", 2), ("tiny", 4), ("gqa_bias", 4), ("qwen2_tied", 2)])
def test_tp_logits_and_greedy_tokens_equal_one_rank(ckpts, tmp_path, kind, tp):
    """float32: each TP group's logits within 1e-5 of one rank's over a prefill and 7 decode steps, the
    same greedy tokens; every rank's weights take their share of the bytes (measured on the storages:
    a shard that kept a view of the whole tensor would count whole)."""
    ckpt = ckpts[kind]
    torch.set_num_threads(1)
    model = load_model(ckpt, dtype=torch.float32)
    ref_tokens, ref_logits = greedy(model, PROMPT, 8)
    out = tmp_path / "tp.pt"
    run_group(ckpt, tp, out, PROMPT, 8)
    got = torch.load(out)
    assert got["tokens"] == ref_tokens
    assert (got["logits"] - ref_logits).abs().max().item() <= 1e-5
    cfg = model.config
    full = weight_bytes(model)
    replicated = sum(p.nbytes for n, p in model.named_parameters() if n.endswith("norm.weight"))
    kv_weights = 2 * cfg.num_layers * cfg.kv_size * (cfg.hidden_size + cfg.attention_bias) * 4
    kv_share = max(1, cfg.num_kv_heads // tp) / cfg.num_kv_heads  # a KV head on tp/nkv ranks when nkv < tp
    vocab_tensors = 1 if cfg.tie_word_embeddings else 2
    vocab = vocab_tensors * cfg.vocab_size * cfg.hidden_size * 4
    vocab_rank = vocab_tensors * -(-cfg.vocab_size // tp) * cfg.hidden_size * 4  # rows padded to tp equal parts
    row_bias = (cfg.o_proj_bias + cfg.mlp_bias) * cfg.num_layers * cfg.hidden_size * 4  # on the first rank
    for r in range(tp):
        have = torch.load(f"{out}.rank{r}")["bytes"]
        want = (full - replicated - kv_weights - row_bias - vocab) / tp + replicated + kv_weights * kv_share
        want += row_bias * (r == 0) + vocab_rank
        assert abs(have - want) <= 4 * tp, (r, have, want)
        if kind == "tiny" and tp == 2:  # the plain case: half the model, give or take the norms and a padding row
            assert abs(have - full / 2) <= replicated / 2 + 2 * cfg.hidden_size * 4


def test_tp_engine_tokens_equal_one_rank(ckpts):
    """LLM(tensor_parallel_size=4) on a GQA checkpoint (KV heads replicated), a batch with chunked
    prefills: the same greedy tokens as one rank."""
    ckpt = ckpts["gqa_bias"]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (70, 5, 33)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    common = dict(model=ckpt, dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=48)
    ref = [o.outputs[0].token_ids for o in LLM(**common).generate(prompts, params, use_tqdm=False)]
    with LLM(**common, tensor_parallel_size=4, threads_per_rank=1) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        procs = llm.engine.procs
        assert len(procs) == 4
    deadline = time.monotonic() + 30
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p.returncode for p in procs] == [0] * 4  # the first rank stopped its group: clean exits


def test_two_tp2_instances_serve_a_request_whose_kv_spans_both_and_move_it(ckpts):
    """Two instances of two ranks each: a prompt larger than a pool borrows blocks on the other group
    (rank i attends over its heads of them with rank i of the creditor), then a request's blocks migrate
    there (whole blocks gathered from every rank's heads, scattered to the creditor's ranks) and, with
    room at home, back: every token is one instance's."""
    ckpt = ckpts["gqa_bias"]
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, 300) for _ in range(300)]  # 20 blocks with its outputs: a pool holds 16
    shorts = [[rng.randrange(3, 300) for _ in range(n)] for n in (3, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    moving = SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True)
    single = LLM(model=ckpt, dtype="float32", device="cpu", num_kv_blocks=256)
    ref = [o.outputs[0].token_ids for o in single.generate([long_prompt] + shorts, params, use_tqdm=False)]
    ref_moved = single.generate([long_prompt[:150]], moving, use_tqdm=False)[0].outputs[0].token_ids
    with LLM(model=ckpt, dtype="float32", device="cpu", num_instances=2, tensor_parallel_size=2, num_kv_blocks=16,
             threads_per_rank=1) as llm:
        outs = llm.generate([long_prompt] + shorts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == ref
        held = outs[0].extra["kv_blocks"]
        assert set(held) == {0, 1} and sum(held.values()) == 20, held
        stats = llm.stats()
        assert [s["rank"] for s in stats] == [0, 1] and sum(s["remote_calls"] for s in stats) > 0
        assert all(s["used_blocks"] == s["lent_blocks"] == 0 and s["free_blocks"] == 16 for s in stats)

        home, done = migrate_midway(llm.engine, long_prompt[:150], moving)  # 15 blocks at the end: fits home
        assert done[0].outputs[0].token_ids == ref_moved
        stats = llm.stats()
        assert stats[home]["migrations"] >= 1 and stats[home]["migrated_blocks"] >= 6
        assert all(s["used_blocks"] == s["lent_blocks"] == 0 for s in stats)


def test_serve_tp2_instances_streams_to_the_openai_client_and_survives_a_rank_killed():
    """``infinite serve --tensor-parallel-size 2 --num-instances 2`` on CPU (4 rank processes): the openai
    client's streams complete with one instance's text while the second rank of instance 1 is killed
    (its group fails as a whole, its requests are recomputed on instance 0): 0 lost requests; SIGTERM
    then stops every process."""
    prompts = ["The keeper of the light", "A short one", "Once upon a time there was", "The sea was calm"]
    single = LLM(dtype="float32", device="cpu", num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    refs = [o.outputs[0].text for o in single.generate(prompts, params, use_tqdm=False)]
    port = free_port()
    proc = start([sys.executable, "-m", "infinite.cli", "serve", "--tensor-parallel-size", "2", "--num-instances",
                  "2", "--port", str(port), "--num-kv-blocks", "32", "--dtype", "float32", "--device", "cpu",
                  "--threads-per-rank", "1", "--log-level", "warning"])
    try:
        wait_ready(port, proc, timeout=240, n=2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=240)
        model = client.models.list().data[0].id
        first = client.completions.create(model=model, prompt=prompts[0], max_tokens=120, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert first.choices[0].text == refs[0]

        def stream(prompt: str) -> tuple[str, list]:
            chunks = client.completions.create(model=model, prompt=prompt, max_tokens=120, temperature=0.0,
                                               stream=True, extra_body={"ignore_eos": True})
            got = list(chunks)
            return "".join(c.choices[0].text for c in got if c.choices), [c.choices[0].finish_reason for c in got
                                                                           if c.choices and c.choices[0].finish_reason]

        streams = [in_thread(stream, p) for p in prompts]
        deadline = time.monotonic() + 60
        while not any(i["rank"] == 1 and i["num_running"] for i in get_json(f"http://127.0.0.1:{port}/status")[1]
                      ["instances"]):
            assert time.monotonic() < deadline, "instance 1 never ran a request"
            time.sleep(0.05)
        ranks = {(rank_of(p), tp_rank_of(p)): p for p in descendants(proc.pid) if rank_of(p) is not None}
        assert sorted(ranks) == [(0, 1), (1, 0), (1, 1)]  # this process is (0, 0)
        os.kill(ranks[(1, 1)], signal.SIGKILL)
        for (t, box), want in zip(streams, refs):
            t.join(240)
            text, finishes = box[0]
            assert text == want and finishes == ["length"]  # nothing lost, nothing repeated
        code, health = get_json(f"http://127.0.0.1:{port}/health")
        assert health["status"] == "degraded" and health["lost"][0]["rank"] == 1
        assert client.completions.create(model=model, prompt="still there", max_tokens=3).usage.completion_tokens == 3
        everyone = [proc.pid] + descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert_all_exit(everyone)
    finally:
        kill_all([proc])


def test_an_instance_cannot_join_a_cluster_of_tensor_parallel_instances(monkeypatch, capsys):
    from infinite.cluster import rpc_membership
    from infinite.launch.join import main as join_main

    ticket = rpc_membership.JoinTicket(3, EngineConfig(tensor_parallel_size=2, num_instances=2), "tcp://127.0.0.1:1")
    monkeypatch.setattr(rpc_membership, "claim", lambda rdzv, timeout_s: ticket)
    assert join_main(["--cluster", "127.0.0.1:1"]) == 2
    assert "runs tensor-parallel instances (--tensor-parallel-size 2); an instance cannot join" in capsys.readouterr().err
