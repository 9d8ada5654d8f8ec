"""Streaming detokenization: text deltas from one token id at a time.

Decoding each token alone is wrong twice over: a token may hold part of a
UTF-8 character, and many decoders (SentencePiece spaces, byte-level) only
make sense in context. Following vLLM, a short window of tokens is decoded
twice -- up to the last emitted token (``read_offset``) and up to the newest
one -- and the difference is the delta. While the decoded tail ends with
U+FFFD the bytes of a character are still incomplete, so nothing is emitted.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class IncrementalDetokenizer:
    """Feed ids with :meth:`add_token`; each call returns the newly final text.

    ``prompt_ids`` give context only (their text is never emitted). Call
    :meth:`finish` at the end of the stream to flush text held back for an
    incomplete character; the concatenated deltas then equal
    ``tokenizer.decode(generated_ids)`` (for a context-free decoder such as
    byte-level BPE without a prompt).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 context_tokens: int = 5) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids)
        self._prefix_offset = max(len(self._ids) - context_tokens, 0)
        self._read_offset = len(self._ids)
        self._pieces: list[str] = []  # everything emitted so far, joined only when read

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tok.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(self._ids) == self._read_offset or (not final and new_text.endswith(_REPLACEMENT)):
            return ""
        start = len(prefix_text) if new_text.startswith(prefix_text) else _common_prefix_len(prefix_text, new_text)
        delta = new_text[start:]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far (joined on read; appending a delta is O(1))."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_token(self, token_id: int) -> str:
        """Append one id; returns the text it made final (possibly '')."""
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise TypeError(f"token_id must be an int, got {type(token_id).__name__}")
        self._ids.append(token_id)
        return self._step(final=False)

    def finish(self) -> str:
        """Flush whatever was held back (an incomplete character decodes as U+FFFD)."""
        return self._step(final=True)
