"""POST /v1/completions and /v1/chat/completions over the async engine.

A request becomes ``len(prompts) * n`` engine requests (choice index
``prompt_index * n + i``, seed ``seed + i`` when seeded, as vLLM does). Their
output streams are merged; the engine yields cumulative text, so a streamed
delta is the new suffix of it (the engine's detokenizer only ever releases
whole UTF-8 characters and holds back possible stop-string prefixes).
Everything that can fail is checked before the first byte goes out, so those
failures are plain HTTP errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from jinja2.exceptions import TemplateError

from infinite.errors import RequestError
from infinite.server import protocol as P
from infinite.server.errors import APIError, bad_request
from infinite.server.metrics import RequestTimer
from infinite.server.state import ServerState
from infinite.server.streaming import SSEWriter, merge_streams

log = logging.getLogger("infinite.server")

_TOKENIZE_IN_THREAD_CHARS = 20_000  # long prompts are tokenized off the event loop


@dataclass
class Job:
    """One engine request: a choice of the HTTP request."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    timer: RequestTimer
    text: str = ""
    num_tokens: int = 0
    num_logprobs: int = 0
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final: Any = None  # last CompletionOutput
    request: Any = None  # the engine's validated request (make_request), handed to generate()
    logprob_entries: list[Any] = field(default_factory=list)


# --------------------------------------------------------------------------- preparing


def make_sampling_params(kwargs: dict[str, Any]) -> Any:
    from infinite.sampling.params import SamplingParams

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        param = next((k for k in kwargs if k in str(e)), None)
        raise bad_request(str(e), param) from None


async def tokenize(engine: Any, text: str) -> list[int]:
    tok = engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt")
    if len(text) > _TOKENIZE_IN_THREAD_CHARS:
        return list(await asyncio.get_running_loop().run_in_executor(None, tok.encode, text))
    return list(tok.encode(text))


def chat_prompt_ids(engine: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Token ids of the chat prompt: the tokenizer's template (or its documented fallback)."""
    tok = engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer, so it cannot serve chat requests", "messages")
    try:
        rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError, KeyError, TemplateError) as e:
        raise bad_request(f"cannot apply the chat template: {e}", "messages") from None
    if isinstance(rendered, str):
        # The template writes BOS itself when the model wants one.
        return list(tok.encode(rendered, add_special_tokens=False))
    return list(rendered)


def check_length(engine: Any, prompt_len: int, max_tokens: int, what: str) -> None:
    total = prompt_len + max_tokens
    if total > engine.max_model_len:
        raise bad_request(
            f"This model's maximum context length is {engine.max_model_len} tokens. However, you "
            f"requested {total} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            "max_tokens" if prompt_len < engine.max_model_len else what,
        )
    cap = engine.capacity_tokens
    if total > cap:
        raise bad_request(
            f"The cluster's KV cache can hold at most {cap} tokens for one request. However, you "
            f"requested {total} tokens ({prompt_len} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            "max_tokens" if prompt_len < cap else what,
        )


def default_max_tokens(engine: Any, prompt_len: int, what: str) -> int:
    """Chat without max_tokens: whatever room is left, as vLLM does."""
    room = min(engine.max_model_len, engine.capacity_tokens) - prompt_len
    if room < 1:
        limit = min(engine.max_model_len, engine.capacity_tokens)
        raise bad_request(
            f"The {what} is {prompt_len} tokens long, which leaves no room to generate: the limit is "
            f"{limit} tokens (max_model_len {engine.max_model_len}, cluster capacity {engine.capacity_tokens}).",
            what,
        )
    return room


def build_jobs(
    state: ServerState,
    prompts: list[list[int]],
    n: int,
    kwargs: dict[str, Any],
    request_id: str,
    arrival: float,
) -> list[Job]:
    """One job per choice, each validated by the engine now so that errors come before streaming."""
    engine = state.ready_engine()
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            kw = dict(kwargs)
            if kw.get("seed") is not None:
                kw["seed"] = kw["seed"] + i
            index = p * n + i
            job = Job(index, f"{request_id}-{index}", ids, make_sampling_params(kw), RequestTimer(state.metrics, arrival))
            try:
                job.request = engine.make_request(ids, job.params, job.request_id)
            except (ValueError, TypeError) as e:
                raise bad_request(str(e), "prompt") from None
            jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- running


def apply_output(job: Job, out: Any, now: float) -> str:
    """Fold one cumulative engine output into ``job``; return the new text."""
    c = out.outputs[0]
    delta = c.text[len(job.text):] if c.text.startswith(job.text) else c.text
    job.text = c.text
    job.timer.on_output(now, len(c.token_ids))
    job.num_tokens = len(c.token_ids)
    job.final = c
    if out.finished:
        job.finished = True
        job.finish_reason = c.finish_reason
        job.stop_reason = getattr(c, "stop_reason", None)
        job.timer.on_finish(now, c.finish_reason)
    return delta


@contextlib.asynccontextmanager
async def running(state: ServerState, jobs: list[Job]):
    """Admit the jobs, merge their streams; on exit abort whatever has not finished."""
    engine = state.ready_engine()
    state.admit(len(jobs))
    for job in jobs:
        state.metrics.labels(state.metrics.prompt_tokens).inc(len(job.prompt_ids))
    streams = [engine.generate(j.request) for j in jobs]
    merged = merge_streams(streams)
    try:
        yield merged
    finally:
        try:
            await merged.aclose()
            for job in jobs:
                if not job.finished:
                    state.metrics.labels(state.metrics.aborted).inc()
                    await engine.abort(job.request_id)
        finally:
            state.release(len(jobs))


def usage_of(jobs: list[Job], prompts: list[list[int]]) -> P.UsageInfo:
    prompt = sum(len(p) for p in prompts)
    completion = sum(j.num_tokens for j in jobs)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# --------------------------------------------------------------------------- logprobs


def _entries(c: Any, start: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """The engine's logprobs from token ``start`` on, as (token id, logprob, top [(id, logprob)] best first).

    The engine gives, per generated token, a mapping token id -> logprob (a
    float or an object with ``.logprob``) that holds the chosen token and
    the top-k alternatives.
    """
    raw = (getattr(c, "logprobs", None) or [])[start:]
    out = []
    for tid, d in zip(c.token_ids[start:], raw):
        items = [(int(t), float(getattr(v, "logprob", v))) for t, v in d.items()]
        chosen = dict(items).get(int(tid), float("nan"))
        items.sort(key=lambda x: -x[1])
        out.append((int(tid), chosen, items))
    return out


def _token_text(engine: Any, tid: int) -> str:
    tok = engine.tokenizer
    return tok.decode([tid], skip_special_tokens=False) if tok is not None else f"token_id:{tid}"


def completion_logprobs(engine: Any, job: Job, c: Any, top: int, text_start: int) -> P.CompletionLogProbs:
    """Entries of ``c`` not yet sent, in the completions format."""
    entries = _entries(c, job.num_logprobs)
    job.num_logprobs += len(entries)
    lp = P.CompletionLogProbs([], [], [], [])
    offset = text_start
    for tid, chosen, items in entries:
        s = _token_text(engine, tid)
        lp.tokens.append(s)
        lp.token_logprobs.append(chosen)
        lp.text_offset.append(offset)
        offset += len(s)
        lp.top_logprobs.append({_token_text(engine, t): v for t, v in items[:top]} if top else None)
    return lp


def chat_logprobs(engine: Any, job: Job, c: Any, top: int) -> P.ChatLogProbs:
    entries = _entries(c, job.num_logprobs)
    job.num_logprobs += len(entries)
    content = []
    for tid, chosen, items in entries:
        s = _token_text(engine, tid)
        tops = [P.TopLogprob(_token_text(engine, t), v, list(_token_text(engine, t).encode())) for t, v in items[:top]]
        content.append(P.ChatTokenLogprob(s, chosen, list(s.encode()), tops))
    return P.ChatLogProbs(content)


# --------------------------------------------------------------------------- completions


async def create_completion(request: web.Request, state: ServerState) -> web.StreamResponse:
    arrival = time.monotonic()
    req = P.decode_completion_request(await request.read())
    engine = state.ready_engine()
    model = state.check_model(req.model)
    prompts = [p if isinstance(p, list) else await tokenize(engine, p) for p in P.prompt_inputs(req.prompt)]
    max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens(engine, max(map(len, prompts)), "prompt")
    for ids in prompts:
        check_length(engine, len(ids), max_tokens, "prompt")
    rid = f"cmpl-{uuid.uuid4().hex}"
    kwargs = P.sampling_kwargs(req, max_tokens, req.logprobs)
    jobs = build_jobs(state, prompts, req.n or 1, kwargs, rid, arrival)
    created = int(time.time())
    top = req.logprobs or 0

    if not req.stream:
        async with running(state, jobs) as stream:
            async for i, out in stream:
                apply_output(jobs[i], out, time.monotonic())
        choices = []
        for j in jobs:
            lp = completion_logprobs(engine, j, j.final, top, 0) if req.logprobs is not None and j.final else None
            choices.append(P.CompletionChoice(j.index, j.text, lp, j.finish_reason, j.stop_reason))
        body = P.CompletionResponse(rid, created, model, choices, usage_of(jobs, prompts))
        return web.Response(body=P.encode(body), content_type="application/json")

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def chunks(stream: Any) -> Any:
        async for i, out in stream:
            job = jobs[i]
            start = len(job.text)
            delta = apply_output(job, out, time.monotonic())
            lp = completion_logprobs(engine, job, job.final, top, start) if req.logprobs is not None else None
            if not delta and not job.finished and not (lp and lp.tokens):
                continue
            choice = P.CompletionChoice(job.index, delta, lp, job.finish_reason, job.stop_reason)
            yield P.CompletionResponse(rid, created, model, [choice])
        if include_usage:
            yield P.CompletionResponse(rid, created, model, [], usage_of(jobs, prompts))

    def error_chunk(cut: list[Job]) -> P.CompletionResponse:
        return P.CompletionResponse(rid, created, model, [P.CompletionChoice(j.index, "", None, "error") for j in cut])

    return await stream_response(request, state, jobs, chunks, error_chunk)


async def stream_response(
    request: web.Request, state: ServerState, jobs: list[Job], chunks: Any, error_chunk: Any
) -> web.StreamResponse:
    """Send ``chunks(merged engine stream)`` as SSE. A failure after the start ends every
    unfinished choice with ``error_chunk(jobs)`` (finish_reason "error"), then an error event:
    a cut-short answer never looks like a normal end."""
    writer = SSEWriter(request)
    async with running(state, jobs) as stream:
        await writer.start()
        try:
            async for chunk in chunks(stream):
                await writer.send(chunk)
        except ConnectionResetError:
            return writer.response  # the client went away: leaving the block aborts its requests
        except Exception as e:
            if isinstance(e, RequestError):
                err = APIError(str(e), status=e.http_status)
            elif isinstance(e, APIError):
                err = e
            else:
                log.exception("stream of %s failed", jobs[0].request_id)
                err = APIError(f"internal server error: {type(e).__name__}: {e}", status=500)
            cut = [j for j in jobs if not j.finished]
            for j in cut:
                j.finished, j.finish_reason = True, "error"
                j.timer.on_finish(time.monotonic(), "error")
            if cut:
                await _send_quietly(writer, error_chunk(cut))
            await _send_quietly(writer, err.body())
    with contextlib.suppress(ConnectionResetError):
        await writer.done()
    return writer.response


async def _send_quietly(writer: SSEWriter, obj: Any) -> None:
    with contextlib.suppress(ConnectionResetError):
        await writer.send(obj)


# --------------------------------------------------------------------------- chat


async def create_chat_completion(request: web.Request, state: ServerState) -> web.StreamResponse:
    arrival = time.monotonic()
    req = P.decode_chat_request(await request.read())
    engine = state.ready_engine()
    model = state.check_model(req.model)
    ids = chat_prompt_ids(engine, P.chat_messages(req), req.add_generation_prompt)
    max_tokens = P.chat_max_tokens(req)
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, len(ids), "messages")
    check_length(engine, len(ids), max_tokens, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else 0
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    kwargs = P.sampling_kwargs(req, max_tokens, top if req.logprobs else None)
    jobs = build_jobs(state, [ids], req.n or 1, kwargs, rid, arrival)
    created = int(time.time())

    if not req.stream:
        async with running(state, jobs) as stream:
            async for i, out in stream:
                apply_output(jobs[i], out, time.monotonic())
        choices = [
            P.ChatChoice(
                j.index,
                P.ChatResponseMessage("assistant", j.text),
                chat_logprobs(engine, j, j.final, top) if req.logprobs and j.final else None,
                j.finish_reason,
                j.stop_reason,
            )
            for j in jobs
        ]
        body = P.ChatCompletionResponse(rid, created, model, choices, usage_of(jobs, [ids]))
        return web.Response(body=P.encode(body), content_type="application/json")

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def chunks(stream: Any) -> Any:
        for j in jobs:  # the role comes first, once per choice
            first = P.ChatStreamChoice(j.index, P.DeltaMessage(role="assistant", content=""))
            yield P.ChatCompletionChunk(rid, created, model, [first])
        async for i, out in stream:
            job = jobs[i]
            delta = apply_output(job, out, time.monotonic())
            lp = chat_logprobs(engine, job, job.final, top) if req.logprobs else None
            if not delta and not job.finished and not (lp and lp.content):
                continue
            choice = P.ChatStreamChoice(job.index, P.DeltaMessage(content=delta), lp, job.finish_reason, job.stop_reason)
            yield P.ChatCompletionChunk(rid, created, model, [choice])
        if include_usage:
            yield P.ChatCompletionChunk(rid, created, model, [], usage_of(jobs, [ids]))

    def error_chunk(cut: list[Job]) -> P.ChatCompletionChunk:
        choices = [P.ChatStreamChoice(j.index, P.DeltaMessage(content=""), None, "error") for j in cut]
        return P.ChatCompletionChunk(rid, created, model, choices)

    return await stream_response(request, state, jobs, chunks, error_chunk)
