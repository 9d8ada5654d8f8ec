"""The HTTP server as rank 0's front-end: the launch layer composes cluster and server here,
so neither imports the other."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from infinite.cluster.rank import FrontEnd
from infinite.server.app import serve
from infinite.server.state import ServerSettings


async def _serve_http(settings: ServerSettings, host: str, port: int, on_listening: Callable[[str, int], None] | None,
                      ready: asyncio.Future, stop: asyncio.Event) -> int:
    async def start_engine():
        return await ready  # /health answers 503 until the cluster is up

    return await serve(start_engine, settings, host, port, stop=stop, on_listening=on_listening)


def http_front_end(settings: ServerSettings, host: str, port: int,
                   on_listening: Callable[[str, int], None] | None = None) -> FrontEnd:
    return functools.partial(_serve_http, settings, host, port, on_listening)
