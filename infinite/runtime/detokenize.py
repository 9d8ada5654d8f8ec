"""Detokenization beside the step, for requests whose text nobody reads until they finish.

Turning a token into text (``IncrementalDetokenizer.add_token``) is a few microseconds of
Python per request per step: at batch 256 it is a third of a decode step's host work, and
the GPU (or the forward's threads, on a CPU) waits for it. A request made by
``LLM.generate`` (``output_kind == "final_only"``) whose stop cannot depend on its text (no
stop strings, ``min_tokens`` or grammar: ``engine._quick_stop``) has its text read once,
when it finishes. For those the engine only appends the token id during the step and hands
the step's list of (request, tokens so far) to a worker thread, which catches their
detokenizers up while the next step's forward runs (the forward's kernels release the
GIL). Whenever the text is needed — the request stops, is aborted, or an output is built —
the engine catches that request up on its own thread first (``advance``), so the text is
exactly what detokenizing token by token makes.

Why a thread and not a process (vLLM's front end): the detokenizer's state lives in the
request, which the engine owns; a thread shares it without copies, and one lock per
``advance`` keeps the two threads from feeding the same detokenizer at once.
"""

from __future__ import annotations

import threading
import weakref
from queue import SimpleQueue

from infinite.runtime.request import Request

__all__ = ["BACKGROUND_MIN_ROWS", "BackgroundDetokenizer", "advance"]

# Below this many deferred rows in a step the engine feeds them itself: a few detokenizer steps
# (about 3 us each) cost less than waking the worker and handing the GIL back and forth.
BACKGROUND_MIN_ROWS = 64


def advance(req: Request, upto: int) -> str:
    """Feed ``req``'s detokenizer its output tokens up to ``upto``; the text the last of them made
    final ('' when none was fed). Tokens it was fed already are not fed again."""
    det = req.detokenizer
    out = req.output_token_ids
    delta = ""
    if det is None:  # token ids only (no tokenizer, or detokenize=False)
        req.detok_pos = max(req.detok_pos, upto)
        return delta
    for i in range(req.detok_pos, upto):
        delta = det.add_token(out[i])
        req.append_text(delta)
    if upto > req.detok_pos:
        req.detok_pos = upto
    return delta


class BackgroundDetokenizer:
    """One worker thread that catches requests' detokenizers up to where a step left them."""

    def __init__(self, min_rows: int = BACKGROUND_MIN_ROWS) -> None:
        self.min_rows = min_rows  # the fewest rows of a step worth handing over (else the engine feeds them)
        self._lock = threading.Lock()
        self._queue: SimpleQueue[list[tuple[Request, int]] | None] = SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="infinite-detokenize", daemon=True)
        self._thread.start()

    def submit(self, work: list[tuple[Request, int]]) -> None:
        """Catch each request up to its number of tokens, later, on the worker."""
        self._queue.put(work)

    def advance(self, req: Request, upto: int) -> str:
        """``advance`` on the caller's thread, never at the same time as the worker on any request."""
        if self._error is not None:
            raise RuntimeError("the background detokenizer failed") from self._error
        with self._lock:
            return advance(req, upto)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def bind(self, owner: object) -> BackgroundDetokenizer:
        """Stop the worker when ``owner`` (the engine) is collected."""
        weakref.finalize(owner, self.close)
        return self

    def _run(self) -> None:
        lock, queue = self._lock, self._queue
        while (work := queue.get()) is not None:
            try:
                for req, upto in work:
                    with lock:  # per request: the engine may advance another one meanwhile
                        advance(req, upto)
            except BaseException as e:  # reported on the engine's thread by the next advance
                self._error = e
                return
