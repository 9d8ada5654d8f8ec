"""Tool-call parsers, chosen by name as vLLM's ``--tool-call-parser``."""

from __future__ import annotations

from infinite.server.tool_parsers.base import Extracted, ParsedCall, StreamState, ToolParser
from infinite.server.tool_parsers.hermes import HermesToolParser
from infinite.server.tool_parsers.llama import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose from {', '.join(sorted(TOOL_PARSERS))}") from None


__all__ = ["TOOL_PARSERS", "Extracted", "ParsedCall", "StreamState", "ToolParser", "get_tool_parser"]
