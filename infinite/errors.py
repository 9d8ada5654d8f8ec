"""The one error a failed request carries, from the engine (or any rank) to the client.

Why one type: a request can fail in the engine step, on a rank that died, at
a front door that is shutting down, or for lack of memory; the HTTP layer
must turn each into the same thing (a status before the stream starts, an
SSE error event with ``finish_reason: "error"`` after), and the offline
``LLM`` must raise it. ``reason`` is the machine-readable cause; it picks the
HTTP status and travels over the wire unchanged.
"""

from __future__ import annotations

# reason -> HTTP status it maps to
REASONS: dict[str, int] = {
    "invalid": 400,  # the request itself is bad (found late, e.g. on the rank that received it)
    "capacity": 400,  # no instance (or the cluster) can ever hold it
    "engine_stopped": 503,  # the engine failed or was shut down
    "shutdown": 503,  # the server / cluster is stopping
    "rank_lost": 503,  # a rank it depended on died and no survivor could take it over
    "timeout": 504,  # a peer did not answer in time
    "internal": 500,
}


class RequestError(RuntimeError):
    """A request ended without finishing. ``str(err)`` is the human message."""

    def __init__(self, message: str, reason: str = "internal") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown RequestError reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(message)
        self.message = message
        self.reason = reason

    @property
    def http_status(self) -> int:
        return REASONS[self.reason]

    def __reduce__(self):  # picklable with its reason (multiprocessing, RPC)
        return (RequestError, (self.message, self.reason))
