"""The prefix cache in the engine: greedy tokens, logprobs and prompt logprobs with caching on equal
those with it off (float32), for whole-block and partial-block prefixes, tenants apart by cache_salt,
and a pool so small that cached blocks are evicted and requests preempted; usage reports the cached
tokens; nothing leaks."""

from __future__ import annotations

import random

import pytest
import torch

from helpers_hf import make_hf_checkpoint
from infinite import LLM, SamplingParams

torch.set_num_threads(1)

LOGPROB_TOL = 1e-5  # float32 rounding: a cached prefix's KV was computed in another chunk shape


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("prefix"), "llama_gqa", max_position_embeddings=1024))


def rand(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 300) for _ in range(n)]


def same(a, b) -> None:
    """Two outputs of the same request: the same tokens; logprobs and prompt logprobs to rounding."""
    ca, cb = a.outputs[0], b.outputs[0]
    assert ca.token_ids == cb.token_ids
    if ca.logprobs is not None:
        for la, lb in zip(ca.logprobs, cb.logprobs):
            assert la.keys() == lb.keys()
            assert max(abs(la[t] - lb[t]) for t in la) < LOGPROB_TOL
    assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
    if a.prompt_logprobs is not None:
        for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert la.keys() == lb.keys() and max(abs(la[t] - lb[t]) for t in la) < LOGPROB_TOL


def run(llm: LLM, prompts, params) -> list:
    """One prompt after the other: each finds what the earlier ones left in the cache."""
    return [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]


def test_cached_prefixes_change_no_token_and_no_logprob(ckpt):
    rng = random.Random(1)
    doc = rand(rng, 85)  # 5 full blocks and 5 tokens: hits end mid-prompt
    prompts = [doc + rand(rng, k) for k in (3, 11, 0, 40)] + [doc[:37] + rand(rng, 9), doc[:16], doc[:17]]
    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    outs = {}
    for on in (True, False):
        llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=64, enable_prefix_caching=on)
        outs[on] = run(llm, prompts, greedy)
        # a batch of the same prompts at once, after them: hits for all of it
        outs[on] += llm.generate(prompts[:3], greedy, use_tqdm=False)
        s = llm.stats()[0]
        assert s["used_blocks"] == 0 and s["free_blocks"] == 64
    for a, b in zip(outs[True], outs[False]):
        same(a, b)
    cached = [o.num_cached_tokens for o in outs[True]]
    assert cached[:7] == [0, 80, 80, 80, 32, 0, 16], cached  # full blocks only, the last token computed
    assert cached[7:] == [80, 80, 80]
    assert all(o.num_cached_tokens == 0 for o in outs[False])


def test_prompt_logprobs_with_caching_on_equal_off(ckpt):
    rng = random.Random(2)
    doc = rand(rng, 64)
    prompts = [doc + rand(rng, 5), doc + rand(rng, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    outs = {}
    for on in (True, False):
        llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=64, enable_prefix_caching=on)
        outs[on] = run(llm, prompts, params)
        if on:
            # a request that asks for prompt logprobs computes its whole prompt; one that does not, hits
            plain = llm.generate([prompts[1]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
            assert plain.num_cached_tokens == 64
    for a, b in zip(outs[True], outs[False]):
        same(a, b)
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids)
    assert [o.num_cached_tokens for o in outs[True]] == [0, 0]


def test_cache_salt_keeps_tenants_apart(ckpt):
    rng = random.Random(3)
    doc = rand(rng, 70)
    llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = llm.generate([{"prompt_token_ids": doc + [5], "cache_salt": "tenant-a"}], greedy, use_tqdm=False)[0]
    other = llm.generate([{"prompt_token_ids": doc + [6], "cache_salt": "tenant-b"}], greedy, use_tqdm=False)[0]
    unsalted = llm.generate([doc + [7]], greedy, use_tqdm=False)[0]
    again = llm.generate([{"prompt_token_ids": doc + [8], "cache_salt": "tenant-a"}], greedy, use_tqdm=False)[0]
    assert [first.num_cached_tokens, other.num_cached_tokens, unsalted.num_cached_tokens] == [0, 0, 0]
    assert again.num_cached_tokens == 64
    ref = LLM(model=ckpt, dtype="float32", num_kv_blocks=64, enable_prefix_caching=False)
    same(again, ref.generate([doc + [8]], greedy, use_tqdm=False)[0])
    with pytest.raises(ValueError, match="cache_salt"):
        SamplingParams(cache_salt="")


def test_eviction_and_preemption_on_a_tiny_pool_stay_exact(ckpt):
    """A pool of 12 blocks for requests over two shared documents: cached blocks are evicted, requests
    preempted and recomputed (hitting what is left), and every token is what caching off gives."""
    rng = random.Random(4)
    docs = [rand(rng, 60), rand(rng, 45)]
    prompts = [docs[i % 2][: 20 + 9 * i] + rand(rng, 3) for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    outs = {}
    for on in (True, False):
        llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=12, max_num_batched_tokens=32,
                  enable_prefix_caching=on)
        outs[on] = llm.generate(prompts, params, use_tqdm=False) + llm.generate(prompts[::-1], params,
                                                                                use_tqdm=False)
        s = llm.stats()[0]
        assert s["num_preemptions"] > 0 and s["used_blocks"] == 0 and s["free_blocks"] == 12
        if on:
            assert s["prefix_cache_hits"] > 0 and llm.engine.rm.pool.evictions > 0
    for a, b in zip(outs[True], outs[False]):
        same(a, b)
