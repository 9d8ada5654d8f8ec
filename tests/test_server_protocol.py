"""Edge validation of request bodies: pure functions, no server, no engine."""

from __future__ import annotations

import json

import msgspec
import pytest

from infinite.server import protocol as P
from infinite.server import shapes as S
from infinite.server.errors import APIError, error_body
from infinite.server.metrics import RequestTimer, ServerMetrics, kv_usage
from infinite.server.sampling_args import sampling_kwargs
from infinite.server.serving import check_length, default_max_tokens, make_sampling_params


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def rejects(decode, raw: bytes, param: str | None = None, match: str | None = None) -> APIError:
    with pytest.raises(APIError, match=match) as e:
        decode(raw)
    assert e.value.status == 400
    if param is not None:
        assert e.value.param == param
    return e.value


def test_completion_defaults_follow_vllm():
    req = P.decode_completion_request(body(prompt="hi"))
    assert (req.max_tokens, req.n, req.stream, req.logprobs, req.model) == (16, 1, False, None, None)
    kw = sampling_kwargs(req, 16, None)
    assert kw == {"max_tokens": 16, "presence_penalty": 0.0, "frequency_penalty": 0.0, "ignore_eos": False,
                  "min_tokens": 0, "include_stop_str_in_output": False, "skip_special_tokens": True}


def test_unknown_fields_are_ignored_like_vllm():
    req = P.decode_completion_request(body(prompt="hi", some_future_field=3))
    assert req.prompt == "hi"


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("abc", ["abc"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_the_four_prompt_forms(prompt, expected):
    req = P.decode_completion_request(body(prompt=prompt))
    assert P.prompt_inputs(req.prompt) == expected


@pytest.mark.parametrize("prompt", ["", [], [""], [[]], [1, "a"], [[1], "a"], [-1]])
def test_empty_or_mixed_prompts_are_400(prompt):
    rejects(P.decode_completion_request, body(prompt=prompt), "prompt")


def test_missing_prompt_is_400():
    rejects(P.decode_completion_request, body(max_tokens=3), "prompt", "required")


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": True}, "n"),
        ({"stop": 5}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"logprobs": True}, "logprobs"),
        ({"stream_options": {"include_usage": "x"}, "stream": True}, "stream_options"),
    ],
)
def test_wrong_types_name_the_field(fields, param):
    e = rejects(P.decode_completion_request, body(prompt="x", **fields), param)
    assert "Expected" in e.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"n": P.MAX_N + 1}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"logprobs": P.MAX_LOGPROBS + 1}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"echo": True, "max_tokens": -1}, "max_tokens"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_bad_values_are_400(fields, param):
    rejects(P.decode_completion_request, body(prompt="x", **fields), param)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b"null", b'"prompt"', b"\xff\xfe"])
def test_malformed_json_is_400(raw):
    rejects(P.decode_completion_request, raw)


def test_chat_request_and_max_completion_tokens_wins():
    req = P.decode_chat_request(
        body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
             max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=2)
    )
    assert P.chat_max_tokens(req) == 7
    assert P.chat_messages(req) == [{"role": "user", "content": "ab"}]
    assert P.decode_chat_request(body(messages=[{"role": "user", "content": "x"}])).max_tokens is None


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_bad_chat_requests_are_400(fields, param):
    rejects(P.decode_chat_request, body(**fields), param)


def test_sampling_params_errors_become_400():
    with pytest.raises(APIError) as e:
        make_sampling_params({"max_tokens": 4, "top_p": 0.0})
    assert e.value.status == 400 and e.value.param == "top_p" and "top_p" in e.value.message
    assert make_sampling_params({"max_tokens": 4, "seed": 3, "stop": ["x"]}).stop == ["x"]


class _Eng:
    max_model_len = 100
    capacity_tokens = 64


def test_length_checks_put_the_numbers_in_the_message():
    check_length(_Eng, 60, 4, "prompt")
    with pytest.raises(APIError, match=r"maximum context length is 100 tokens.*requested 101 tokens \(1 in the prompt, 100"):
        check_length(_Eng, 1, 100, "prompt")
    with pytest.raises(APIError, match=r"at most 64 tokens.*requested 70 tokens \(60 in the messages, 10") as e:
        check_length(_Eng, 60, 10, "messages")
    assert e.value.param == "max_tokens"
    assert default_max_tokens(_Eng, 60, "messages") == 4
    with pytest.raises(APIError, match="64 tokens"):
        default_max_tokens(_Eng, 64, "messages")


def test_error_body_has_the_openai_shape():
    assert json.loads(error_body(404, "no such model", "model")) == {
        "error": {"message": "no such model", "type": "NotFoundError", "param": "model", "code": 404}
    }


def test_response_structs_encode_like_vllm():
    choice = S.CompletionChoice(0, "hi", None, "length")
    out = json.loads(P.encode(S.CompletionResponse("cmpl-1", 5, "m", [choice], S.UsageInfo(2, 1, 3))))
    assert out["object"] == "text_completion"
    assert out["choices"][0] == {"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                                 "prompt_logprobs": None}
    delta = json.loads(msgspec.json.encode(S.DeltaMessage(content="x")))
    assert delta == {"content": "x"}


def test_kv_usage_counts_lent_blocks_as_used():
    assert kv_usage({"free_blocks": 6, "used_blocks": 2, "lent_blocks": 2}) == pytest.approx(0.4)
    assert kv_usage({"num_blocks": 20, "free_blocks": 15, "used_blocks": 5}) == pytest.approx(0.25)
    assert kv_usage({}) == 0.0


def test_request_timer_observes_ttft_once_and_one_itl_per_later_token():
    m = ServerMetrics(lambda: None, lambda: "m")
    t = RequestTimer(m, arrival=10.0)
    t.on_output(10.5, 1)
    t.on_output(10.7, 3)  # two tokens in one step: two ITL samples of 0.1
    t.on_finish(10.8, "length")
    text = m.render().decode()
    assert 'infinite:time_to_first_token_seconds_count{model_name="m"} 1.0' in text
    assert 'infinite:time_to_first_token_seconds_sum{model_name="m"} 0.5' in text
    assert 'infinite:inter_token_latency_seconds_count{model_name="m"} 2.0' in text
    assert 'infinite:generation_tokens_total{model_name="m"} 3.0' in text
    assert 'infinite:request_success_total{finished_reason="length",model_name="m"} 1.0' in text
