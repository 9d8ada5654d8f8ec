"""infinite.client against the real aiohttp app in-process, over a stand-in engine.

The stand-in (tests/server_fake_engine.py) keeps these tests fast and
independent of the model; tests/test_server_e2e.py drives the real server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).parent))

from server_fake_engine import FakeEngine  # noqa: E402

from infinite.client import APIStatusError, AsyncClient, Client, parse_sse  # noqa: E402
from infinite.server.app import ServerSettings, app_state, create_app, engine_start_task  # noqa: E402

KEY = "sekret"


@pytest.fixture
async def server():
    engine = FakeEngine()

    async def start():
        return engine

    app = create_app(start, ServerSettings(api_key=KEY))
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    await engine_start_task(app)
    try:
        yield srv, engine
    finally:
        await srv.close()


def url(srv: TestServer) -> str:
    return f"http://127.0.0.1:{srv.port}"


async def test_sync_client_completions_and_stream(server):
    srv, _ = server
    c = Client(url(srv), api_key=KEY)
    r = await asyncio.to_thread(c.completions, "hello", max_tokens=5, n=2, seed=7)
    assert [ch["index"] for ch in r["choices"]] == [0, 1]
    assert all(len(ch["text"]) == 5 and ch["finish_reason"] == "length" for ch in r["choices"])
    assert r["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    again = await asyncio.to_thread(c.completions, "hello", max_tokens=5, n=2, seed=7)
    assert [ch["text"] for ch in again["choices"]] == [ch["text"] for ch in r["choices"]]

    def collect():
        return list(c.stream_completions("hello", max_tokens=6, seed=7, stream_options={"include_usage": True}))

    chunks = await asyncio.to_thread(collect)
    text = "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"])
    assert len(text) == 6
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert [ch for ch in chunks if ch["choices"]][-1]["choices"][0]["finish_reason"] == "length"


async def test_async_client_chat_models_status(server):
    srv, engine = server
    async with AsyncClient(url(srv) + "/v1", api_key=KEY) as c:
        msgs = [{"role": "user", "content": "hi"}]
        r = await c.chat(msgs, max_tokens=4, seed=3)
        assert r["object"] == "chat.completion"
        assert r["choices"][0]["message"]["role"] == "assistant"
        prompt_len = len(engine.tokenizer.apply_chat_template(msgs))
        assert r["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 4, "total_tokens": prompt_len + 4,
                              "prompt_tokens_details": {"cached_tokens": 0}}
        deltas = [ch["choices"][0]["delta"] async for ch in c.stream_chat(msgs, max_tokens=4, seed=3)]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content", "") for d in deltas) == r["choices"][0]["message"]["content"]
        assert [m["id"] for m in await c.models()] == ["fake-model"]
        assert await c.health()
        st = await c.status()
        assert st["ready"] and st["instances"][0]["used_blocks"] == 0


async def test_errors_raise_with_status_and_param(server):
    srv, _ = server
    async with AsyncClient(url(srv), api_key=KEY) as c:
        with pytest.raises(APIStatusError) as e:
            await c.completions("x", max_tokens=0)
        assert e.value.status == 400 and e.value.param == "max_tokens"
        with pytest.raises(APIStatusError) as e:
            await c.completions("x", model="other")
        assert e.value.status == 404 and e.value.type == "NotFoundError"
        with pytest.raises(APIStatusError) as e:
            async for _ in c.stream_completions("x", temperature=-0.5):
                pass
        assert e.value.status == 400
    async with AsyncClient(url(srv), api_key="wrong") as bad:
        with pytest.raises(APIStatusError) as e:
            await bad.completions("x")
        assert e.value.status == 401
    with pytest.raises(APIStatusError) as e:
        await asyncio.to_thread(Client(url(srv)).models)
    assert e.value.status == 401


async def test_closing_a_stream_early_aborts_the_request(server):
    srv, engine = server
    engine.step_s = 0.02
    async with AsyncClient(url(srv), api_key=KEY) as c:
        stream = c.stream_completions("hello", max_tokens=200 - 5, ignore_eos=True)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.aclose()
    for _ in range(100):
        if not engine.used and app_state(srv.app).in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.used == {}
    assert len(engine.aborted) == 1
    assert app_state(srv.app).in_flight == 0


def test_parse_sse_stops_at_done_and_raises_error_events():
    lines = [b'data: {"a": 1}\n', b"\n", b": comment\n", b'data: {"a": 2}\n', b"data: [DONE]\n", b'data: {"a": 3}\n']
    assert list(parse_sse(lines)) == [{"a": 1}, {"a": 2}]
    err = b'data: {"error": {"message": "boom", "type": "BadRequestError", "param": null, "code": 400}}\n'
    with pytest.raises(APIStatusError) as e:
        list(parse_sse([err]))
    assert e.value.status == 400 and e.value.message == "boom"


def test_client_rejects_bad_base_url():
    with pytest.raises(ValueError, match="base_url"):
        Client("ftp://host")


async def test_bench_serve_against_the_app(server, tmp_path):
    """The serving benchmark runs end to end and accounts every request and token."""
    from infinite.bench import serve as bench

    srv, engine = server
    args = bench.build_parser().parse_args([
        "--url", url(srv), "--api-key", KEY, "--num-prompts", "12", "--request-rate", "200",
        "--input-len-mean", "8", "--output-len-mean", "4", "--output-len-max", "10", "--seed", "3",
    ])
    summary = await bench.run(args)
    assert summary["completed"] == 12 and summary["failed"] == 0
    expected = bench.synthetic_requests(12, __import__("random").Random(3), 8, args.input_len_max or summary["input_len_max"], 4, 10)
    assert summary["total_output_tokens"] == sum(r.max_tokens for r in expected)  # the fake never stops early
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(summary[key]) == {"mean", "median", "p99"}
    assert 0 < summary["ttft_ms"]["mean"] <= summary["e2e_ms"]["mean"]
    assert engine.used == {}


def test_bench_length_mix_has_a_long_tail():
    import random

    from infinite.bench.serve import sample_lengths

    xs = sample_lengths(random.Random(0), 4000, 100, 4000, "longtail")
    assert min(xs) >= 1 and max(xs) <= 4000
    assert 80 < sum(xs) / len(xs) < 120
    assert sorted(xs)[len(xs) // 2] < 80  # median well under the mean
    assert max(xs) > 800  # a few very long ones
    with pytest.raises(ValueError, match="mean"):
        sample_lengths(random.Random(0), 1, 10, 5, "fixed")


async def test_dashboard_page_and_its_status_feed(server):
    srv, engine = server
    engine.step_s = 0.02
    async with AsyncClient(url(srv), api_key=KEY) as c:
        stream = c.stream_completions("hello", max_tokens=50)
        await stream.__anext__()
        st = await c.status()  # /status needs no key, like /metrics
        inst = st["instances"][0]
        assert inst["used_blocks"] == 1 and inst["num_running"] == 1 and st["in_flight"] == 1
        assert st["debts"] == [] and st["capacity_tokens"] == engine.capacity_tokens
        await stream.aclose()
        sess = c._sess()
        async with sess.get("/dashboard") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            html = await resp.text()
    # the page polls /status and draws each field of an instance and the debt arrows
    for needle in ('fetch("/status"', "used_blocks", "lent_blocks", "free_blocks", "borrowed_blocks",
                   "num_running", "step_time_ms", "drawDebts", 'id="arrows"'):
        assert needle in html, needle


# --------------------------------------------------------------------------- the dashboard in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB pixels) of an 8-bit non-interlaced RGB/RGBA PNG, as Chromium writes them."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
    w, h, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    prev = bytearray(stride)
    pixels = []
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.extend(tuple(line[x:x + 3]) for x in range(0, stride, bpp))
        prev = line
    return w, h, pixels


class TwoInstanceEngine(FakeEngine):
    """A cluster view with lending: instance 0 borrowed 30 blocks of instance 1."""

    def cluster_status(self) -> dict:
        base = {"total_blocks": 100, "num_waiting": 0, "step_time_ms": 12.5, "num_preemptions": 0}
        return {
            "instances": [
                {**base, "rank": 0, "used_blocks": 50, "lent_blocks": 0, "free_blocks": 50, "borrowed_blocks": 30, "num_running": 7},
                {**base, "rank": 1, "used_blocks": 20, "lent_blocks": 30, "free_blocks": 50, "borrowed_blocks": 0, "num_running": 3},
            ],
            "debts": [{"debtor": 0, "creditor": 1, "blocks": 30}],
        }


def count_near(pixels: list[tuple[int, int, int]], rgb: tuple[int, int, int], tol: int = 8) -> int:
    return sum(1 for p in pixels if all(abs(p[i] - rgb[i]) <= tol for i in range(3)))


# ./dev test installs chromium; in CI a missing browser is a failure, not a skip.
@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium (./dev test installs it as root)")
async def test_dashboard_renders_the_cluster_in_headless_chromium(tmp_path):
    engine = TwoInstanceEngine()

    async def start():
        return engine

    app = create_app(start, ServerSettings())
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        await engine_start_task(app)
        page = f"{url(srv)}/dashboard"
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=800,420",
                 "--virtual-time-budget=3000", f"--user-data-dir={tmp_path / 'profile'}"]

        async def chromium(*extra: str) -> bytes:
            proc = await asyncio.create_subprocess_exec(
                CHROMIUM, *flags, *extra, page, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0
            return out

        dom = (await chromium("--dump-dom")).decode()
        shot = tmp_path / "dashboard.png"
        await chromium(f"--screenshot={shot}")
    finally:
        await srv.close()
    # the DOM after the page's script ran: both instances, their numbers, the debt label
    for needle in ('id="instance-0"', 'id="instance-1"', "50 / 0 / 50", "20 / 30 / 50", "12.5 ms", "30 blocks",
                   "2 instance(s)", 'class="debt"'):
        assert needle in dom, needle
    # the screenshot: bars drawn to scale (legend squares are only 100 px each) and the red debt arrow
    w, h, px = decode_png(shot.read_bytes())
    assert (w, h) == (800, 420)
    local, lent, borrowed = count_near(px, (0x3B, 0x7D, 0xD8)), count_near(px, (0xE5, 0x9B, 0x2F)), count_near(px, (0x8E, 0x5B, 0xC9))
    assert local > 1500  # 50% + 20% of two 240 px bars, 18 px high
    assert lent > 600  # 30% of one bar
    assert borrowed > 300  # instance 0's borrowed bar, 8 px high
    assert count_near(px, (0xC0, 0x39, 0x2B), tol=40) > 40  # arrow and its label


# --------------------------------------------------------------------------- lifecycle


async def test_503_while_the_engine_starts_then_serving():
    gate = asyncio.Event()
    engine = FakeEngine()

    async def slow_start():
        await gate.wait()
        return engine

    app = create_app(slow_start, ServerSettings())
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        async with AsyncClient(url(srv)) as c:
            assert not await c.health()
            with pytest.raises(APIStatusError) as e:
                await c.completions("hi", max_tokens=2)
            assert e.value.status == 503 and "starting" in e.value.message
            gate.set()
            await engine_start_task(app)
            assert await c.health()
            assert (await c.completions("hi", max_tokens=2))["usage"]["completion_tokens"] == 2
    finally:
        await srv.close()


async def test_serve_exits_1_when_the_engine_cannot_start():
    from infinite.server.app import serve

    async def broken():
        raise RuntimeError("no such checkpoint")

    ports = []
    code = await asyncio.wait_for(serve(broken, ServerSettings(), "127.0.0.1", 0, on_listening=lambda h, p: ports.append(p)), 30)
    assert code == 1 and ports and ports[0] > 0


async def test_non_streaming_client_that_goes_away_aborts_its_request(server):
    srv, engine = server
    engine.step_s = 0.02
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await s.post(url(srv) + "/v1/completions", json={"prompt": "hi", "max_tokens": 150},
                         headers={"Authorization": f"Bearer {KEY}"})
    for _ in range(100):
        if not engine.used and app_state(srv.app).in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.used == {} and len(engine.aborted) == 1


async def test_a_stream_cut_short_ends_with_finish_reason_error_and_an_error_event(server):
    """A request that fails mid-stream (a rank died, no survivor can take it) must not look like
    a normal end: its choice finishes with "error", an error event follows, then [DONE]."""
    srv, engine = server
    engine.fail_after = 3
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 10, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(url(srv) + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
        events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        import json

        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) and len(chunks) >= 3
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert finishes[-1] == "error" and "length" not in finishes and "abort" not in finishes
        assert chunks[-1]["error"]["code"] == 503 and "rank 1 died" in chunks[-1]["error"]["message"]
        # Before the stream starts the same failure is a plain HTTP status.
        async with s.post(url(srv) + "/v1/completions", json={**body, "stream": False},
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 503 and "rank 1 died" in (await r.json())["error"]["message"]
    assert not engine.used
