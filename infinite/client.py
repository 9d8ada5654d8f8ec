"""A small client for Infinite's (or any OpenAI-compatible) HTTP API.

For people who do not want the ``openai`` package: the sync ``Client`` uses
only the standard library (``http.client``), the ``AsyncClient`` uses
aiohttp. Responses are the plain JSON dicts the server sends; streams are
iterators of chunk dicts that end at ``data: [DONE]``. An HTTP error, or an
error event inside a stream, raises ``APIStatusError``.

    from infinite.client import Client
    c = Client("http://127.0.0.1:8000", api_key="k")
    print(c.completions("Once upon a time", max_tokens=16)["choices"][0]["text"])
    for chunk in c.stream_chat([{"role": "user", "content": "hi"}], max_tokens=8):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit


class APIStatusError(Exception):
    """The server answered an error (status >= 400, or an error event mid-stream)."""

    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            self.message = str(err.get("message", ""))
            self.type = err.get("type")
            self.param = err.get("param")
        else:
            self.message = str(err if err is not None else body)
            self.type = self.param = None
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {self.message}")


def _parse_body(status: int, raw: bytes) -> Any:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    if status >= 400:
        raise APIStatusError(status, body)
    return body


def parse_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Chunks of an SSE stream of ``data:`` lines, up to ``[DONE]``."""
    for line in lines:
        event = _sse_event(line)
        if event is _DONE:
            return
        if event is not None:
            yield event


_DONE = object()


def _sse_event(line: bytes) -> Any:
    line = line.strip()
    if not line.startswith(b"data:"):
        return None  # blank separators, comments, other fields
    data = line[5:].strip()
    if data == b"[DONE]":
        return _DONE
    chunk = json.loads(data)
    if isinstance(chunk, dict) and "error" in chunk:
        err = chunk["error"]
        raise APIStatusError(int(err.get("code") or 500) if isinstance(err, dict) else 500, chunk)
    return chunk


def _payload(model: str | None, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if model is not None:
        body["model"] = model
    body.update({k: v for k, v in params.items() if v is not None})
    return body


class _Base:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 600.0, model: str | None = None) -> None:
        url = urlsplit(base_url if "://" in base_url else f"http://{base_url}")
        if url.scheme not in ("http", "https"):
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        self.base_url = f"{url.scheme}://{url.netloc}"
        self._url = url
        self._prefix = url.path.rstrip("/")
        if self._prefix.endswith("/v1"):
            self._prefix = self._prefix[:-3]
        self.api_key = api_key
        self.timeout = timeout
        self.model = model

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _model(self, model: str | None) -> str | None:
        return model if model is not None else self.model


class Client(_Base):
    """Blocking client; one HTTP connection per call."""

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname or "127.0.0.1", self._url.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._conn()
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, self._prefix + path, body=data, headers=self._headers())
        return conn, conn.getresponse()

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        conn, resp = self._request(method, path, body)
        try:
            return _parse_body(resp.status, resp.read())
        finally:
            conn.close()

    def _stream(self, path: str, body: dict) -> Iterator[dict]:
        body = {**body, "stream": True}
        conn, resp = self._request("POST", path, body)
        try:
            if resp.status >= 400:
                _parse_body(resp.status, resp.read())
            yield from parse_sse(iter(resp.readline, b""))
        finally:
            conn.close()  # closing early tells the server to abort the request

    def completions(self, prompt: Any, *, model: str | None = None, **params: Any) -> dict:
        return self._call("POST", "/v1/completions", _payload(self._model(model), params, prompt=prompt))

    def stream_completions(self, prompt: Any, *, model: str | None = None, **params: Any) -> Iterator[dict]:
        return self._stream("/v1/completions", _payload(self._model(model), params, prompt=prompt))

    def chat(self, messages: list[dict], *, model: str | None = None, **params: Any) -> dict:
        return self._call("POST", "/v1/chat/completions", _payload(self._model(model), params, messages=messages))

    def stream_chat(self, messages: list[dict], *, model: str | None = None, **params: Any) -> Iterator[dict]:
        return self._stream("/v1/chat/completions", _payload(self._model(model), params, messages=messages))

    def models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["data"]

    def status(self) -> dict:
        return self._call("GET", "/status")

    def health(self) -> bool:
        try:
            self._call("GET", "/health")
            return True
        except (APIStatusError, OSError):
            return False


class AsyncClient(_Base):
    """asyncio client over one aiohttp session; use ``async with`` or call ``close()``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.base_url, timeout=aiohttp.ClientTimeout(total=self.timeout)
            )
        return self._session

    async def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        async with self._sess().request(method, self._prefix + path, json=body, headers=self._headers()) as resp:
            return _parse_body(resp.status, await resp.read())

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        body = {**body, "stream": True}
        async with self._sess().post(self._prefix + path, json=body, headers=self._headers()) as resp:
            if resp.status >= 400:
                _parse_body(resp.status, await resp.read())
            async for line in resp.content:
                event = _sse_event(line)
                if event is _DONE:
                    return
                if event is not None:
                    yield event

    async def completions(self, prompt: Any, *, model: str | None = None, **params: Any) -> dict:
        return await self._call("POST", "/v1/completions", _payload(self._model(model), params, prompt=prompt))

    def stream_completions(self, prompt: Any, *, model: str | None = None, **params: Any) -> AsyncIterator[dict]:
        return self._stream("/v1/completions", _payload(self._model(model), params, prompt=prompt))

    async def chat(self, messages: list[dict], *, model: str | None = None, **params: Any) -> dict:
        return await self._call("POST", "/v1/chat/completions", _payload(self._model(model), params, messages=messages))

    def stream_chat(self, messages: list[dict], *, model: str | None = None, **params: Any) -> AsyncIterator[dict]:
        return self._stream("/v1/chat/completions", _payload(self._model(model), params, messages=messages))

    async def models(self) -> list[dict]:
        return (await self._call("GET", "/v1/models"))["data"]

    async def status(self) -> dict:
        return await self._call("GET", "/status")

    async def health(self) -> bool:
        try:
            await self._call("GET", "/health")
            return True
        except (APIStatusError, OSError):
            return False
