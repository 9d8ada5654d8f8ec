"""What the HTTP handlers share: settings, the engine once it started, metrics, admission.

Its own module so that the route modules (serving, dashboard) and the app
that wires them all import it, and none imports the app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from infinite.runtime.surface import EngineFacts
from infinite.server.errors import APIError
from infinite.server.metrics import ServerMetrics

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # a 1M-token prompt as JSON token ids fits
RETRY_AFTER_S = 1  # what a 503 tells clients to wait: the queue drains, or the engine finishes starting

EngineStarter = Callable[[], Awaitable[EngineFacts]]


@dataclass
class ServerSettings:
    served_model_name: str | None = None  # defaults to engine.model_name
    api_key: str | None = None
    max_pending: int = 1024  # engine requests in flight before new ones get 503
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tool_call_parser: str | None = None  # vLLM's --tool-call-parser
    enable_auto_tool_choice: bool = False  # vLLM's --enable-auto-tool-choice

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {self.max_pending}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.tool_call_parser is not None:
            from infinite.server.tool_parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)  # ValueError naming the known parsers
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")


class ServerState:
    """What the handlers share: the engine (once started), settings, metrics, admission."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: EngineFacts | None = None
        self.start_error: BaseException | None = None
        self.stopping = False
        self.in_flight = 0
        self.started_at = int(time.time())
        self.metrics = ServerMetrics(lambda: self.engine, lambda: self.model_name)

    @property
    def model_name(self) -> str:
        if self.settings.served_model_name:
            return self.settings.served_model_name
        return self.engine.model_name if self.engine is not None else ""

    def ready_engine(self) -> EngineFacts:
        """The engine, or 503 while it starts, after it failed, or while the server stops."""
        if self.engine is None or self.stopping:
            why = "is shutting down" if self.stopping else "is still starting (loading the model)"
            if self.start_error is not None:
                why = f"failed to start: {self.start_error}"
            raise APIError(f"the server {why}; retry later", status=503,
                           retry_after=None if self.start_error is not None else RETRY_AFTER_S)
        if not self.engine.is_running:
            raise APIError("the engine has stopped after an error; see the server log", status=503)
        return self.engine

    def check_model(self, model: str | None) -> str:
        name = self.model_name
        if model is not None and model != name:
            raise APIError(f"The model `{model}` does not exist. This server serves `{name}`.", status=404, param="model")
        return name

    def admit(self, k: int) -> None:
        limit = self.settings.max_pending
        if self.in_flight + k > limit:
            raise APIError(
                f"the server is overloaded: {self.in_flight} requests in flight, the limit is {limit}; retry later",
                status=503,
                retry_after=RETRY_AFTER_S,
            )
        self.in_flight += k
        self.metrics.labels(self.metrics.in_flight).inc(k)

    def release(self, k: int) -> None:
        self.in_flight -= k
        self.metrics.labels(self.metrics.in_flight).dec(k)


STATE_KEY = web.AppKey("infinite_state", ServerState)
def _state(request: web.Request) -> ServerState:
    return request.app[STATE_KEY]




def app_state(app: web.Application) -> ServerState:
    return app[STATE_KEY]
