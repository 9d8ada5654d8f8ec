"""From a decoded request to ``SamplingParams`` keyword arguments: the fields the engine honours.

Structured output can be asked for in four spellings (OpenAI's ``response_format``,
vLLM's ``structured_outputs`` and its older ``guided_*`` fields); they all become one
``StructuredOutputsParams``, and asking in two ways at once is a 400.
"""

from __future__ import annotations

from typing import Any

from infinite.sampling.params import StructuredOutputsParams
from infinite.server.errors import bad_request


def structured_spec(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The one structured-output spec of a completions or chat request and the field that asked."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type != "text":
        if rf.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        elif rf.type == "json_schema":
            schema = (rf.json_schema or {}).get("schema")
            if schema is None:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
            found.append(("response_format", {"json": schema}))
        else:
            raise bad_request(
                f"response_format.type must be 'text', 'json_object' or 'json_schema', got {rf.type!r}",
                "response_format",
            )
    so = req.structured_outputs
    if so is not None:
        fields = {k: getattr(so, k) for k in ("json", "regex", "choice", "grammar", "json_object")}
        found.append(("structured_outputs", {k: v for k, v in fields.items() if v is not None}))
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                      ("guided_grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found.append((name, {key: value}))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise bad_request(f"ask for structured output one way only; got {names}", found[1][0])
    name, kw = found[0]
    try:
        return StructuredOutputsParams(**kw), name
    except (ValueError, TypeError) as e:
        raise bad_request(f"{name}: {e}", name) from None


def sampling_kwargs(
    req: Any, max_tokens: int, logprobs: int | None, structured: StructuredOutputsParams | None = None,
    prompt_logprobs: int | None = None,
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
        "min_tokens": req.min_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "skip_special_tokens": req.skip_special_tokens,
        "prompt_logprobs": prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
        "logit_bias": dict(req.logit_bias) if req.logit_bias else None,
        "structured_outputs": structured,
        "cache_salt": req.cache_salt,
    }
    return {k: v for k, v in kw.items() if v is not None}
