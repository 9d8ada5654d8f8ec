"""The rest of the API vLLM's users call, end to end on the real server process: echo and
prompt logprobs, logprob shapes, structured output, sampling fields, tool calls with the
official ``openai`` client, tokenizer endpoints, the Responses API, and every refused field.

The server runs a tool-aware copy of the default model (helpers_tools: Hermes-style chat
template) with ``--tool-call-parser hermes --enable-auto-tool-choice``. The random weights
write noise, so tool calls come from grammars: ``required`` and named choices force them,
and for ``auto`` a ``structured_outputs`` regex makes the model write Hermes' format, which
the parser then has to find.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from helpers_tools import tool_checkpoint
from test_server_e2e import KEY, MODEL, request, running_server

from infinite.server.fields import FIELDS, markdown_table

DOCS = Path(__file__).resolve().parents[1] / "docs" / "server.md"
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome", "Lima"]}},
        "required": ["city"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
HERMES_RX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Oslo|Rome)"\}\}</tool_call>'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tool_checkpoint(tmp_path_factory.mktemp("tools"))


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server("--model", str(ckpt), "--num-kv-blocks", "128", "--dtype", "float32",
                        "--tool-call-parser", "hermes", "--enable-auto-tool-choice") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, **body) -> tuple[int, dict]:
    return request(server, "POST", path, {"model": MODEL, **body})


# --------------------------------------------------------------------------- completions


def test_echo_with_logprobs_as_vllm_shapes_it(server):
    prompt = "The lighthouse keeper woke"
    status, only = post(server, "/v1/completions", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert status == 200, only
    c = only["choices"][0]
    n = only["usage"]["prompt_tokens"]
    assert c["text"] == prompt and only["usage"]["completion_tokens"] == 0
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for tok, val, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert top[tok] == val and len(top) <= 2 and max(top.values()) >= val
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # with generation: the prompt part is the same, then the output's tokens
    status, more = post(server, "/v1/completions", prompt=prompt, max_tokens=3, echo=True, logprobs=1,
                        temperature=0, prompt_logprobs=0)
    c2 = more["choices"][0]
    assert c2["text"].startswith(prompt) and len(c2["logprobs"]["tokens"]) == n + 3
    assert c2["logprobs"]["token_logprobs"][:n] == lp["token_logprobs"]
    plp = c2["prompt_logprobs"]  # vLLM's field: {token id: {logprob, decoded_token}}
    assert plp[0] is None and len(plp) == n
    assert [next(iter(e.values()))["logprob"] for e in plp[1:]] == lp["token_logprobs"][1:]


def test_top_logprobs_always_hold_the_sampled_token(server):
    for k in (0, 1, 3):
        status, body = post(server, "/v1/completions", prompt="Hello", max_tokens=6, logprobs=k, temperature=1.5,
                            seed=4, return_tokens_as_token_ids=(k == 3))
        lp = body["choices"][0]["logprobs"]
        for tok, val, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert top[tok] == val and len(top) <= k + 1
            if k == 3:
                assert re.fullmatch(r"token_id:\d+", tok)


def test_logit_bias_min_tokens_and_stop_strings(server, client):
    tid = post(server, "/tokenize", prompt=" village", add_special_tokens=False)[1]["tokens"]
    assert len(tid) == 1
    forced = {str(tid[0]): 100}
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, logit_bias=forced, temperature=1.0)
    assert out.choices[0].text == " village" * 5
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, logit_bias=forced,
                                    extra_body={"min_tokens": 3, "stop_token_ids": [tid[0]]})
    c = out.choices[0]
    assert out.usage.completion_tokens == 4 and c.finish_reason == "stop" and c.model_extra["stop_reason"] == tid[0]
    assert " village" not in c.text
    for include in (False, True):
        out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=10, logit_bias=forced, stop=["lage"],
                                        extra_body={"include_stop_str_in_output": include})
        assert out.choices[0].text == (" village" if include else " vil")


def test_continuous_usage_stats(client):
    stream = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, stream=True, temperature=0,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(stream)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 4 and all(c.usage is not None for c in chunks)


# --------------------------------------------------------------------------- structured output


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}},
    {"structured_outputs": {"json": CITY}},
    {"guided_json": CITY},
])
def test_json_schema_spellings(client, extra):
    for stream in (False, True):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "city?"}], max_tokens=40, seed=1,
                  temperature=1.0, extra_body={k: v for k, v in extra.items() if k != "response_format"},
                  **({"response_format": extra["response_format"]} if "response_format" in extra else {}))
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), CITY)


def test_structured_errors_are_400_with_the_reason(server):
    status, body = post(server, "/v1/completions", prompt="x", guided_json={"type": "object", "properties": {
        "a": {"type": "strin"}}})
    assert status == 400 and "strin" in body["error"]["message"] and body["error"]["param"] == "guided_json"
    status, body = post(server, "/v1/completions", prompt="x", guided_regex="a", guided_choice=["b"])
    assert status == 400 and "one way only" in body["error"]["message"]
    status, body = post(server, "/v1/completions", prompt="x", structured_outputs={"regex": "a(b"})
    assert status == 400 and "unclosed group" in body["error"]["message"]
    status, body = post(server, "/v1/completions", prompt="x", guided_choice=["yes", "no"], max_tokens=5)
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no")


# --------------------------------------------------------------------------- tools


def _round_trip_messages(call) -> list[dict]:
    return [
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]


def test_tool_round_trip_required_then_answer(server, client):
    msgs = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="required",
                                       max_tokens=60, seed=2)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name in ("get_weather", "get_time")
    schema = TOOLS[0 if call.function.name == "get_weather" else 1]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the call and its result go back through the chat template
    history = _round_trip_messages(call)
    status, tok = post(server, "/tokenize", messages=history, return_token_strs=False)
    text = post(server, "/detokenize", tokens=tok["tokens"])[1]["prompt"]
    assert f'<tool_call>{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}</tool_call>' in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, seed=3)
    assert final.choices[0].message.tool_calls in (None, []) and final.choices[0].message.content
    assert final.usage.prompt_tokens > r.usage.prompt_tokens


def test_tool_round_trip_streaming_named(client):
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    stream = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, stream=True, max_tokens=40,
                                            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = d.id or entry["id"]
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            reasons.append(ch.finish_reason)
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(calls[0]["arguments"]), CITY)
    assert reasons[-1] == "stop"
    history = [*msgs, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function", "function": {"name": "get_weather",
                                                                "arguments": calls[0]["arguments"]}}]},
               {"role": "tool", "tool_call_id": calls[0]["id"], "content": "rain"}]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", stream=True, max_tokens=8, seed=1)
        if c.choices)
    assert text


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_choice_parses_hermes_calls(client, stream):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, max_tokens=60,
              extra_body={"structured_outputs": {"regex": HERMES_RX}})
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls, reason = choice.message.tool_calls, choice.finish_reason
        got = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    else:
        parts: dict[int, list[str]] = {}
        reason = None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                assert not (ch.delta.content or "").strip().startswith("<tool")
                for d in ch.delta.tool_calls or []:
                    p = parts.setdefault(d.index, ["", ""])
                    p[0] += d.function.name or ""
                    p[1] += d.function.arguments or ""
                reason = ch.finish_reason or reason
        got = [(name, json.loads(args)) for name, args in parts.values()]
    assert reason == "tool_calls" and len(got) == 1
    assert got[0][0] == "get_weather" and got[0][1]["city"] in ("Oslo", "Rome")


def test_auto_needs_the_server_flag_and_tools_need_a_template(server):
    status, body = post(server, "/v1/chat/completions", messages=[{"role": "user", "content": "x"}],
                        tool_choice="required")
    assert status == 400 and body["error"]["param"] == "tool_choice"


# --------------------------------------------------------------------------- other endpoints


def test_tokenizer_endpoints(server):
    status, info = request(server, "GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|end|>" and info["bos_token"] == "<|begin|>"
    assert "<tool_call>" in info["chat_template"] and info["model_max_length"] > 0
    status, t = post(server, "/tokenize", prompt="Hello world", return_token_strs=True)
    assert status == 200 and t["count"] == len(t["tokens"]) == len(t["token_strs"]) and t["tokens"][0] == 0
    assert post(server, "/tokenize", prompt="Hello world", add_special_tokens=False)[1]["tokens"] == t["tokens"][1:]
    assert post(server, "/detokenize", tokens=t["tokens"][1:])[1]["prompt"] == "Hello world"
    assert post(server, "/detokenize", tokens=[10**7])[0] == 400
    assert post(server, "/tokenize")[0] == 400


def test_responses_api_with_the_openai_client(client):
    r = client.responses.create(model=MODEL, input="Say something", instructions="Be brief.", max_output_tokens=6,
                                temperature=0)
    assert r.status == "incomplete" and r.output_text and r.usage.output_tokens == 6
    events = list(client.responses.create(model=MODEL, input=[{"role": "user", "content": "Hi"}],
                                          max_output_tokens=5, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] == "response.incomplete" and "response.output_text.done" in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_embeddings_are_a_clear_400(client):
    with pytest.raises(openai.BadRequestError, match="not an embedding model"):
        client.embeddings.create(model=MODEL, input="hello")


# --------------------------------------------------------------------------- the field table


def test_docs_table_is_the_code_table():
    text = DOCS.read_text()
    assert markdown_table() in text, "docs/server.md's field table is out of date: python -m infinite.server.fields"


@pytest.mark.parametrize("field", [f for f in FIELDS if not f.supported], ids=lambda f: f"{f.name}-{f.endpoints[0]}")
def test_every_refused_field_is_a_400_naming_it(server, field):
    bodies = {
        "completions": ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
        "responses": ("/v1/responses", {"input": "x", "max_output_tokens": 1}),
    }
    for endpoint in field.endpoints:
        path, body = bodies[endpoint]
        status, out = post(server, path, **body, **{field.name: field.example})
        assert status == 400, (endpoint, out)
        assert out["error"]["param"] == field.name and field.name in out["error"]["message"]
        for neutral in (None, *field.neutral):  # asking for nothing passes
            assert post(server, path, **body, **{field.name: neutral})[0] == 200, (endpoint, neutral)
