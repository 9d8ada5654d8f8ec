"""Server-sent events and the merging of several engine streams into one.

A streamed response is ``data: {json}\\n\\n`` per chunk and ``data: [DONE]\\n\\n``
at the end, as the OpenAI API does. Once the first byte is out an error can
no longer change the status code, so it is sent as one more ``data:`` event
carrying the usual error body, then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from aiohttp import web

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class SSEWriter:
    """Writes SSE events; a write to a client that has gone raises ConnectionResetError."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        self.started = False

    async def start(self) -> None:
        await self.response.prepare(self._request)
        self.started = True

    async def send(self, obj: Any) -> None:
        await self.response.write(sse_event(msgspec.json.encode(obj)))

    async def send_event(self, kind: str, obj: Any) -> None:
        """A typed event (``event: <kind>``), as the Responses API streams."""
        await self.response.write(b"event: " + kind.encode() + b"\n" + sse_event(msgspec.json.encode(obj)))

    async def done(self) -> None:
        await self.response.write(DONE)
        await self.response.write_eof()


_END = object()


async def merge_streams(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as items arrive, tagged with their index.

    Closing (or cancelling) the merged iterator closes every source, which is
    what aborts their engine requests when a client disconnects.
    """
    if len(streams) == 1:
        async with _closing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return

    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with _closing(stream) as s:
                async for item in s:
                    await queue.put((i, item, None))
            await queue.put((i, _END, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # forwarded to the consumer, raised there
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _END:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _closing(stream: AsyncIterator[T]) -> contextlib.AbstractAsyncContextManager[AsyncIterator[T]]:
    if hasattr(stream, "aclose"):
        return contextlib.aclosing(stream)  # type: ignore[type-var]
    return contextlib.nullcontext(stream)  # type: ignore[return-value]
