"""POST /v1/completions, including ``echo`` (with prompt logprobs) as vLLM shapes it.

With ``echo`` a choice starts with its prompt's text; with ``logprobs`` too, its
logprobs start with the prompt's: ``null`` for the first prompt token (nothing
predicts it), then what the prefill computed. ``max_tokens: 0`` with ``echo``
(lm-eval's loglikelihood requests) runs the prompt and returns only it; the engine
still samples one token, which is dropped, as vLLM does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from infinite.server import protocol as P
from infinite.server import shapes as S
from infinite.server.logprob_format import completion_logprobs, prompt_logprobs_json
from infinite.server.sampling_args import sampling_kwargs, structured_spec
from infinite.server.serving import (Job, apply_output, build_jobs, check_length, default_max_tokens, job_usage,
                                     request_id_of, run_to_end, stream_response, tokenize, usage_of)
from infinite.server.state import ServerState


@dataclass
class Echo:
    """How a request's choices are rendered: what is echoed, which logprobs, token names."""

    prompt_texts: list[str] | None  # per prompt, when echo
    only: bool  # echo with max_tokens 0: the prompt and nothing else
    top: int | None  # completions `logprobs`
    as_ids: bool


async def create_completion(request: web.Request, state: ServerState) -> web.StreamResponse:
    arrival = time.monotonic()
    req = P.decode_completion_request(await request.read())
    engine = state.ready_engine()
    model = state.check_model(req.model)
    inputs = P.prompt_inputs(req.prompt)
    prompts = [p if isinstance(p, list) else await tokenize(engine, p, req.add_special_tokens) for p in inputs]
    if req.truncate_prompt_tokens is not None:
        prompts = [ids[-req.truncate_prompt_tokens:] for ids in prompts]
    echo = Echo(None, bool(req.echo) and req.max_tokens == 0, req.logprobs, bool(req.return_tokens_as_token_ids))
    if req.echo:
        echo.prompt_texts = [
            p if isinstance(p, str) and req.truncate_prompt_tokens is None else engine.tokenizer.decode(ids)
            for p, ids in zip(inputs, prompts)
        ]
    max_tokens = 1 if echo.only else req.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, max(map(len, prompts)), "prompt")
    for ids in prompts:
        check_length(engine, len(ids), max_tokens, "prompt")
    rid = request_id_of(req, "cmpl")
    spec, spec_field = structured_spec(req)
    # echo + logprobs needs the prompt's logprobs at the same depth as the output's.
    prompt_lp = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_lp = max(prompt_lp or 0, req.logprobs)
    kwargs = sampling_kwargs(req, max_tokens, req.logprobs, spec, prompt_lp)
    n = req.n or 1
    jobs = build_jobs(state, prompts, n, kwargs, rid, arrival, spec_field, stream=bool(req.stream))
    created = int(time.time())
    tok = engine.tokenizer

    def render(job: Job, text: str, start_token: int, start_char: int, first: bool) -> tuple[str, Any]:
        """The choice's text and logprobs from output token ``start_token`` on; ``first``: the
        part that also carries the echoed prompt."""
        ids: list[int] = [] if echo.only else job.token_ids[start_token:]
        entries: list[Any] = [] if echo.only else job.logprobs[start_token:]
        if echo.only:
            text = ""
        if first and echo.prompt_texts is not None:
            text = echo.prompt_texts[job.index // n] + text
            ids = job.prompt_ids + ids
            entries = list(job.prompt_logprobs or [None] * len(job.prompt_ids)) + entries
        if echo.top is None:
            return text, None
        return text, completion_logprobs(tok, ids, entries, echo.top, start_char, echo.as_ids)

    def prompt_lp_field(job: Job) -> Any:
        return prompt_logprobs_json(tok, job.prompt_logprobs) if req.prompt_logprobs is not None else None

    def usage() -> S.UsageInfo:
        u = usage_of(jobs, prompts)
        if echo.only:
            u.completion_tokens, u.total_tokens = 0, u.prompt_tokens
        return u

    if not req.stream:
        await run_to_end(state, jobs)
        choices = []
        for j in jobs:
            text, lp = render(j, j.text, 0, 0, True) if j.final is not None else (j.text, None)
            choices.append(S.CompletionChoice(j.index, text, lp, j.finish_reason, j.stop_reason, prompt_lp_field(j)))
        body = S.CompletionResponse(rid, created, model, choices, usage())
        return web.Response(body=P.encode(body), content_type="application/json")

    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    sent_tokens = [0] * len(jobs)
    sent_chars = [0] * len(jobs)
    started = [False] * len(jobs)

    async def chunks(stream: Any) -> Any:
        async for i, out in stream:
            job = jobs[i]
            first, started[i] = not started[i], True
            delta = apply_output(job, out, time.monotonic())
            text, lp = render(job, delta, sent_tokens[i], sent_chars[i], first)
            sent_tokens[i] = len(job.token_ids)
            sent_chars[i] += len(text)
            if not text and not job.finished and not (lp and lp.tokens):
                continue
            choice = S.CompletionChoice(job.index, text, lp, job.finish_reason, job.stop_reason)
            yield S.CompletionResponse(rid, created, model, [choice], job_usage(job) if continuous else None)
        if include_usage:
            yield S.CompletionResponse(rid, created, model, [], usage())

    def error_chunk(cut: list[Job]) -> S.CompletionResponse:
        return S.CompletionResponse(rid, created, model, [S.CompletionChoice(j.index, "", None, "error") for j in cut])

    return await stream_response(request, state, jobs, chunks, error_chunk)
