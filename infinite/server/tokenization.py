"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-eval's ``local-completions`` model asks ``/tokenizer_info`` first and, when it
answers, tokenizes through the server (``/tokenize`` without special tokens,
``/detokenize``), so evaluation needs no local copy of the tokenizer.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from infinite.server import protocol as P
from infinite.server.errors import bad_request
from infinite.server.serving import render_chat
from infinite.server.state import ServerState, app_state


class TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: str | None = None
    messages: list[P.ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]
    model: str | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


def _tokenizer(state: ServerState) -> Any:
    tok = state.ready_engine().tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer")
    return tok


async def handle_tokenize(request: web.Request) -> web.Response:
    state = app_state(request.app)
    req = P.decode_body(await request.read(), TokenizeRequest)
    state.check_model(req.model)
    tok = _tokenizer(state)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt or messages", "prompt")
    if req.prompt is not None:
        text, special = req.prompt, True if req.add_special_tokens is None else req.add_special_tokens
    else:
        chat = P.ChatCompletionRequest(messages=req.messages)
        text = render_chat(state.ready_engine(), P.chat_messages(chat), req.add_generation_prompt)
        special = bool(req.add_special_tokens)
    ids = list(tok.encode(text, add_special_tokens=special))
    strs = [tok.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
    body = TokenizeResponse(len(ids), state.ready_engine().max_model_len, ids, strs)
    return web.Response(body=P.encode(body), content_type="application/json")


async def handle_detokenize(request: web.Request) -> web.Response:
    state = app_state(request.app)
    req = P.decode_body(await request.read(), DetokenizeRequest)
    state.check_model(req.model)
    tok = _tokenizer(state)
    vocab = tok.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of the vocabulary (size {vocab})", "tokens")
    body = DetokenizeResponse(tok.decode(req.tokens, skip_special_tokens=False))
    return web.Response(body=P.encode(body), content_type="application/json")


async def handle_tokenizer_info(request: web.Request) -> web.Response:
    state = app_state(request.app)
    info = _tokenizer(state).info()
    info["model_max_length"] = state.ready_engine().max_model_len
    return web.json_response(info)
