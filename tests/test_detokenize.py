"""Final-only requests detokenized beside the step (runtime/detokenize.py) end with exactly the text,
tokens and stop reasons of detokenizing token by token in the step: stop tokens cut from the text,
stop strings (not deferred), partial characters flushed at the end, aborts mid-way."""

from __future__ import annotations

import pytest
import torch

from infinite.runtime.config import EngineConfig
from infinite.runtime.detokenize import BackgroundDetokenizer, advance
from infinite.runtime.engine import LLMEngine
from infinite.sampling.params import SamplingParams

torch.set_num_threads(1)

CASES = [
    dict(temperature=0.0, max_tokens=40, ignore_eos=True),
    dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True),  # random tokens: partial characters too
    dict(temperature=0.8, seed=3, max_tokens=30, stop=["e", "th"], ignore_eos=True),  # text decides: in the step
    dict(temperature=0.7, seed=9, max_tokens=35, stop_token_ids=[7, 11, 13, 500], include_stop_str_in_output=False),
    dict(temperature=0.9, seed=5, max_tokens=20, logprobs=2, ignore_eos=True),
    dict(temperature=1.0, seed=11, max_tokens=33, ignore_eos=True),  # aborted after a few steps
]


@pytest.fixture(scope="module")
def engines():
    plain = LLMEngine(EngineConfig(num_kv_blocks=128, max_num_batched_tokens=32))
    beside = LLMEngine(EngineConfig(num_kv_blocks=128, max_num_batched_tokens=32))
    beside.detokenize_in_background(min_rows=1)  # every step hands its rows to the worker
    yield plain, beside
    beside.shutdown()


def _run(engine: LLMEngine) -> dict[str, tuple]:
    for i, kw in enumerate(CASES):
        req = engine.make_request([5 + i, 40, 41, 42, 300 + i, 77, 9, 8, 100], SamplingParams(**kw), f"r{i}")
        req.output_kind = "final_only"
        engine.submit(req)
    done: dict[str, tuple] = {}
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        if steps == 6:
            outs.append(engine.abort_request(f"r{len(CASES) - 1}"))
        for o in outs:
            c = o.outputs[0]
            assert o.finished, "final-only requests output once, when they finish"
            done[o.request_id] = (c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs)
    return done


def test_text_beside_the_step_equals_text_in_the_step(engines):
    plain, beside = engines
    want, got = _run(plain), _run(beside)
    assert set(want) == {f"r{i}" for i in range(len(CASES))}
    assert got == want
    beside.background_detokenizer.min_rows = 10**6  # steps with few rows: fed on the engine's thread
    try:
        assert _run(beside) == want
    finally:
        beside.background_detokenizer.min_rows = 1
    assert want["r5"][2] == "abort" and want["r3"][2] in ("stop", "length")
    assert any(t for t, *_ in want.values()), "the tiny model's tokenizer made some text"


def test_requests_whose_text_decides_their_stop_are_not_deferred(engines):
    _, beside = engines
    deferred = []
    submit = beside.background_detokenizer.submit
    beside.background_detokenizer.submit = lambda work: (deferred.extend(r.request_id for r, _ in work), submit(work))
    try:
        _run(beside)
    finally:
        beside.background_detokenizer.submit = submit
    assert "r2" not in deferred  # stop strings: detokenized in the step
    assert {"r0", "r1", "r4"} <= set(deferred)


def test_advance_feeds_each_token_once_whoever_calls_it(engines):
    """The worker and the engine's thread catch the same request up in any interleaving: every
    token is fed once, in order, so the text equals feeding them one by one."""
    plain, _ = engines
    ids = [300, 301, 40, 41, 9, 8, 100, 7, 512, 513, 900, 901, 902]

    def fresh():
        req = plain.make_request([5, 40, 41], SamplingParams(max_tokens=50))
        req.output_token_ids = list(ids)
        return req

    one_by_one = fresh()
    for n in range(1, len(ids) + 1):
        advance(one_by_one, n)
    worker = BackgroundDetokenizer()
    try:
        req = fresh()
        worker.submit([(req, 4), (req, 2), (req, 9)])  # out of order: an older target feeds nothing
        last = worker.advance(req, 7)
        worker.submit([(req, 11)])
        worker.advance(req, len(ids))
        worker.submit([(req, 5)])
    finally:
        worker.close()
    assert req.detok_pos == len(ids) and isinstance(last, str)
    assert req.text == one_by_one.text and req.text_len == one_by_one.text_len
