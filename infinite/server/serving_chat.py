"""POST /v1/chat/completions: the chat template (with tools and tool-call history), tool calls out.

The prompt is the chat template rendered with the messages (tool calls and tool
results included) and the request's tools. What comes back is content, or tool calls
found by the server's tool parser (``auto``) or forced by a grammar (``required``,
named); see infinite.server.tools.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from infinite.server import protocol as P
from infinite.server import shapes as S
from infinite.server.errors import bad_request
from infinite.server.logprob_format import chat_logprobs, prompt_logprobs_json
from infinite.server.sampling_args import sampling_kwargs, structured_spec
from infinite.server.serving import (Job, apply_output, build_jobs, chat_prompt_ids, check_length, default_max_tokens,
                                     job_usage, request_id_of, run_to_end, stream_response, usage_of)
from infinite.server.state import ServerState
from infinite.server.tools import ToolStream, extract, finish_reason, plan_tools


async def create_chat_completion(request: web.Request, state: ServerState) -> web.StreamResponse:
    arrival = time.monotonic()
    req = P.decode_chat_request(await request.read())
    engine = state.ready_engine()
    model = state.check_model(req.model)
    settings = state.settings
    plan = plan_tools(req, settings.tool_call_parser, settings.enable_auto_tool_choice)
    template_kwargs: dict[str, Any] = dict(req.chat_template_kwargs or {})
    if plan.template_tools is not None:
        template_kwargs["tools"] = plan.template_tools
    if req.chat_template is not None:
        template_kwargs["chat_template"] = req.chat_template
    ids = chat_prompt_ids(engine, P.chat_messages(req), req.add_generation_prompt, req.add_special_tokens,
                          **template_kwargs)
    if req.truncate_prompt_tokens is not None:
        ids = ids[-req.truncate_prompt_tokens:]
    max_tokens = P.chat_max_tokens(req)
    if max_tokens is None:
        max_tokens = default_max_tokens(engine, len(ids), "messages")
    check_length(engine, len(ids), max_tokens, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else 0
    as_ids = bool(req.return_tokens_as_token_ids)
    rid = request_id_of(req, "chatcmpl")
    spec, spec_field = structured_spec(req)
    if plan.spec is not None:
        if spec is not None:
            raise bad_request(f"tool_choice {plan.mode!r} is enforced with structured output, so it cannot be "
                              f"combined with {spec_field}", spec_field)
        spec, spec_field = plan.spec, "tools"
    kwargs = sampling_kwargs(req, max_tokens, top if req.logprobs else None, spec)
    jobs = build_jobs(state, [ids], req.n or 1, kwargs, rid, arrival, spec_field, stream=bool(req.stream))
    created = int(time.time())
    tok = engine.tokenizer

    def lp_of(job: Job, start: int) -> S.ChatLogProbs | None:
        if not req.logprobs or job.final is None:
            return None
        return chat_logprobs(tok, job.token_ids[start:], job.logprobs[start:], top, as_ids)

    if not req.stream:
        await run_to_end(state, jobs)
        choices = []
        for j in jobs:
            content, calls = extract(plan, j.text)
            message = S.ChatResponseMessage("assistant", content, calls)
            reason = finish_reason(plan, calls, j.finish_reason)
            choices.append(S.ChatChoice(j.index, message, lp_of(j, 0), reason, j.stop_reason))
        prompt_lp = prompt_logprobs_json(tok, jobs[0].prompt_logprobs) if req.prompt_logprobs is not None else None
        body = S.ChatCompletionResponse(rid, created, model, choices, usage_of(jobs, [ids]), prompt_logprobs=prompt_lp)
        return web.Response(body=P.encode(body), content_type="application/json")

    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    streams = [ToolStream(plan) for _ in jobs]
    sent = [0] * len(jobs)

    async def chunks(stream: Any) -> Any:
        for j in jobs:  # the role comes first, once per choice
            first = S.ChatStreamChoice(j.index, S.DeltaMessage(role="assistant", content=""))
            yield S.ChatCompletionChunk(rid, created, model, [first], job_usage(j) if continuous else None)
        async for i, out in stream:
            job = jobs[i]
            delta = apply_output(job, out, time.monotonic())
            lp = lp_of(job, sent[i])
            sent[i] = len(job.token_ids)
            content, calls = streams[i].feed(delta, job.finished)
            if not content and not calls and not job.finished and not (lp and lp.content):
                continue
            reason = job.finish_reason
            if job.finished and streams[i].num_calls:
                reason = finish_reason(plan, [True], reason)
            message = S.DeltaMessage(content=content if content or not calls else None, tool_calls=calls or None)
            choice = S.ChatStreamChoice(job.index, message, lp, reason, job.stop_reason)
            yield S.ChatCompletionChunk(rid, created, model, [choice], job_usage(job) if continuous else None)
        if include_usage:
            yield S.ChatCompletionChunk(rid, created, model, [], usage_of(jobs, [ids]))

    def error_chunk(cut: list[Job]) -> S.ChatCompletionChunk:
        choices = [S.ChatStreamChoice(j.index, S.DeltaMessage(content=""), None, "error") for j in cut]
        return S.ChatCompletionChunk(rid, created, model, choices)

    return await stream_response(request, state, jobs, chunks, error_chunk)
