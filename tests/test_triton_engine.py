"""The whole engine on the Triton kernels (interpreted on CPU) gives the torch backend's greedy tokens."""

import random

import pytest

import infinite.attention as attention
from helpers_hf import make_hf_checkpoint
from infinite import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # head_dim 16 keeps the interpreter quick; GQA 4 query heads over 2 KV heads.
    return str(make_hf_checkpoint(tmp_path_factory.mktemp("triton"), "llama_gqa", num_hidden_layers=2))


def test_triton_backend_matches_torch_end_to_end(ckpt, monkeypatch):
    """The Triton kernels give the torch path's greedy tokens; the step metadata names its decode and
    prefill rows (MAMetadata.mixed_rows), so the decode rows of mixed steps run on the split-KV decode
    kernel beside the prefill kernel."""
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (1, 19, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # A small pool and token budget: chunked prefill, mixed prefill+decode steps and block reuse.
    args = dict(model=ckpt, dtype="float32", num_kv_blocks=16, max_num_batched_tokens=24)
    # The backend variable is read once per process: restore the cached choice afterwards too.
    monkeypatch.setattr(attention, "_forced", attention._forced)
    monkeypatch.setenv("INFINITE_ATTENTION_BACKEND", "torch")
    attention.reload_backend()
    ref = [o.outputs[0].token_ids for o in LLM(**args).generate(prompts, params, use_tqdm=False)]
    monkeypatch.setenv("INFINITE_ATTENTION_BACKEND", "triton")
    attention.reload_backend()
    import infinite.attention.triton as kernels

    calls = {"n": 0}
    real = kernels.micro_attention

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(kernels, "micro_attention", counted)
    split = {"n": 0}
    real_decode = kernels.decode_attention

    def decode(*a, rows=None, **k):
        split["n"] += rows is not None
        return real_decode(*a, rows=rows, **k)

    monkeypatch.setattr(kernels, "decode_attention", decode)
    got = [o.outputs[0].token_ids for o in LLM(**args).generate(prompts, params, use_tqdm=False)]
    assert calls["n"] > 0, "the Triton kernels were not used"
    assert split["n"] > 0, "mixed steps' decode rows did not take the decode kernel"
    assert got == ref
