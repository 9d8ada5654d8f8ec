"""Prompt logprobs from the prefill equal transformers' log-softmax of the same prompt (1e-4):
whole, in chunks (chunked prefill), across preemption, and on a 2-rank cluster whose pools
each hold only part of the prompt."""

from __future__ import annotations

import random

import pytest
import torch

from helpers_hf import hf_logits, make_hf_checkpoint
from infinite import LLM, SamplingParams

TOP = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("plp"), "llama_gqa", max_position_embeddings=1024))


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(11)
    return [[rng.randrange(3, 300) for _ in range(n)] for n in (70, 5, 33)]


@pytest.fixture(scope="module")
def reference(ckpt, prompts):
    return [hf_logits(ckpt, torch.tensor(p)).log_softmax(dim=-1) for p in prompts]


def check(out, prompt: list[int], ref: torch.Tensor, top: int = TOP) -> None:
    lps = out.prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    for j in range(1, len(prompt)):
        entry, tok = lps[j], prompt[j]
        assert abs(entry[tok] - ref[j - 1, tok].item()) < 1e-4, (j, entry[tok], ref[j - 1, tok].item())
        best = ref[j - 1].topk(top)
        for t, v in zip(best.indices.tolist(), best.values.tolist()):
            assert abs(entry[t] - v) < 1e-4
        assert len(entry) in (top, top + 1) and next(iter(entry)) == tok  # its own token first, as vLLM


@pytest.mark.parametrize("chunk", [2048, 16])
def test_prompt_logprobs_match_transformers(ckpt, prompts, reference, chunk):
    llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=64, max_num_batched_tokens=chunk)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, p, ref in zip(outs, prompts, reference):
        check(out, p, ref)
    plain = llm.generate(prompts[:1], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_survive_preemption(ckpt, prompts, reference):
    # 10 blocks of 16: both 70-token prompts are admitted (5 blocks each), but each needs 8 blocks
    # by its end, so the newer one is preempted and recomputed: its prompt logprobs must come out
    # once, not twice, and unchanged.
    llm = LLM(model=ckpt, dtype="float32", num_kv_blocks=10, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, prompt_logprobs=TOP)
    outs = llm.generate([prompts[0], prompts[0][::-1]], params, use_tqdm=False)
    assert llm.stats()[0]["num_preemptions"] > 0
    check(outs[0], prompts[0], reference[0])
    ref_rev = hf_logits(ckpt, torch.tensor(prompts[0][::-1])).log_softmax(dim=-1)
    check(outs[1], prompts[0][::-1], ref_rev)


def test_prompt_logprobs_on_two_ranks_with_the_prompt_over_both_pools(ckpt):
    # 12 blocks per pool (192 tokens); the 300-token prompt needs 19: its KV spans both ranks,
    # so later chunks of the prefill attend to blocks on the other rank.
    prompt = [random.Random(3).randrange(3, 300) for _ in range(300)]
    ref = hf_logits(ckpt, torch.tensor(prompt)).log_softmax(dim=-1)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=TOP)
    with LLM(model=ckpt, dtype="float32", num_instances=2, num_kv_blocks=12, max_num_batched_tokens=64) as llm:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert set(out.extra["kv_blocks"]) == {0, 1}, out.extra["kv_blocks"]
    check(out, prompt, ref)
