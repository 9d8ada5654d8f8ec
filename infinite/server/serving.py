"""What /v1/completions and /v1/chat/completions share: jobs, the merged engine streams, SSE.

A request becomes ``len(prompts) * n`` engine requests (choice index
``prompt_index * n + i``, seed ``seed + i`` when seeded, as vLLM does). Their
output streams are merged; a streamed request asks the engine for deltas (the
new text, token ids and logprobs of each step: the engine's detokenizer only
ever releases whole UTF-8 characters and holds back possible stop-string
prefixes), a non-streamed one for its finished output only.
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
from infinite.sampling.structured import GrammarError
from infinite.server import shapes as S
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
    num_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the engine took from the prefix cache
    num_logprobs: int = 0
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final: Any = None  # last CompletionOutput
    request: Any = None  # the engine's validated request (make_request), handed to generate()
    prompt_logprobs: list[Any] | None = None  # the engine's, once the prefill produced them
    # The choice so far, folded from the engine's outputs: deltas when streaming (O(new) a step).
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    text_pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        if len(self.text_pieces) > 1:
            self.text_pieces = ["".join(self.text_pieces)]
        return self.text_pieces[0] if self.text_pieces else ""


# --------------------------------------------------------------------------- preparing


def make_sampling_params(kwargs: dict[str, Any]) -> Any:
    from infinite.sampling.params import SamplingParams

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        param = next((k for k in kwargs if k in str(e)), None)
        raise bad_request(str(e), param) from None


async def tokenize(engine: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    tok = engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer: send the prompt as token ids", "prompt")
    if len(text) > _TOKENIZE_IN_THREAD_CHARS:
        return list(await asyncio.get_running_loop().run_in_executor(None, tok.encode, text, add_special_tokens))
    return list(tok.encode(text, add_special_tokens=add_special_tokens))


def render_chat(engine: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, **template_kwargs: Any) -> str:
    """The chat prompt as text: the tokenizer's template (or its documented fallback).
    ``template_kwargs``: ``tools``, ``chat_template`` (replaces the checkpoint's) and any extra variables."""
    tok = engine.tokenizer
    if tok is None:
        raise bad_request("this model has no tokenizer, so it cannot serve chat requests", "messages")
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
    except (ValueError, TypeError, KeyError, TemplateError) as e:
        raise bad_request(f"cannot apply the chat template: {e}", "messages") from None


def chat_prompt_ids(engine: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                    add_special_tokens: bool = False, **template_kwargs: Any) -> list[int]:
    """Token ids of the chat prompt; the template writes BOS itself when the model wants one."""
    rendered = render_chat(engine, messages, add_generation_prompt, **template_kwargs)
    return list(engine.tokenizer.encode(rendered, add_special_tokens=add_special_tokens))


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
    structured_field: str | None = None,
    stream: bool = False,
) -> list[Job]:
    """One job per choice, each validated by the engine now so that errors come before streaming
    (a grammar that cannot compile is a 400 on ``structured_field``, the field that asked for it)."""
    engine = state.ready_engine()
    jobs = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            kw = dict(kwargs)
            # Streamed: what is new each step; not: only the finished output (vLLM's output kinds).
            kw["output_kind"] = "delta" if stream else "final_only"
            if kw.get("seed") is not None:
                kw["seed"] = kw["seed"] + i
            index = p * n + i
            job = Job(index, f"{request_id}-{index}", ids, make_sampling_params(kw), RequestTimer(state.metrics, arrival))
            try:
                job.request = engine.make_request(ids, job.params, job.request_id)
            except GrammarError as e:
                raise bad_request(str(e), structured_field) from None
            except (ValueError, TypeError) as e:
                raise bad_request(str(e), "prompt") from None
            jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- running


def apply_output(job: Job, out: Any, now: float) -> str:
    """Fold one engine output into ``job``: a delta (streaming) or a cumulative one; return the new text."""
    c = out.outputs[0]
    if out.delta_offset is not None:
        delta = c.text
        job.token_ids.extend(c.token_ids)
        job.logprobs.extend(c.logprobs or ())
        if delta:
            job.text_pieces.append(delta)
    else:
        old = job.text
        delta = c.text[len(old):] if c.text.startswith(old) else c.text
        job.token_ids = list(c.token_ids)
        job.logprobs = list(c.logprobs or ())
        job.text_pieces = [c.text] if c.text else []
    job.timer.on_output(now, len(job.token_ids))
    job.num_tokens = len(job.token_ids)
    job.num_cached_tokens = out.num_cached_tokens
    job.final = c
    if out.prompt_logprobs is not None:
        job.prompt_logprobs = out.prompt_logprobs
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


async def run_to_end(state: ServerState, jobs: list[Job]) -> None:
    """A non-streamed answer: run every job to its end, folding in its outputs."""
    async with running(state, jobs) as stream:
        async for i, out in stream:
            apply_output(jobs[i], out, time.monotonic())


def usage_of(jobs: list[Job], prompts: list[list[int]]) -> S.UsageInfo:
    """Prompt tokens count once per prompt, and so do its cached ones (its first choice's: the n
    choices of a prompt share it)."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(j.num_tokens for j in jobs)
    n = len(jobs) // max(1, len(prompts))
    cached = sum(j.num_cached_tokens for j in jobs[::n]) if jobs else 0
    return S.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=S.PromptTokensDetails(cached))


def job_usage(job: Job) -> S.UsageInfo:
    """One choice's usage so far (``continuous_usage_stats``: on every chunk, as vLLM)."""
    p = len(job.prompt_ids)
    return S.UsageInfo(prompt_tokens=p, completion_tokens=job.num_tokens, total_tokens=p + job.num_tokens,
                       prompt_tokens_details=S.PromptTokensDetails(job.num_cached_tokens))


def request_id_of(req: Any, prefix: str) -> str:
    """vLLM's ``request_id`` field names the response; otherwise a fresh one."""
    return req.request_id or f"{prefix}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- streaming


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


