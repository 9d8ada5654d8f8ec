"""Streaming detokenization: text deltas from one token id at a time.

Decoding each token alone is wrong twice over: a token may hold part of a
UTF-8 character, and many decoders (SentencePiece spaces, byte-level) only
make sense in context. The ``tokenizers`` library's ``DecodeStream`` keeps that
context in Rust (vLLM's fast incremental detokenizer does the same): it is
primed with the prompt's last tokens, and each step returns the newly final
text, or nothing while a character's bytes are incomplete. One call per token,
which matters: this runs for every token of every request.

At the end of a stream, bytes still held back are flushed the way a full
decode shows them (U+FFFD for an incomplete character), so the concatenated
deltas equal ``tokenizer.decode(generated_ids)`` for a context-free decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from .tokenizer import Tokenizer


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
    incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 context_tokens: int = 5) -> None:
        self._tok = tokenizer
        self._hf = tokenizer.backend
        self._skip = skip_special_tokens
        self._context = context_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        ctx = list(prompt_ids[-context_tokens:]) if context_tokens else []
        for t in ctx:
            self._stream.step(self._hf, t)
        self._ids: list[int] = ctx  # the last tokens: what a flush at the end decodes
        self._held = 0  # tokens since the stream last released text
        self._pieces: list[str] = []  # everything emitted so far, joined only when read

    @property
    def text(self) -> str:
        """Everything emitted so far (joined on read; appending a delta is O(1))."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def add_token(self, token_id: int) -> str:
        """Append one id; returns the text it made final (possibly '')."""
        if type(token_id) is not int:  # noqa: E721 - bool is an int subclass and must be refused
            raise TypeError(f"token_id must be an int, got {type(token_id).__name__}")
        ids = self._ids
        ids.append(token_id)
        out = self._stream.step(self._hf, token_id)
        if out is None:
            self._held += 1
            return ""
        self._held = 0
        if len(ids) > 64:  # keep only what a flush can need
            del ids[: len(ids) - 32]
        if out:
            self._pieces.append(out)
        return out

    def finish(self) -> str:
        """Flush whatever was held back (an incomplete character decodes as U+FFFD)."""
        h = self._held
        if not h:
            return ""
        ids = self._ids
        start = max(0, len(ids) - h - self._context)
        before = self._tok.decode(ids[start : len(ids) - h], self._skip)
        after = self._tok.decode(ids[start:], self._skip)
        delta = after[_common_prefix_len(before, after):]
        self._held = 0
        if delta:
            self._pieces.append(delta)
        return delta
