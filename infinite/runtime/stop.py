"""When a request is done: EOS, stop token ids, stop strings, max_tokens, max_model_len.

Pure functions over a Request; the text side holds back the last
(longest stop string - 1) characters while running, so that streamed text
never shows a prefix of a stop string that is cut later.
"""

from __future__ import annotations

from infinite.runtime.request import Request


def check_stop(
    req: Request, new_text_len: int, eos_token_ids: tuple[int, ...], max_model_len: int, grammar_done: bool = False
) -> bool:
    """Update req.finish_reason / stop_reason (and truncate req.text on a stop string).

    ``grammar_done``: the request's structured-output grammar admits no further token, so
    it ends here ("stop") rather than spending a step on the EOS the grammar would force."""
    p = req.params
    out = req.output_token_ids
    n_out = len(out)
    if grammar_done:
        req.finish_reason, req.stop_reason = "stop", None
        return True
    if n_out >= p.min_tokens:
        last = out[-1]
        if not p.ignore_eos and last in eos_token_ids:
            req.finish_reason, req.stop_reason = "stop", None
            return True
        if p.stop_token_ids and last in p.stop_token_ids:
            req.finish_reason, req.stop_reason = "stop", last
            return True
        if p.stop and new_text_len:
            # Only the tail can hold a stop string that ends in the new text: no join of the whole text.
            window = req.text_tail(new_text_len + max(len(s) for s in p.stop) - 1)
            hit = find_stop_string(window, new_text_len, p.stop)
            if hit is not None:
                at, s = hit
                idx = req.text_len - len(window) + at
                req.text = req.text[: idx + len(s)] if p.include_stop_str_in_output else req.text[:idx]
                req.finish_reason, req.stop_reason = "stop", s
                return True
    if n_out >= req.max_tokens or len(req.prompt_token_ids) + n_out >= max_model_len:
        req.finish_reason = "length"
        return True
    return False


def find_stop_string(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the newest new_len characters."""
    best: tuple[int, str] | None = None
    for s in stops:
        start = max(0, len(text) - new_len - len(s) + 1)
        idx = text.find(s, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def visible_len(req: Request) -> int:
    """How much of the text is safe to show now: all of it once finished, minus a stop-string-sized
    tail before (a stop string may still end there and cut it)."""
    if req.finish_reason is not None or not req.params.stop:
        return req.text_len
    hold = max(len(s) for s in req.params.stop) - 1
    return max(0, req.text_len - hold)


def visible_text(req: Request) -> str:
    """The text safe to show now (``visible_len`` characters of it)."""
    n = visible_len(req)
    return req.text if n == req.text_len else req.text[:n]
