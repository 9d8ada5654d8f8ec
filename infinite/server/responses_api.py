"""``POST /v1/responses`` (OpenAI's Responses API, text only) and ``POST /v1/embeddings`` (refused).

A response is one chat turn: ``instructions`` become a system message, ``input`` (a
string, or messages with text content) the conversation, rendered by the chat
template. Streaming sends OpenAI's typed events (``event: <type>`` lines), from
``response.created`` to ``response.completed``; nothing is stored, so
``previous_response_id`` and ``store`` are refused (infinite.server.fields).

Embeddings: the served checkpoints are causal LMs with no pooling head, so
``/v1/embeddings`` is a 400 saying so (vLLM, too, serves embeddings only from a
model run as a pooling model).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

from infinite.server import protocol as P
from infinite.server.errors import bad_request
from infinite.server.fields import RESPONSES, check_refused
from infinite.server.sampling_args import structured_spec
from infinite.server.serving import (apply_output, build_jobs, chat_prompt_ids, check_length, default_max_tokens,
                                     run_to_end, running)
from infinite.server.state import app_state
from infinite.server.streaming import SSEWriter


class InputPart(msgspec.Struct):
    type: str
    text: str | None = None


class InputMessage(msgspec.Struct):
    role: str
    content: str | list[InputPart]
    type: str = "message"


class ResponsesRequest(msgspec.Struct):
    input: str | list[InputMessage] | None = None
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    user: str | None = None
    response_format: P.ResponseFormat | None = None
    # Declared so that the server sees them; refused with a 400 (infinite.server.fields).
    tools: Any = None
    store: Any = None
    previous_response_id: Any = None
    background: Any = None
    reasoning: Any = None
    include: Any = None


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    for i, m in enumerate(req.input or []):
        if m.role not in P.CHAT_ROLES:
            raise bad_request(f"input[{i}].role must be one of {list(P.CHAT_ROLES)}, got {m.role!r}", "input")
        if isinstance(m.content, str):
            text = m.content
        else:
            bad = [p.type for p in m.content if p.type not in ("input_text", "output_text", "text") or p.text is None]
            if bad:
                raise bad_request(f"input[{i}]: only text content is supported, got {bad[0]!r}", "input")
            text = "".join(p.text or "" for p in m.content)
        msgs.append({"role": m.role, "content": text})
    return msgs


def _response(rid: str, created: int, model: str, req: ResponsesRequest, status: str, text: str | None,
              usage: dict | None, max_tokens: int) -> dict[str, Any]:
    output = []
    if text is not None:
        output.append(_message_item(rid, text, "completed" if status != "in_progress" else "in_progress"))
    return {
        "id": rid, "object": "response", "created_at": created, "model": model, "status": status,
        "output": output, "usage": usage, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions, "max_output_tokens": max_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "metadata": {},
        "text": {"format": {"type": "text"}}, "truncation": "disabled", "store": False, "user": req.user,
    }


def _message_item(rid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{rid[5:]}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


async def handle_responses(request: web.Request) -> web.StreamResponse:
    state = app_state(request.app)
    arrival = time.monotonic()
    req: ResponsesRequest = P.decode_body(await request.read(), ResponsesRequest)
    check_refused(req, RESPONSES)
    engine = state.ready_engine()
    model = state.check_model(req.model)
    if req.input is None or req.input == [] or req.input == "":
        raise bad_request("input is required", "input")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request(f"max_output_tokens must be at least 1, got {req.max_output_tokens}", "max_output_tokens")
    ids = chat_prompt_ids(engine, _messages(req), True)
    max_tokens = req.max_output_tokens or default_max_tokens(engine, len(ids), "input")
    check_length(engine, len(ids), max_tokens, "input")
    spec, spec_field = structured_spec(P.ChatCompletionRequest(response_format=req.response_format))
    kw = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", req.temperature), ("top_p", req.top_p),
                            ("structured_outputs", spec)) if v is not None}
    rid = f"resp_{uuid.uuid4().hex}"
    (job,) = build_jobs(state, [ids], 1, kw, rid, arrival, spec_field, stream=bool(req.stream))
    created = int(time.time())

    def usage() -> dict[str, Any]:
        return {"input_tokens": len(ids), "output_tokens": job.num_tokens, "total_tokens": len(ids) + job.num_tokens,
                "input_tokens_details": {"cached_tokens": job.num_cached_tokens}, "output_tokens_details": {"reasoning_tokens": 0}}

    def final() -> dict[str, Any]:
        status = "incomplete" if job.finish_reason == "length" else "completed"
        return _response(rid, created, model, req, status, job.text, usage(), max_tokens)

    if not req.stream:
        await run_to_end(state, [job])
        return web.json_response(final())

    writer = SSEWriter(request)
    seq = iter(range(1 << 62))
    item_id = f"msg_{rid[5:]}"

    async def event(kind: str, **fields: Any) -> None:
        await writer.send_event(kind, {"type": kind, "sequence_number": next(seq), **fields})

    async with running(state, [job]) as stream:
        await writer.start()
        try:
            started = _response(rid, created, model, req, "in_progress", None, None, max_tokens)
            await event("response.created", response=started)
            await event("response.in_progress", response=started)
            await event("response.output_item.added", output_index=0, item=_message_item(rid, "", "in_progress"))
            part = {"type": "output_text", "text": "", "annotations": []}
            await event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part)
            async for _, out in stream:
                delta = apply_output(job, out, time.monotonic())
                if delta:
                    await event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
                                delta=delta, logprobs=[])
            await event("response.output_text.done", item_id=item_id, output_index=0, content_index=0,
                        text=job.text, logprobs=[])
            part = {"type": "output_text", "text": job.text, "annotations": []}
            await event("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=part)
            await event("response.output_item.done", output_index=0, item=_message_item(rid, job.text, "completed"))
            done = final()
            await event("response.completed" if done["status"] == "completed" else "response.incomplete",
                        response=done)
        except ConnectionResetError:
            return writer.response
        except Exception as e:  # noqa: BLE001 - after the start an error can only be an event
            failed = _response(rid, created, model, req, "failed", job.text, usage(), max_tokens)
            failed["error"] = {"code": "server_error", "message": str(e)}
            await event("response.failed", response=failed)
    await writer.response.write_eof()
    return writer.response


async def handle_embeddings(request: web.Request) -> web.Response:
    state = app_state(request.app)
    body = P.decode_body(await request.read(), dict)
    state.check_model(body.get("model"))
    state.ready_engine()
    raise bad_request(
        "this server runs a generative (causal LM) model, not an embedding model, so it does not serve "
        "/v1/embeddings (vLLM likewise serves embeddings only from a model run as a pooling model)", "model")


__all__ = ["handle_embeddings", "handle_responses"]
