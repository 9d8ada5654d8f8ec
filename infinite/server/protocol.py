"""OpenAI-compatible request bodies, decoded and checked once at the edge.

Field names and defaults follow vLLM's OpenAI server. Unknown request fields
are ignored (as vLLM does), so clients that send extra OpenAI fields keep
working; every OpenAI or vLLM field we cannot honour is declared here and
refused with a 400 naming it (the list is infinite.server.fields), never
silently dropped. Response bodies are in infinite.server.shapes.

Everything here is pure: bytes in, Structs or ``APIError`` out.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec

from infinite.server.errors import APIError, bad_request
from infinite.server.fields import CHAT, COMPLETIONS, check_refused

MAX_N = 128  # choices per request; each is a separate engine request
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# --------------------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: dict[str, Any] | None = None  # {"name", "schema", "strict", "description"}


class StructuredOutputs(msgspec.Struct):
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(msgspec.Struct):
    """Fields shared by completions and chat (vLLM's names and defaults)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = None
    request_id: str | None = None
    cache_salt: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Declared so that the server sees them; infinite.server.fields refuses each with a 400.
    best_of: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    allowed_token_ids: Any = None
    bad_words: Any = None
    spaces_between_special_tokens: Any = None
    priority: Any = None
    logits_processors: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    return_token_ids: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None


class CompletionRequest(_Sampling, kw_only=True):
    # msgspec unions may hold one array type only, so the four prompt forms
    # (str, [str], [int], [[int]]) are one union here and sorted by prompt_inputs().
    prompt: str | list[str | int | list[int]] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    add_special_tokens: bool = True
    suffix: Any = None
    prompt_embeds: Any = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(msgspec.Struct):
    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: str = "function"


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Declared so that the server sees them; infinite.server.fields refuses each with a 400.
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    web_search_options: Any = None
    echo: Any = None
    continue_final_message: Any = None
    documents: Any = None
    mm_processor_kwargs: Any = None


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def decode_body(body: bytes, typ: type) -> Any:
    """Decode a JSON body into ``typ``; every failure becomes a 400 naming the field."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        return msgspec.json.decode(body, type=typ)
    except msgspec.ValidationError as e:
        match = _PATH_RE.search(str(e))
        param = match.group(1).split("[")[0].split(".")[0] if match else None
        raise bad_request(f"invalid request: {e}", param=param or None) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"malformed JSON body: {e}") from None
    except UnicodeDecodeError as e:  # a JSON string holding bytes that are not UTF-8
        raise bad_request(f"the body is not valid UTF-8: {e}") from None


def decode_completion_request(body: bytes) -> CompletionRequest:
    req = decode_body(body, CompletionRequest)
    check_completion_request(req)
    return req


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    req = decode_body(body, ChatCompletionRequest)
    check_chat_request(req)
    return req


# --------------------------------------------------------------------------- edge checks


def _check_common(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, endpoint: str) -> None:
    check_refused(req, endpoint)
    if req.n is None:
        req.n = 1
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    echo_only = isinstance(req, CompletionRequest) and req.echo and max_tokens == 0
    if max_tokens is not None and max_tokens < 1 and not echo_only:
        name = "max_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            name = "max_completion_tokens"
        raise bad_request(f"{name} must be at least 1 (0 only with echo), got {max_tokens}", name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream=True", "stream_options")
    if req.temperature is not None and req.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {req.temperature}", "temperature")
    if req.stop_token_ids is not None and any(t < 0 for t in req.stop_token_ids):
        raise bad_request("stop_token_ids must be non-negative token ids", "stop_token_ids")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    if req.min_tokens < 0:
        raise bad_request(f"min_tokens must be non-negative, got {req.min_tokens}", "min_tokens")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        raise bad_request(
            f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.prompt_logprobs}", "prompt_logprobs"
        )
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs is not available with stream=true (as in vLLM)", "prompt_logprobs")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise bad_request(
            f"truncate_prompt_tokens must be at least 1, got {req.truncate_prompt_tokens}", "truncate_prompt_tokens"
        )
    for key in req.logit_bias or {}:
        if not key.strip().isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")


def check_completion_request(req: CompletionRequest) -> None:
    _check_common(req, req.max_tokens, COMPLETIONS)
    prompt_inputs(req.prompt)  # raises on empty / mixed prompts
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")


def check_chat_request(req: ChatCompletionRequest) -> None:
    _check_common(req, chat_max_tokens(req), CHAT)
    if not req.messages:
        raise bad_request("messages must be a non-empty list", "messages")
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {m.role!r}", "messages")
        if isinstance(m.content, list):
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"messages[{i}]: only text content parts are supported, got {part.type!r}", "messages"
                    )
        if m.tool_calls and m.role != "assistant":
            raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
        if m.role == "tool" and m.content is None:
            raise bad_request(f"messages[{i}]: a tool message needs content (the tool's result)", "messages")
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}", "top_logprobs"
            )
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    for i, t in enumerate(req.tools or []):
        if t.type != "function":
            raise bad_request(f"tools[{i}].type must be 'function', got {t.type!r}", "tools")


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """``max_completion_tokens`` (the newer OpenAI name) wins over ``max_tokens``."""
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


PromptInput = str | list[int]


def prompt_inputs(prompt: Any) -> list[PromptInput]:
    """Sort the four OpenAI prompt forms into a list of prompts (text or token ids)."""
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        items = list(prompt)
    elif all(isinstance(p, list) for p in prompt):
        items = [list(p) for p in prompt]
    else:
        raise bad_request("prompt must be a string, a list of strings, token ids, or a list of token-id lists", "prompt")
    for p in items:
        if len(p) == 0:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(p, list) and any(t < 0 for t in p):
            raise bad_request("prompt token ids must be non-negative", "prompt")
    return items


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages as the plain dicts a chat template expects: content parts joined, tool calls
    with their arguments as objects (as vLLM passes them: templates write ``arguments | tojson``)."""
    out = []
    for m in req.messages or []:
        if isinstance(m.content, list):
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [_tool_call_dict(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise bad_request(f"tool call {call.function.name!r}: arguments are not valid JSON", "messages") from None
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": args}}


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "decode_chat_request",
    "decode_completion_request",
    "prompt_inputs",
]
