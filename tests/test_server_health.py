"""What the HTTP layer says about a cluster in trouble: /health degraded, 503 with Retry-After past
the queue bound, the admin endpoint behind the API key. In-process, over the stand-in engine."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from server_fake_engine import FakeEngine  # noqa: E402

from infinite.server.app import ServerSettings, create_app, engine_start_task  # noqa: E402

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


class DegradedEngine(FakeEngine):
    """A cluster that lost rank 2 and still serves; it can drain rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = False
        self.drained: list[int] = []

    def health(self) -> dict:
        if not self.lost:
            return {"status": "ok", "instances": 3, "target": 3, "serving": [0, 1, 2]}
        return {"status": "degraded", "instances": 2, "target": 3, "serving": [0, 1],
                "lost": [{"rank": 2, "reason": "no heartbeat for 2.0 s", "seconds_ago": 1.0}]}

    async def remove_instance(self, rank: int) -> dict:
        self.drained.append(rank)
        return {"rank": rank, "status": "draining", "members": [0, 1]}


async def serve(engine: FakeEngine, settings: ServerSettings):
    async def start():
        return engine

    app = create_app(start, settings)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    await engine_start_task(app)
    return srv


async def test_health_says_degraded_with_the_lost_rank_and_the_api_keeps_serving():
    engine = DegradedEngine()
    srv = await serve(engine, ServerSettings(api_key=KEY))
    url = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/health") as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            engine.lost = True
            async with s.get(url + "/health") as r:
                body = await r.json()
                assert r.status == 503 and body["status"] == "degraded"
                assert body["lost"][0]["rank"] == 2 and "heartbeat" in body["lost"][0]["reason"]
            async with s.get(url + "/status") as r:
                assert (await r.json())["health"]["status"] == "degraded"
            async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, headers=AUTH) as r:
                assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
    finally:
        await srv.close()


async def test_past_the_queue_bound_is_503_with_retry_after_then_served_again():
    engine = FakeEngine(step_s=0.05)
    srv = await serve(engine, ServerSettings(max_pending=2))
    url = f"http://127.0.0.1:{srv.port}"
    try:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "hi", "max_tokens": 20}
            busy = [asyncio.ensure_future(s.post(url + "/v1/completions", json=body)) for _ in range(2)]
            while engine.stats()[0]["num_running"] < 2:
                await asyncio.sleep(0.01)
            async with s.post(url + "/v1/completions", json=body) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert "overloaded" in (await r.json())["error"]["message"]
            for f in busy:
                (await f).release()
            async with s.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200
    finally:
        await srv.close()


@pytest.mark.parametrize("api_key", [None, KEY])
async def test_the_admin_leave_endpoint_needs_the_api_key(api_key):
    engine = DegradedEngine()
    srv = await serve(engine, ServerSettings(api_key=api_key))
    url = f"http://127.0.0.1:{srv.port}/admin/instances/1/leave"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, headers=AUTH) as r:
                if api_key is None:  # no key configured: the admin routes are off
                    assert r.status == 403 and "--api-key" in (await r.json())["error"]["message"]
                    return
                assert r.status == 200 and (await r.json())["status"] == "draining"
            async with s.post(url) as r:
                assert r.status == 401
            async with s.post(url.replace("/1/", "/x/"), headers=AUTH) as r:
                assert r.status == 400
        assert engine.drained == [1]
    finally:
        await srv.close()


async def test_one_instance_has_no_instance_to_remove():
    srv = await serve(FakeEngine(), ServerSettings(api_key=KEY))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{srv.port}/admin/instances/1/leave", headers=AUTH) as r:
                assert r.status == 400 and "one instance" in (await r.json())["error"]["message"]
    finally:
        await srv.close()
