"""Engine logprob entries in the OpenAI/vLLM response shapes.

An entry is ``{token id: logprob}`` with the token itself first, then the top
alternatives best first (infinite.sampling.logprobs). Completions keep that order
and the first ``logprobs + 1`` items, as vLLM does, so ``top_logprobs`` always holds
the token itself; chat lists the ``top_logprobs`` best. ``-inf`` (a token a grammar
forbade) becomes -9999.0, the JSON-safe floor vLLM and OpenAI use.
"""

from __future__ import annotations

from typing import Any

from infinite.server import shapes as S

LOGPROB_FLOOR = -9999.0

Entry = dict[int, Any] | None  # values: floats (or objects with .logprob)


def _lp(value: Any) -> float:
    return max(float(getattr(value, "logprob", value)), LOGPROB_FLOOR)


def token_text(tokenizer: Any, tid: int, as_id: bool = False) -> str:
    """How a token is named in logprobs: its text, or ``token_id:<id>`` when asked for."""
    if as_id or tokenizer is None:
        return f"token_id:{tid}"
    return tokenizer.decode([tid], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Any, token_ids: list[int], entries: list[Entry], top: int, text_offset: int, as_ids: bool = False
) -> S.CompletionLogProbs:
    """vLLM's ``_create_completion_logprobs``: a None entry (the first prompt token) gives nulls."""
    lp = S.CompletionLogProbs([], [], [], [])
    for tid, entry in zip(token_ids, entries):
        s = token_text(tokenizer, tid, as_ids)
        lp.tokens.append(s)
        lp.text_offset.append(text_offset)
        text_offset += len(s)
        if entry is None:
            lp.token_logprobs.append(None)
            lp.top_logprobs.append(None)
            continue
        lp.token_logprobs.append(_lp(entry[tid]) if tid in entry else None)
        lp.top_logprobs.append(
            {token_text(tokenizer, t, as_ids): _lp(v) for i, (t, v) in enumerate(entry.items()) if i <= top}
        )
    return lp


def chat_logprobs(
    tokenizer: Any, token_ids: list[int], entries: list[Entry], top: int, as_ids: bool = False
) -> S.ChatLogProbs:
    content = []
    for tid, entry in zip(token_ids, entries):
        s = token_text(tokenizer, tid, as_ids)
        items = sorted(((int(t), _lp(v)) for t, v in (entry or {}).items()), key=lambda x: -x[1])
        tops = []
        for t, v in items[:top]:
            ts = token_text(tokenizer, t, as_ids)
            tops.append(S.TopLogprob(ts, v, list(ts.encode())))
        chosen = _lp(entry[tid]) if entry and tid in entry else LOGPROB_FLOOR
        content.append(S.ChatTokenLogprob(s, chosen, list(s.encode()), tops))
    return S.ChatLogProbs(content)


def prompt_logprobs_json(tokenizer: Any, entries: list[Entry] | None) -> list[dict[str, dict] | None] | None:
    """vLLM's ``prompt_logprobs`` response field: per prompt token ``{token id: {"logprob",
    "decoded_token"}}`` (vLLM's Logprob less its ``rank``), None for the first token."""
    if entries is None:
        return None
    return [
        None if e is None else {
            str(t): {"logprob": _lp(v), "decoded_token": token_text(tokenizer, int(t))} for t, v in e.items()
        }
        for e in entries
    ]
