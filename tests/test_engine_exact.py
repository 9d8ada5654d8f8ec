"""Greedy tokens of LLM.generate equal transformers' generate(do_sample=False), token for token."""

import random

import pytest
import torch

from helpers_hf import make_hf_checkpoint
from infinite import LLM, SamplingParams

PROMPT_LENS = [1, 7, 16, 33, 64, 97, 150]
MAX_TOKENS = 24


def reference_tokens(ckpt, prompts, max_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
            outs.append(gen[0, len(p):].tolist())
    return outs


def make_prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {k: make_hf_checkpoint(root, k) for k in ("llama_gqa", "llama3_scaling", "qwen2")}


@pytest.fixture(scope="module")
def references(checkpoints):
    return {k: reference_tokens(d, make_prompts(300, 11), MAX_TOKENS) for k, d in checkpoints.items()}


@pytest.mark.parametrize("kind", ["llama_gqa", "llama3_scaling", "qwen2"])
def test_batch_greedy_equals_transformers(kind, checkpoints, references):
    llm = LLM(model=str(checkpoints[kind]), dtype="float32", num_kv_blocks=256, max_num_batched_tokens=512)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(make_prompts(300, 11), params, use_tqdm=False)
    for out, ref, n in zip(outs, references[kind], PROMPT_LENS):
        assert len(out.prompt_token_ids) == n
        assert out.outputs[0].token_ids == ref, f"prompt of {n} tokens diverged"
        assert out.outputs[0].finish_reason == "length"
    assert all(s["used_blocks"] == 0 and s["free_blocks"] == 256 for s in llm.stats())


def test_greedy_exact_under_preemption(checkpoints, references):
    """A pool far too small for the batch: requests are preempted and recomputed, tokens unchanged."""
    kind = "llama_gqa"
    llm = LLM(model=str(checkpoints[kind]), dtype="float32", num_kv_blocks=14, block_size=16,
              max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(make_prompts(300, 11), params, use_tqdm=False)
    for out, ref in zip(outs, references[kind]):
        assert out.outputs[0].token_ids == ref
    stats = llm.stats()[0]
    assert stats["num_preemptions"] > 0, "the pool was meant to force preemption"
    assert stats["used_blocks"] == 0 and stats["free_blocks"] == 14
