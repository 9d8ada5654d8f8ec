"""Every request field of the OpenAI and vLLM APIs, and whether this server honours it.

One list drives three things: the 400 for a refused field (``check_refused``), the
table in docs/server.md (``markdown_table``; ``python -m infinite.server.fields``
prints it), and the test that sends each refused field and expects its 400. A field
that is refused is still declared on the request struct (as ``Any``), so the server
sees it; sending it with its neutral value (``None``, or e.g. ``use_beam_search:
false``) asks for nothing and passes. Names outside this list are ignored, as vLLM
ignores unknown fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infinite.server.errors import bad_request

COMPLETIONS, CHAT, RESPONSES = "completions", "chat", "responses"
BOTH = (COMPLETIONS, CHAT)


@dataclass(frozen=True)
class Field:
    name: str
    endpoints: tuple[str, ...]
    supported: bool
    note: str = ""
    example: Any = None  # refused fields: a value that asks for the feature (the test sends it)
    neutral: tuple = ()  # refused fields: values besides None that ask for nothing


def _s(name: str, endpoints: tuple[str, ...], note: str = "") -> Field:
    return Field(name, endpoints, True, note)


def _r(name: str, endpoints: tuple[str, ...], note: str, example: Any, neutral: tuple = ()) -> Field:
    return Field(name, endpoints, False, note, example, neutral)


FIELDS: tuple[Field, ...] = (
    # ---- OpenAI fields, both endpoints
    _s("model", (*BOTH, RESPONSES), "must be the served name (else 404)"),
    _s("max_tokens", BOTH, "completions: 0 only with `echo`"),
    _s("temperature", (*BOTH, RESPONSES)),
    _s("top_p", (*BOTH, RESPONSES)),
    _s("n", BOTH, "1-128"),
    _s("stop", BOTH),
    _s("seed", BOTH, "choice i samples with seed + i"),
    _s("stream", (*BOTH, RESPONSES)),
    _s("stream_options", BOTH, "`include_usage`, `continuous_usage_stats`"),
    _s("logprobs", BOTH, "completions: int 0-20 (the sampled token is always in `top_logprobs`); chat: bool"),
    _s("presence_penalty", BOTH),
    _s("frequency_penalty", BOTH),
    _s("logit_bias", BOTH, "token id -> bias in [-100, 100], added to the logits"),
    _s("user", (*BOTH, RESPONSES), "accepted, not used (OpenAI uses it for abuse tracking)"),
    # ---- completions only
    _s("prompt", (COMPLETIONS,), "str, [str], [int] or [[int]]"),
    _s("echo", (COMPLETIONS,), "prompt text (and with `logprobs` its prompt logprobs, first one null) before the output"),
    _r("suffix", (COMPLETIONS,), "insertion needs a fill-in-the-middle model", "def f():"),
    _r("best_of", BOTH, "only `best_of` = `n` (no ranking by logprob)", 2, neutral=(1,)),
    # ---- chat only
    _s("messages", (CHAT,), "roles system/developer/user/assistant/tool; text parts only; `tool_calls`, `tool_call_id` go to the chat template"),
    _s("max_completion_tokens", (CHAT,), "wins over `max_tokens`"),
    _s("top_logprobs", (CHAT,), "0-20, needs `logprobs: true`"),
    _s("response_format", (*BOTH, RESPONSES), "`text`, `json_object`, `json_schema` (grammar-constrained)"),
    _s("tools", (CHAT,), "function tools, rendered by the chat template"),
    _s("tool_choice", (CHAT,), "`none`, `auto` (needs `--enable-auto-tool-choice`), `required`, named; the last two are grammar-enforced"),
    _s("parallel_tool_calls", (CHAT,), "false keeps the first call"),
    _r("functions", (CHAT,), "deprecated by OpenAI: use `tools`", [{"name": "f"}]),
    _r("function_call", (CHAT,), "deprecated by OpenAI: use `tool_choice`", "auto"),
    _r("audio", (CHAT,), "text-only models", {"voice": "alloy", "format": "wav"}),
    _r("modalities", (CHAT,), "text-only models", ["text", "audio"], neutral=(["text"],)),
    _r("prediction", (CHAT,), "no speculative decoding", {"type": "content", "content": "x"}),
    _r("reasoning_effort", (CHAT,), "no reasoning models", "high"),
    _r("service_tier", (CHAT,), "one tier", "flex", neutral=("auto", "default")),
    _r("store", (CHAT, RESPONSES), "nothing is stored", True, neutral=(False,)),
    _r("metadata", (CHAT,), "only used with `store`", {"k": "v"}),
    _r("web_search_options", (CHAT,), "no web search", {}),
    # ---- vLLM extensions
    _s("top_k", BOTH),
    _s("min_p", BOTH),
    _s("repetition_penalty", BOTH),
    _s("stop_token_ids", BOTH),
    _s("ignore_eos", BOTH),
    _s("min_tokens", BOTH, "EOS and `stop_token_ids` are masked until then"),
    _s("include_stop_str_in_output", BOTH),
    _s("skip_special_tokens", BOTH),
    _s("prompt_logprobs", BOTH, "0-20; `prompt_logprobs` list in the choice (completions) or response (chat)"),
    _s("return_tokens_as_token_ids", BOTH, "logprob tokens as `token_id:<id>`"),
    _s("add_special_tokens", BOTH, "completions default true, chat default false"),
    _s("truncate_prompt_tokens", BOTH, "keeps the last k prompt tokens"),
    _s("structured_outputs", BOTH, "`json`, `regex`, `choice`, `grammar` (Lark or GBNF), `json_object`"),
    _s("guided_json", BOTH, "older name of `structured_outputs.json`"),
    _s("guided_regex", BOTH, "older name of `structured_outputs.regex`"),
    _s("guided_choice", BOTH, "older name of `structured_outputs.choice`"),
    _s("guided_grammar", BOTH, "older name of `structured_outputs.grammar`"),
    _s("request_id", BOTH, "becomes the response id"),
    _s("cache_salt", BOTH, "requests share cached prefix KV only under the same salt (tenants apart)"),
    _s("add_generation_prompt", (CHAT,)),
    _s("chat_template", (CHAT,), "a jinja template used instead of the checkpoint's"),
    _s("chat_template_kwargs", (CHAT,), "extra template variables"),
    _r("use_beam_search", BOTH, "no beam search", True, neutral=(False,)),
    _r("length_penalty", BOTH, "only used by beam search", 0.5, neutral=(1.0, 1)),
    _r("allowed_token_ids", BOTH, "use `logit_bias` or `structured_outputs`", [1, 2]),
    _r("bad_words", BOTH, "use `logit_bias`", ["bad"], neutral=([],)),
    _r("spaces_between_special_tokens", BOTH, "detokenization always joins tokens as the tokenizer does", False,
       neutral=(True,)),
    _r("priority", BOTH, "first-come-first-served scheduling", 1, neutral=(0,)),
    _r("logits_processors", BOTH, "no custom logits processors", ["mod.Proc"]),
    _r("guided_decoding_backend", BOTH, "one grammar engine (llguidance)", "xgrammar"),
    _r("guided_whitespace_pattern", BOTH, "JSON is generated compactly", r"[\n ]*"),
    _r("return_token_ids", BOTH, "not implemented; use `logprobs` with `return_tokens_as_token_ids`", True,
       neutral=(False,)),
    _r("kv_transfer_params", BOTH, "no disaggregated prefill", {"do_remote_decode": True}),
    _r("vllm_xargs", BOTH, "no custom extensions", {"k": 1}),
    _r("prompt_embeds", (COMPLETIONS,), "prompts are text or token ids", "AAAA"),
    _r("echo", (CHAT,), "use completions `echo`", True, neutral=(False,)),
    _r("continue_final_message", (CHAT,), "not implemented", True, neutral=(False,)),
    _r("documents", (CHAT,), "no RAG templates", [{"text": "x"}]),
    _r("mm_processor_kwargs", (CHAT,), "text-only models", {"k": 1}),
    # ---- Responses API
    _s("input", (RESPONSES,), "a string, or messages with text content"),
    _s("instructions", (RESPONSES,), "a system message before `input`"),
    _s("max_output_tokens", (RESPONSES,)),
    _r("tools", (RESPONSES,), "tool calling is on chat completions", [{"type": "function", "name": "f"}],
       neutral=([],)),
    _r("previous_response_id", (RESPONSES,), "nothing is stored", "resp_1"),
    _r("background", (RESPONSES,), "answers come in the request", True, neutral=(False,)),
    _r("reasoning", (RESPONSES,), "no reasoning models", {"effort": "high"}),
    _r("include", (RESPONSES,), "nothing extra to include", ["message.output_text.logprobs"], neutral=([],)),
)


def fields_for(endpoint: str) -> list[Field]:
    return [f for f in FIELDS if endpoint in f.endpoints]


def refused(endpoint: str) -> list[Field]:
    return [f for f in fields_for(endpoint) if not f.supported]


def check_refused(req: Any, endpoint: str) -> None:
    """400 naming the first refused field that asks for something."""
    for f in refused(endpoint):
        value = getattr(req, f.name, None)
        if value is None or any(value == n and type(value) is type(n) for n in f.neutral):
            continue
        if f.name == "best_of" and value == getattr(req, "n", 1):
            continue
        raise bad_request(f"{f.name} is not supported by this server: {f.note}", f.name)


def markdown_table() -> str:
    """The field table of docs/server.md."""
    rows = ["| field | endpoints | | notes |", "| --- | --- | --- | --- |"]
    for f in FIELDS:
        status = "supported" if f.supported else "**refused** (400)"
        rows.append(f"| `{f.name}` | {', '.join(f.endpoints)} | {status} | {f.note} |")
    return "\n".join(rows)


__all__ = ["FIELDS", "Field", "check_refused", "fields_for", "markdown_table", "refused"]

if __name__ == "__main__":
    print(markdown_table())
