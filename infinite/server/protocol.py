"""OpenAI-compatible request and response bodies, decoded and checked once at the edge.

Field names and defaults follow vLLM's OpenAI server. Unknown request fields
are ignored (as vLLM does), so clients that send extra OpenAI fields keep
working; fields we cannot honour (``suffix``, ``echo``, ``best_of`` != n,
tools) are refused with a 400 rather than silently dropped.

Everything here is pure: bytes in, Structs or ``APIError`` out.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from infinite.server.errors import APIError, bad_request

MAX_N = 128  # choices per request; each is a separate engine request
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# --------------------------------------------------------------------------- requests


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class CompletionRequest(msgspec.Struct):
    # msgspec unions may hold one array type only, so the four prompt forms
    # (str, [str], [int], [[int]]) are one union here and sorted by prompt_inputs().
    prompt: str | list[str | int | list[int]] | None = None
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = 1
    best_of: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(msgspec.Struct):
    messages: list[ChatMessage] | None = None
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
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
    logprobs: bool | None = False
    top_logprobs: int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    user: str | None = None
    add_generation_prompt: bool = True
    tools: list[Any] | None = None


_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")


def _decode(body: bytes, typ: type) -> Any:
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
    req = _decode(body, CompletionRequest)
    check_completion_request(req)
    return req


def decode_chat_request(body: bytes) -> ChatCompletionRequest:
    req = _decode(body, ChatCompletionRequest)
    check_chat_request(req)
    return req


# --------------------------------------------------------------------------- edge checks


def _check_common(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> None:
    if req.n is None:
        req.n = 1
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {req.n}", "n")
    if max_tokens is not None and max_tokens < 1:
        name = "max_tokens"
        if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
            name = "max_completion_tokens"
        raise bad_request(f"{name} must be at least 1, got {max_tokens}", name)
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options can only be set when stream=True", "stream_options")
    if req.temperature is not None and req.temperature < 0:
        raise bad_request(f"temperature must be non-negative, got {req.temperature}", "temperature")
    if req.stop_token_ids is not None and any(t < 0 for t in req.stop_token_ids):
        raise bad_request("stop_token_ids must be non-negative token ids", "stop_token_ids")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")


def check_completion_request(req: CompletionRequest) -> None:
    _check_common(req, req.max_tokens)
    prompt_inputs(req.prompt)  # raises on empty / mixed prompts
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}", "logprobs")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (it must equal n)", "best_of")
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")


def check_chat_request(req: ChatCompletionRequest) -> None:
    _check_common(req, chat_max_tokens(req))
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
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {req.top_logprobs}", "top_logprobs"
            )
        if not req.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    if req.tools:
        raise bad_request("tools are not supported", "tools")


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


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as the plain dicts a chat template expects (content parts joined)."""
    out = []
    for m in req.messages or []:
        if isinstance(m.content, list):
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        msg = {"role": m.role, "content": content}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def sampling_kwargs(
    req: CompletionRequest | ChatCompletionRequest, max_tokens: int, logprobs: int | None
) -> dict[str, Any]:
    """Keyword arguments for ``SamplingParams``; None means "use its default"."""
    kw: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
        "stop_token_ids": req.stop_token_ids,
        "seed": req.seed,
        "logprobs": logprobs,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "ignore_eos": req.ignore_eos,
    }
    return {k: v for k, v in kw.items() if v is not None}


# --------------------------------------------------------------------------- responses


FinishReason = Literal["stop", "length", "abort", "error"] | None


class UsageInfo(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogProbs(msgspec.Struct):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogProbs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(msgspec.Struct):
    role: str
    content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion"


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: FinishReason = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "infinite"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "decode_chat_request",
    "decode_completion_request",
    "prompt_inputs",
    "sampling_kwargs",
]
