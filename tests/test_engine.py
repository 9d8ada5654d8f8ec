"""Engine behaviour through the offline API: stops, seeds, logprobs, aborts, validation, accounting."""

import json
import random
import shutil

import pytest

from helpers_hf import make_hf_checkpoint
from infinite import LLM, SamplingParams
from infinite.runtime.engine import LLMEngine
from infinite.runtime.config import EngineConfig

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", num_kv_blocks=256)  # the embedded tiny model, with its tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("engine"), "llama_gqa")


def test_stop_token_ids_and_stop_strings(llm):
    prompt = "The lamp in the village"
    base = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    stop_tok = base.token_ids[5]
    first = base.token_ids.index(stop_tok)
    out = llm.generate(prompt, SamplingParams(max_tokens=24, stop_token_ids=[stop_tok], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_tok)
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a visible stop string"
    out = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    keep = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True,
                                               **GREEDY), use_tqdm=False)[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]


def test_eos_ends_generation_unless_ignored(ckpt, tmp_path):
    prompt = [5, 6, 7, 8]
    base = LLM(model=str(ckpt), dtype="float32", num_kv_blocks=64).generate(
        [prompt], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    eos = base.token_ids[4]
    first = base.token_ids.index(eos)
    d = tmp_path / "eos"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (d / "config.json").write_text(json.dumps(cfg))
    gen = d / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text())
        g["eos_token_id"] = eos
        gen.write_text(json.dumps(g))
    llm = LLM(model=str(d), dtype="float32", num_kv_blocks=64)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.stop_reason is None
    out = llm.generate([prompt], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids and out.finish_reason == "length"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, min_tokens=first + 2),
                       use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids[: first + 2]


def test_seed_reproducible_regardless_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True) for _ in range(3)]
    batch = llm.generate(["a", "Once upon a time", "b c", "d"], [others[0], p, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate("Once upon a time", SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                                 seed=99, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_logprobs_of_chosen_tokens(llm):
    out = llm.generate("Hello", SamplingParams(max_tokens=6, logprobs=2, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and 1 <= len(lp) <= 3
        assert all(v <= 0 for v in lp.values())
        assert lp[tok] == max(lp.values())  # greedy picks the most likely token
    assert out.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(out.token_ids, out.logprobs)))


def test_bad_prompts_are_rejected_with_reasons(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate([[1, 10**7]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 40000], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="unknown engine argument"):
        LLM(num_kv_blokcs=3)
    assert llm.stats()[0]["used_blocks"] == 0


def test_max_model_len_finishes_with_length(ckpt):
    llm = LLM(model=str(ckpt), dtype="float32", num_kv_blocks=64, max_model_len=20)
    out = llm.generate([[5] * 15], SamplingParams(max_tokens=None, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_random_mixes_with_aborts_free_every_block(ckpt):
    rng = random.Random(11)
    eng = LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", num_kv_blocks=24, block_size=4,
                                 max_num_batched_tokens=32))
    total = eng.rm.num_blocks
    for round_ in range(3):
        ids = []
        for i in range(12):
            n = rng.randint(1, 40)
            ids.append(eng.add_request([rng.randrange(3, 300) for _ in range(n)],
                                       SamplingParams(max_tokens=rng.randint(1, 20), temperature=rng.choice([0, 1]),
                                                      ignore_eos=True), f"r{round_}-{i}"))
        steps = 0
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
            if rng.random() < 0.1:
                eng.abort_request(rng.choice(ids))
            s = eng.rm.stats()
            assert s["free_blocks"] + s["used_blocks"] == total
            assert steps < 2000
        assert eng.rm.num_free == total and not eng.requests


def test_n_samples_per_prompt_and_chat(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    outs = llm.generate(["Once", "Twice"], p, use_tqdm=False)
    assert len(outs) == 2
    for out in outs:
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 8 for c in out.outputs)
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different seeds, different samples
    again = llm.generate(["Once"], p, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in outs[0].outputs]
    single = llm.generate(["Once"], SamplingParams(temperature=1.0, max_tokens=8, seed=8, ignore_eos=True),
                          use_tqdm=False)[0]
    assert single.outputs[0].token_ids == outs[0].outputs[1].token_ids  # sample j uses seed + j
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "Hello there"}]
    chat = llm.chat(conv, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
    expected = tok.encode(tok.apply_chat_template(conv), add_special_tokens=False)
    assert chat.prompt_token_ids == expected and len(chat.outputs[0].token_ids) == 4
