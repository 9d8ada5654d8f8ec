"""Tool calling on chat completions: what ``tool_choice`` asks for and how the answer becomes calls.

As vLLM does it:

* ``none``: the tools still go to the chat template; the answer is plain content.
* ``auto`` (the default when tools are given): the model decides; the server's
  ``--tool-call-parser`` finds the calls in the text. It needs
  ``--enable-auto-tool-choice``, else a 400.
* ``required``: a grammar forces a JSON array of at least one
  ``{"name": <one of the tools>, "parameters": <its schema>}``.
* named (``{"type": "function", "function": {"name": ...}}``): a grammar forces that
  tool's parameters; the answer is the arguments, the name comes from the request.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from infinite.sampling.params import StructuredOutputsParams
from infinite.server import shapes as S
from infinite.server.errors import bad_request
from infinite.server.tool_parsers import ParsedCall, StreamState, ToolParser, get_tool_parser

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    template_tools: list[dict[str, Any]] | None = None
    spec: StructuredOutputsParams | None = None
    named: str | None = None
    parser: ToolParser | None = None
    parallel: bool = True


def plan_tools(req: Any, parser_name: str | None, auto_enabled: bool) -> ToolPlan:
    """Check ``tools`` / ``tool_choice`` against the request and the server's flags (400 on misuse)."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return ToolPlan("none")
    by_name = {t.function.name: t.function for t in tools}
    template_tools = [
        {"type": "function", "function": {k: v for k, v in (
            ("name", t.function.name), ("description", t.function.description),
            ("parameters", t.function.parameters)) if v is not None}}
        for t in tools
    ]
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if not auto_enabled or parser_name is None:
            raise bad_request('"auto" tool choice requires the server to run with --enable-auto-tool-choice '
                              "and --tool-call-parser", "tool_choice")
        return ToolPlan("auto", template_tools, parser=get_tool_parser(parser_name), parallel=parallel)
    if choice == "none":
        return ToolPlan("none", template_tools)
    if choice == "required":
        variants = [
            {"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                              "parameters": fn.parameters or _ANY_OBJECT},
             "required": ["name", "parameters"], "additionalProperties": False}
            for name, fn in by_name.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": variants}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan("required", template_tools, StructuredOutputsParams(json=schema), parallel=parallel)
    if isinstance(choice, str):
        raise bad_request(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}",
                          "tool_choice")
    name = choice.function.name
    if name not in by_name:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    spec = StructuredOutputsParams(json=by_name[name].parameters or _ANY_OBJECT)
    return ToolPlan("named", template_tools, spec, named=name, parallel=parallel)


def _out(call: ParsedCall) -> S.ToolCallOut:
    return S.ToolCallOut(call.id, S.FunctionCallOut(call.name, call.arguments))


def _forced_calls(plan: ToolPlan, text: str) -> list[ParsedCall] | None:
    """Calls of a grammar-forced answer; None when it did not complete (e.g. cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if plan.mode == "named":
        return [ParsedCall(plan.named or "", json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, list):
        return None
    return [ParsedCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in value]


def extract(plan: ToolPlan, text: str) -> tuple[str | None, list[S.ToolCallOut]]:
    """A finished answer as (content, tool calls)."""
    if plan.mode in ("required", "named"):
        calls = _forced_calls(plan, text)
        return (text, []) if calls is None else (None, [_out(c) for c in calls])
    if plan.mode == "auto" and plan.parser is not None:
        found = plan.parser.extract(text)
        calls = found.calls if plan.parallel else found.calls[:1]
        return found.content, [_out(c) for c in calls]
    return text, []


def finish_reason(plan: ToolPlan, calls: list[Any], reason: str | None) -> str | None:
    """"tool_calls" when auto or required produced calls; a named call ends as "stop" (as OpenAI)."""
    if calls and plan.mode in ("auto", "required") and reason == "stop":
        return "tool_calls"
    return reason


@dataclass
class ToolStream:
    """One choice's streamed answer as content deltas and OpenAI tool-call deltas."""

    plan: ToolPlan
    state: StreamState | None = None
    buffer: str = ""
    num_calls: int = 0
    named_id: str = field(default_factory=lambda: f"chatcmpl-tool-{uuid.uuid4().hex}")

    def __post_init__(self) -> None:
        if self.plan.mode == "auto" and self.plan.parser is not None:
            self.state = self.plan.parser.stream()

    def feed(self, delta: str, finished: bool) -> tuple[str, list[S.DeltaToolCall]]:
        mode = self.plan.mode
        if mode == "named":  # the text is the arguments: stream it as such, after the name
            out = []
            if self.num_calls == 0:
                self.num_calls = 1
                fn = S.DeltaFunctionCall(name=self.plan.named, arguments="")
                out.append(S.DeltaToolCall(0, fn, self.named_id, "function"))
            if delta:
                out.append(S.DeltaToolCall(0, S.DeltaFunctionCall(arguments=delta)))
            return "", out
        if mode == "required":
            self.buffer += delta
            if not finished:
                return "", []
            calls = _forced_calls(self.plan, self.buffer)
            return (self.buffer, []) if calls is None else ("", self._deltas(calls))
        if self.state is None:
            return delta, []
        content, calls = self.state.feed(delta)
        if finished:
            more, last = self.state.finish()
            content, calls = content + more, calls + last
        return content, self._deltas(calls)

    def _deltas(self, calls: list[ParsedCall]) -> list[S.DeltaToolCall]:
        out = []
        for c in calls:
            if not self.plan.parallel and self.num_calls >= 1:
                break
            i = self.num_calls
            self.num_calls += 1
            out.append(S.DeltaToolCall(i, S.DeltaFunctionCall(name=c.name, arguments=""), c.id, "function"))
            out.append(S.DeltaToolCall(i, S.DeltaFunctionCall(arguments=c.arguments)))
        return out
