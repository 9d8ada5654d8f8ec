"""Hermes-style calls, as Qwen2/2.5 and Hermes templates teach them:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number, text around them.

A call left open at the end of the answer (the model stopped before the closing tag)
still counts when its JSON is complete, as vLLM's hermes parser allows.
"""

from __future__ import annotations

import json

from infinite.server.tool_parsers.base import (Extracted, ParsedCall, StreamState, ToolParser, call_from_json,
                                               held_prefix)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _parse(body: str) -> ParsedCall | None:
    try:
        return call_from_json(json.loads(body.strip()))
    except json.JSONDecodeError:
        return None


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract(self, text: str) -> Extracted:
        state = HermesStream()
        content, calls = state.feed(text)
        more, last = state.finish()
        content += more
        return Extracted(content if content.strip() else None, calls + last)

    def stream(self) -> StreamState:
        return HermesStream()


class HermesStream(StreamState):
    def __init__(self) -> None:
        self.pending = ""
        self.in_call = False

    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        self.pending += delta
        content, calls = "", []
        while True:
            if not self.in_call:
                idx = self.pending.find(OPEN)
                if idx < 0:
                    keep = held_prefix(self.pending, OPEN)
                    content += self.pending[: len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    return content, calls
                content += self.pending[:idx]
                self.pending = self.pending[idx + len(OPEN):]
                self.in_call = True
            idx = self.pending.find(CLOSE)
            if idx < 0:
                return content, calls
            body, self.pending = self.pending[:idx], self.pending[idx + len(CLOSE):]
            self.in_call = False
            call = _parse(body)
            if call is not None:
                calls.append(call)
            else:  # not a call after all: show it as the model wrote it
                content += OPEN + body + CLOSE

    def finish(self) -> tuple[str, list[ParsedCall]]:
        rest, self.pending = self.pending, ""
        if not self.in_call:
            return rest, []
        self.in_call = False
        call = _parse(rest)
        return ("", [call]) if call is not None else (OPEN + rest, [])
