"""The aiohttp application: routes, API key, admission, engine lifecycle.

The HTTP socket opens at once and the engine loads behind it, so load
balancers and tests can poll ``GET /health`` (503 while starting, 200 when
ready). Routes under ``/v1`` need the API key when one is set; ``/health``,
``/metrics``, ``/status`` and ``/dashboard`` do not, as with vLLM. ``/admin``
routes (an instance leaving the cluster) exist only with an API key and need it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from infinite.errors import RequestError
from infinite.server import protocol as P
from infinite.server import shapes as S
from infinite.server import dashboard, responses_api, serving_chat, serving_completion, tokenization
from infinite.server.errors import APIError, json_error
from infinite.server.metrics import CONTENT_TYPE
from infinite.server.state import DEFAULT_MAX_BODY_BYTES, STATE_KEY, EngineStarter, ServerSettings, ServerState, app_state

log = logging.getLogger("infinite.server")

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerSettings", "ServerState", "app_state", "create_app", "engine_start_task", "serve"]


def _state(request: web.Request) -> ServerState:
    return app_state(request.app)


# --------------------------------------------------------------------------- middlewares


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure leaves as the OpenAI error body, whatever raised it."""
    try:
        return await handler(request)
    except APIError as e:
        _count_error(request, e.status)
        return e.response()
    except RequestError as e:  # a request that failed before anything was sent
        _count_error(request, e.http_status)
        return json_error(e.http_status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        _count_error(request, e.status)
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 413:
            message = f"request body too large: the limit is {app_state(request.app).settings.max_body_bytes} bytes"
        resp = json_error(e.status, message)
        if e.status == 405 and "Allow" in e.headers:
            resp.headers["Allow"] = e.headers["Allow"]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("internal error on %s %s", request.method, request.path)
        engine = app_state(request.app).engine
        status = 503 if engine is not None and not engine.is_running else 500
        _count_error(request, status)
        return json_error(status, f"{'the engine has stopped' if status == 503 else 'internal server error'}: {type(e).__name__}: {e}")


def _count_error(request: web.Request, status: int) -> None:
    st = app_state(request.app)
    st.metrics.labels(st.metrics.request_errors, str(status)).inc()


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    key = app_state(request.app).settings.api_key
    if key and request.path.startswith(("/v1", "/admin")) and request.method != "OPTIONS":
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError("invalid or missing API key (send 'Authorization: Bearer <key>')", status=401)
    return await handler(request)


# --------------------------------------------------------------------------- routes


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await serving_completion.create_completion(request, _state(request))


async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await serving_chat.create_chat_completion(request, _state(request))


async def handle_models(request: web.Request) -> web.Response:
    st = _state(request)
    engine = st.ready_engine()
    card = S.ModelCard(
        id=st.model_name,
        created=st.started_at,
        root=engine.model_path,
        max_model_len=engine.max_model_len,
    )
    return web.Response(body=P.encode(S.ModelList([card])), content_type="application/json")


async def handle_health(request: web.Request) -> web.Response:
    """200 {"status": "ok"}; 503 while starting or stopping; 503 {"status": "degraded", "lost":
    [...]} while a cluster runs with fewer instances than it should (the API keeps serving)."""
    st = _state(request)
    engine = st.ready_engine()  # 503 while starting or stopping
    health = engine.health()
    return web.json_response(health, status=200 if health.get("status") == "ok" else 503)


async def handle_remove_instance(request: web.Request) -> web.Response:
    """POST /admin/instances/{rank}/leave: drain that instance out of the cluster (API key required)."""
    st = _state(request)
    if not st.settings.api_key:
        raise APIError("admin endpoints are off: start the server with --api-key to use them", status=403)
    try:
        rank = int(request.match_info["rank"])
    except ValueError:
        raise APIError(f"not an instance rank: {request.match_info['rank']!r}", status=400, param="rank") from None
    result = await st.ready_engine().remove_instance(rank)
    return web.json_response(result)


async def handle_version(request: web.Request) -> web.Response:
    from infinite import __version__

    return web.json_response({"version": __version__})


async def handle_metrics(request: web.Request) -> web.Response:
    body = _state(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# --------------------------------------------------------------------------- app


def create_app(start_engine: EngineStarter, settings: ServerSettings | None = None) -> web.Application:
    """An app whose engine is built by ``start_engine()`` in the background at startup."""
    settings = settings or ServerSettings()
    state = ServerState(settings)
    app = web.Application(
        middlewares=[error_middleware, auth_middleware], client_max_size=settings.max_body_bytes
    )
    app[STATE_KEY] = state
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/responses", responses_api.handle_responses)
    app.router.add_post("/v1/embeddings", responses_api.handle_embeddings)
    app.router.add_post("/tokenize", tokenization.handle_tokenize)
    app.router.add_post("/detokenize", tokenization.handle_detokenize)
    app.router.add_get("/tokenizer_info", tokenization.handle_tokenizer_info)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/admin/instances/{rank}/leave", handle_remove_instance)
    app.router.add_get("/version", handle_version)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/status", dashboard.handle_status)
    app.router.add_get("/dashboard", dashboard.handle_dashboard)

    async def lifecycle(app: web.Application) -> Any:
        task = asyncio.ensure_future(_start(state, start_engine))
        app[_START_TASK] = task
        yield
        state.stopping = True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if state.engine is not None:
            await state.engine.shutdown()

    app.cleanup_ctx.append(lifecycle)
    return app


_START_TASK = web.AppKey("infinite_start_task", asyncio.Task)


async def _start(state: ServerState, start_engine: EngineStarter) -> None:
    t0 = time.monotonic()
    try:
        engine = await start_engine()
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        state.start_error = e
        log.exception("the engine failed to start")
        raise
    state.engine = engine
    log.info("engine ready in %.1f s: model %s, max_model_len %d", time.monotonic() - t0, state.model_name, engine.max_model_len)


def engine_start_task(app: web.Application) -> asyncio.Task:
    """The background start of the engine (done once it is ready or has failed)."""
    return app[_START_TASK]


async def serve(
    start_engine: EngineStarter,
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str, int], None] | None = None,
    shutdown_timeout: float = 5.0,
) -> int:
    """Run until ``stop`` is set (or the engine fails to start); returns an exit code.

    Handler cancellation is on: a client that goes away cancels its handler,
    which closes the engine streams and so aborts the requests. On stop, open
    streams get ``shutdown_timeout`` seconds to finish before they are cut.
    """
    app = create_app(start_engine, settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    if on_listening is not None:
        on_listening(bound[0], bound[1])
    stop = stop or asyncio.Event()
    stopper = asyncio.ensure_future(stop.wait())
    start = engine_start_task(app)
    try:
        await asyncio.wait([stopper, start], return_when=asyncio.FIRST_COMPLETED)
        code = 1 if start.done() and not start.cancelled() and start.exception() else 0
        if code == 0 and not stop.is_set():
            await stopper
    finally:
        stopper.cancel()
        await runner.cleanup()
    return code
