"""What a tool-call parser does: split model text into content and tool calls, whole or streamed.

vLLM's ``--tool-call-parser`` picks one per model family; each knows the format its
chat template taught the model. A parser here is two pure pieces:
``extract(text)`` for a finished answer, and a ``StreamState`` that takes text deltas
and releases content that cannot be part of a call plus each call once it is complete.
A call is released whole (its name, then its arguments in one delta): a call's JSON
is only known to be valid once it closes, and clients accumulate deltas either way.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object as text
    id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")


@dataclass
class Extracted:
    content: str | None
    calls: list[ParsedCall]


def call_from_json(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall | None:
    """``{"name": ..., "arguments"|"parameters": {...}}`` -> a call; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


class StreamState(ABC):
    @abstractmethod
    def feed(self, delta: str) -> tuple[str, list[ParsedCall]]:
        """New text in; (content safe to show now, calls completed now) out."""

    @abstractmethod
    def finish(self) -> tuple[str, list[ParsedCall]]:
        """The answer ended: whatever was held back, as content or calls."""


class ToolParser(ABC):
    name: str = ""

    @abstractmethod
    def extract(self, text: str) -> Extracted: ...

    @abstractmethod
    def stream(self) -> StreamState: ...


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that could begin ``marker`` (held back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
