"""Llama 3.1/3.2 JSON calls: the whole answer is ``{"name": ..., "parameters": {...}}``
(optionally after ``<|python_tag|>``), several separated by ``;``. An answer that does not
start that way is plain content, as vLLM's llama3_json parser decides.
"""

from __future__ import annotations

import json

from infinite.server.tool_parsers.base import Extracted, ParsedCall, StreamState, ToolParser, call_from_json

PYTHON_TAG = "<|python_tag|>"


def parse_calls(text: str) -> list[ParsedCall] | None:
    """All calls of a tool answer, or None when it is not one (then it is content)."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        call = call_from_json(obj, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return calls or None


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract(self, text: str) -> Extracted:
        stripped = text.lstrip()
        if not (stripped.startswith("{") or stripped.startswith(PYTHON_TAG)):
            return Extracted(text, [])
        calls = parse_calls(text)
        return Extracted(None, calls) if calls else Extracted(text, [])

    def stream(self) -> StreamState:
        return LlamaStream(self)


class LlamaStream(StreamState):
    """Content passes through at once unless the answer opens like a call; then it is held
    to the end and parsed whole."""

    def __init__(self, parser: Llama3JsonToolParser) -> None:
        self.parser = parser
        self.buffer = ""
        self.mode: str | None = None  # None: undecided, "content", "calls"

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        if self.mode == "content":
            return delta, []
        self.buffer += delta
        head = self.buffer.lstrip()
        if not head:
            return "", []
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self.mode = "calls"
            return "", []
        if PYTHON_TAG.startswith(head):
            return "", []  # could still become the tag
        self.mode = "content"
        out, self.buffer = self.buffer, ""
        return out, []

    def finish(self) -> tuple[str, list[ParsedCall]]:
        out, self.buffer = self.buffer, ""
        if not out:
            return "", []
        found = self.parser.extract(out)
        return (found.content or "", found.calls)
