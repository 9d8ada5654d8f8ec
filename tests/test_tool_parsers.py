"""Tool-call parsers and tool_choice planning: pure functions, no model."""

from __future__ import annotations

import json
import random

import msgspec
import pytest

from infinite.server import protocol as P
from infinite.server.errors import APIError
from infinite.server.tool_parsers import get_tool_parser
from infinite.server.tools import ToolStream, extract, finish_reason, plan_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def chat(**fields) -> P.ChatCompletionRequest:
    return P.decode_chat_request(json.dumps({"messages": [{"role": "user", "content": "hi"}], **fields}).encode())


def stream_all(state, text: str, rng: random.Random) -> tuple[str, list]:
    """Feed ``text`` in random pieces; return (content, calls) as a client would accumulate them."""
    content, calls, i = "", [], 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 7))
        c, new = state.feed(text[i:j])
        content, calls, i = content + c, calls + new, j
    c, new = state.finish()
    return content + c, calls + new


HERMES_CASES = [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    ('Let me check. <tool_call>\n{"name": "a", "arguments": {}}\n</tool_call><tool_call>{"name": "b", '
     '"arguments": {"x": [1, 2]}}</tool_call>', "Let me check. ", [("a", {}), ("b", {"x": [1, 2]})]),
    ('<tool_call>{"name": "a", "arguments": {"k": 1}}', None, [("a", {"k": 1})]),  # closed by the end
    ("plain answer < not a tag", "plain answer < not a tag", []),
    ("<tool_call>not json</tool_call> tail", "<tool_call>not json</tool_call> tail", []),
    ('<tool_call>{"name": "a", "arguments": "{\\"k\\": 2}"}</tool_call>', None, [("a", {"k": 2})]),
]


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"y": 1}}', None,
     [("a", {}), ("b", {"y": 1})]),
    ("The weather is fine.", "The weather is fine.", []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('  {"name": "a", "parameters": {}} trailing words', '  {"name": "a", "parameters": {}} trailing words', []),
]


@pytest.mark.parametrize("name, text, content, calls", [("hermes", *c) for c in HERMES_CASES]
                         + [("llama3_json", *c) for c in LLAMA_CASES])
def test_parser_whole_and_streamed(name, text, content, calls):
    parser = get_tool_parser(name)
    found = parser.extract(text)
    assert found.content == content
    assert [(c.name, json.loads(c.arguments)) for c in found.calls] == calls
    for seed in range(5):  # any split of the text into deltas gives the same content and calls
        got, got_calls = stream_all(parser.stream(), text, random.Random(seed))
        assert got == (content or ""), seed
        assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="hermes, llama3_json"):
        get_tool_parser("nope")


def test_plan_auto_needs_the_server_flags():
    req = chat(tools=[WEATHER])
    with pytest.raises(APIError, match="enable-auto-tool-choice") as e:
        plan_tools(req, None, False)
    assert e.value.param == "tool_choice"
    plan = plan_tools(req, "hermes", True)
    assert plan.mode == "auto" and plan.template_tools[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("choice, match", [
    ({"type": "function", "function": {"name": "missing"}}, "not among the tools"),
    ("sometimes", "tool_choice must be"),
])
def test_plan_rejects_bad_tool_choice(choice, match):
    with pytest.raises(APIError, match=match):
        plan_tools(chat(tools=[WEATHER], tool_choice=choice), "hermes", True)


def test_tool_choice_without_tools_is_400():
    with pytest.raises(APIError, match="needs tools"):
        plan_tools(chat(tool_choice="required"), None, False)


def test_required_schema_and_forced_outputs():
    plan = plan_tools(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), None, False)
    schema = json.loads(plan.spec.json)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    content, calls = extract(plan, '[{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert content is None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Rome"}
    assert finish_reason(plan, calls, "stop") == "tool_calls"
    assert extract(plan, '[{"name": "get_wea') == ('[{"name": "get_wea', [])  # cut by max_tokens


def test_named_choice_streams_name_then_arguments():
    plan = plan_tools(chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                      None, False)
    assert json.loads(plan.spec.json) == WEATHER["function"]["parameters"]
    s = ToolStream(plan)
    deltas = [d for piece in ('{"city"', ': "Oslo"}') for d in s.feed(piece, False)[1]]
    encoded = [json.loads(msgspec.json.encode(d)) for d in deltas]
    assert encoded[0] == {"index": 0, "function": {"name": "get_weather", "arguments": ""}, "id": s.named_id,
                          "type": "function"}
    assert "".join(d["function"].get("arguments", "") for d in encoded) == '{"city": "Oslo"}'
    content, calls = extract(plan, '{"city": "Oslo"}')
    assert calls[0].function.name == "get_weather" and finish_reason(plan, calls, "stop") == "stop"


def test_tool_history_reaches_the_template_as_objects():
    req = chat(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    msgs = P.chat_messages(req)
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_server_flags_are_checked_at_start():
    from infinite.server.state import ServerSettings

    assert ServerSettings(tool_call_parser="llama3_json", enable_auto_tool_choice=True).tool_call_parser
    with pytest.raises(ValueError, match="unknown tool call parser"):
        ServerSettings(tool_call_parser="nope")
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerSettings(enable_auto_tool_choice=True)
