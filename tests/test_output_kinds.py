"""Output kinds (vLLM's RequestOutputKind): delta outputs carry only what is new, and folded together
they equal the cumulative outputs, for stop strings held back, stop tokens cut, logprobs and prompt
logprobs, aborts; the accumulator puts deltas that overtook each other back in order."""

from __future__ import annotations

import random

import pytest
import torch

from infinite.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import LLMEngine
from infinite.sampling.params import SamplingParams

torch.set_num_threads(1)

CASES = [
    dict(temperature=0.0, max_tokens=24, ignore_eos=True),
    dict(temperature=0.8, seed=3, max_tokens=30, stop=["e", "th"], ignore_eos=True),  # stop strings held back
    dict(temperature=0.9, seed=5, max_tokens=20, logprobs=2, prompt_logprobs=1, ignore_eos=True),
    dict(temperature=0.7, seed=9, max_tokens=25, stop_token_ids=[7, 11, 13, 500], include_stop_str_in_output=False),
    dict(temperature=1.0, seed=1, max_tokens=16, stop=["a"], include_stop_str_in_output=True, ignore_eos=True),
]


@pytest.fixture(scope="module")
def engine():
    return LLMEngine(EngineConfig(num_kv_blocks=128, max_num_batched_tokens=32))


def _run(engine: LLMEngine, kind: str, abort_after: int | None = None) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for i, kw in enumerate(CASES):
        engine.add_request([5 + i, 40, 41, 42, 300 + i, 77, 9, 8, 100], SamplingParams(output_kind=kind, **kw),
                           request_id=f"{kind}-{i}")
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        steps += 1
        if abort_after is not None and steps == abort_after:
            o = engine.abort_request(f"{kind}-0")
            if o is not None:
                outs.setdefault(o.request_id, []).append(o)
    return outs


def _fold(deltas: list[RequestOutput]) -> RequestOutput:
    acc = OutputAccumulator()
    for d in deltas:
        acc.add(d)
    return acc.cumulative()


def _same(a: RequestOutput, b: RequestOutput) -> None:
    ca, cb = a.outputs[0], b.outputs[0]
    assert (ca.text, ca.token_ids, ca.finish_reason, ca.stop_reason) == (cb.text, cb.token_ids, cb.finish_reason,
                                                                        cb.stop_reason)
    assert ca.logprobs == cb.logprobs and a.prompt_logprobs == b.prompt_logprobs and a.finished == b.finished
    assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob) if ca.cumulative_logprob else True


@pytest.mark.parametrize("abort_after", [None, 3])
def test_deltas_fold_into_the_cumulative_output(engine, abort_after):
    cum = _run(engine, "cumulative", abort_after)
    delta = _run(engine, "delta", abort_after)
    final = _run(engine, "final_only", abort_after)
    for i in range(len(CASES)):
        c, d, f = cum[f"cumulative-{i}"], delta[f"delta-{i}"], final[f"final_only-{i}"]
        assert len(d) == len(c) and len(f) == 1 and f[0].finished
        assert [x.delta_offset for x in d] == [len(x.outputs[0].token_ids) - len(y.outputs[0].token_ids)
                                               for x, y in zip(c, d)]
        assert all(x.delta_offset is None for x in c + f)
        # Only the first delta carries the prompt: a step's delta does not grow with the context.
        assert d[0].prompt_token_ids == c[0].prompt_token_ids and all(not x.prompt_token_ids for x in d[1:])
        assert _fold(d).prompt_token_ids == c[-1].prompt_token_ids
        _same(_fold(d), c[-1])
        _same(f[0], c[-1])
        # Every step's deltas so far equal that step's cumulative output: nothing shown is taken back.
        acc = OutputAccumulator()
        for x, y in zip(d, c):
            acc.add(x)
            assert acc.text == y.outputs[0].text and acc.token_ids == y.outputs[0].token_ids
    if abort_after is not None:
        assert cum["cumulative-0"][-1].outputs[0].finish_reason == "abort"


def _delta(offset: int, ids: list[int], text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1], [CompletionOutput(0, text, ids, None, None, "stop" if finished else None)],
                         finished, delta_offset=offset)


def test_accumulator_orders_drops_repeats_and_stops_at_the_end():
    deltas = [_delta(0, [1, 2], "ab"), _delta(2, [3], "c"), _delta(3, [], ""), _delta(3, [4, 5], "de"),
              _delta(5, [6], "f", finished=True)]
    for seed in range(20):
        order = deltas[:]
        random.Random(seed).shuffle(order)
        acc = OutputAccumulator()
        released = [d for x in order + [deltas[1], _delta(7, [9], "x")] for d in acc.add(x)]
        assert acc.token_ids == [1, 2, 3, 4, 5, 6] and acc.text == "abcdef"
        assert [d.delta_offset for d in released if d.outputs[0].token_ids] == [0, 2, 3, 5]
        assert acc.cumulative().finished and acc.cumulative().outputs[0].text == "abcdef"
    with pytest.raises(ValueError):
        OutputAccumulator().add(RequestOutput("r", None, [1], [CompletionOutput(0, "", [])], False))
