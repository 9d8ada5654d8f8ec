"""Fuzzed input against the HTTP API and LLM.generate, on the real engine (embedded tiny model).

Whatever a client sends — random JSON, wrong types, huge strings, invalid
UTF-8, out-of-vocabulary token ids, negative / NaN / huge numbers, unknown
fields — the answer is a 4xx with a message (the offline API raises
ValueError/TypeError), never a 5xx; the next valid request is served; and no
KV block is left held: after every example the pool is walked (free list,
block tables, lent blocks), not just its counters read.

The server runs in this process on a thread of its own, so the test can walk
the engine's rManager directly. Hypothesis runs derandomized (the same
examples on every run) with no example database, so CI sees a stable set.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infinite.runtime.config import EngineConfig
from infinite.server.app import ServerSettings, app_state, create_app, engine_start_task
from infinite.tiny import default_model_dir

NUM_BLOCKS = 64
MAX_MODEL_LEN = 40  # keeps every valid example short: at most 40 tokens per choice
VOCAB = 4096  # a bit above the tiny model's vocabulary, so some ids are out of it
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


class ThreadServer:
    """The real app and AsyncLLMEngine on an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fuzz-server", daemon=True)
        self.port = 0
        self.app = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        if self.error is None:
            self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web

        from infinite.runtime.async_engine import AsyncLLMEngine

        config = EngineConfig(num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN, dtype="float32")

        async def start():
            return await AsyncLLMEngine.start(config)

        try:
            self.app = create_app(start, ServerSettings(max_pending=1024, max_body_bytes=4 * 1024 * 1024))
            self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]
            await engine_start_task(self.app)
        except BaseException as e:  # noqa: BLE001 - reported by the fixture
            self.error = e

    def stop(self) -> None:
        async def close():
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    @property
    def engine(self):
        return app_state(self.app).engine


@pytest.fixture(scope="module")
def srv():
    default_model_dir()
    s = ThreadServer()
    s.thread.start()
    assert s.ready.wait(120), "the fuzz server did not start"
    if s.error is not None:
        raise s.error
    yield s
    s.stop()


def post(srv: ThreadServer, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def assert_no_block_held(srv: ThreadServer) -> None:
    """Walk the pool: every block on the free list, no block table, nothing lent, nothing in flight."""
    deadline = time.monotonic() + 10
    while True:
        rm = srv.engine.core.rm
        free = sorted(rm.pool._free) if hasattr(rm.pool, "_free") else None
        state = (app_state(srv.app).in_flight, dict(rm.tables), dict(rm.lent), rm.pool.num_free)
        if state[0] == 0 and not state[1] and not state[2] and state[3] == NUM_BLOCKS:
            if free is not None:
                assert free == list(range(NUM_BLOCKS)), f"free list is not the whole pool: {free}"
            return
        assert time.monotonic() < deadline, f"blocks still held: in_flight, tables, lent, free = {state}"
        time.sleep(0.02)


def check_answer(status: int, raw: bytes, stream: bool) -> None:
    assert status < 500, f"{status}: {raw[:500]!r}"
    if status >= 400:
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"], raw
        assert err["code"] == status
        return
    assert status == 200
    if stream:
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]", raw[-300:]
        assert not any(b'"error"' in e for e in events[:-1]), raw[-500:]
    else:
        assert json.loads(raw)["choices"], raw[:300]


def assert_still_serving(srv: ThreadServer) -> None:
    status, raw = post(srv, "/v1/completions", b'{"prompt": "ok", "max_tokens": 1}')
    assert status == 200, raw
    assert json.loads(raw)["usage"]["completion_tokens"] == 1


# --------------------------------------------------------------------------- strategies

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=10)
numbers = (st.integers(-5, 40) | st.integers(-(2**64), 2**64) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, -1, 1e308, -1e308, 2**63, 2**63 - 1]))
token_ids = st.integers(-3, VOCAB) | st.sampled_from([2**31, 2**63 - 1, 2**64])
huge_text = st.sampled_from(["x" * 200_000, "é" * 50_000, "\U0001F600" * 20_000, "\x00" * 1000])
texts = st.text(max_size=40) | huge_text
prompts = (texts | st.lists(token_ids, max_size=8) | st.lists(texts, max_size=3)
           | st.lists(st.lists(token_ids, max_size=5), max_size=3) | json_values)
stops = st.none() | st.text(max_size=5) | st.lists(st.text(max_size=4), max_size=3) | json_values

COMMON = {
    "model": st.none() | st.just("infinite-tiny-llama") | st.text(max_size=10) | json_values,
    "max_tokens": st.none() | numbers | json_values,
    "temperature": st.none() | numbers | json_values,
    "top_p": st.none() | numbers,
    "top_k": st.none() | numbers,
    "min_p": st.none() | numbers,
    "n": st.none() | st.integers(-2, 4) | numbers,
    "stop": stops,
    "stop_token_ids": st.none() | st.lists(token_ids, max_size=3) | json_values,
    "seed": st.none() | numbers | json_values,
    "stream": st.none() | st.booleans() | json_values,
    "stream_options": st.none() | st.fixed_dictionaries({}, optional={"include_usage": json_values}) | json_values,
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "repetition_penalty": st.none() | numbers,
    "ignore_eos": st.booleans() | json_values,
    "user": json_values,
}
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in COMMON), json_values, max_size=3)

completion_bodies = st.fixed_dictionaries({}, optional={
    **COMMON, "prompt": prompts, "logprobs": st.none() | numbers, "echo": json_values, "suffix": json_values,
    "best_of": st.none() | numbers,
})
messages = st.lists(st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]) | json_values,
    "content": texts | st.lists(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["text", "image_url"]) | json_values,
                                                                    "text": texts | json_values}), max_size=2) | json_values,
    "name": json_values,
}), max_size=3) | json_values
chat_bodies = st.fixed_dictionaries({}, optional={
    **COMMON, "messages": messages, "max_completion_tokens": st.none() | numbers, "logprobs": json_values,
    "top_logprobs": st.none() | numbers, "tools": json_values, "add_generation_prompt": json_values,
})


def encode_body(body: dict, extra: dict, how: str) -> bytes:
    """As JSON (NaN/Infinity written as such, which strict JSON forbids), or corrupted bytes."""
    text = json.dumps({**body, **extra}, allow_nan=True)
    raw = text.encode("utf-8", "surrogatepass")
    if how == "truncated":
        return raw[: max(1, len(raw) // 2)]
    if how == "invalid-utf8":
        return raw.replace(b'"', b'"\xff\xfe', 1) if b'"' in raw else b"\xff" + raw
    return raw


raw_bodies = st.binary(max_size=64) | st.sampled_from([b"", b"null", b"[]", b"{}", b"\"prompt\"", b"{\"prompt\": \"\xc3\x28\"}",
                                                       b"{\"prompt\": \"hi\", \"max_tokens\": 1e999}", b"{" * 10_000])


# --------------------------------------------------------------------------- tests


bodies = (st.tuples(st.just("/v1/completions"), completion_bodies)
          | st.tuples(st.just("/v1/chat/completions"), chat_bodies))


@settings(FUZZ, max_examples=80)
@given(case=bodies, extra=unknown_fields, how=st.sampled_from(["json", "json", "json", "truncated", "invalid-utf8"]))
def test_fuzzed_completions_and_chats_get_4xx_never_5xx(srv, case, extra, how):
    path, body = case
    status, raw = post(srv, path, encode_body(body, extra, how))
    check_answer(status, raw, stream=body.get("stream") is True)
    assert_no_block_held(srv)
    assert_still_serving(srv)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(raw=raw_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_garbage_bodies_get_400(srv, raw, path):
    status, answer = post(srv, path, raw)
    assert 400 <= status < 500, (status, answer[:300])
    assert json.loads(answer)["error"]["message"]
    assert_still_serving(srv)


# --------------------------------------------------------------------------- offline API


@pytest.fixture(scope="module")
def llm():
    from infinite import LLM

    return LLM(num_kv_blocks=NUM_BLOCKS, max_model_len=MAX_MODEL_LEN, dtype="float32")


params_kwargs = st.fixed_dictionaries({}, optional={
    "temperature": numbers | json_values, "top_p": numbers, "top_k": numbers, "min_p": numbers,
    "max_tokens": st.none() | st.integers(-2, 8) | numbers | json_values, "stop": stops,
    "stop_token_ids": st.none() | st.lists(token_ids, max_size=3) | json_values, "ignore_eos": json_values,
    "seed": numbers | json_values, "logprobs": st.none() | st.integers(-1, 25) | json_values,
    "presence_penalty": numbers, "frequency_penalty": numbers, "repetition_penalty": numbers,
    "n": st.integers(-1, 3) | json_values, "min_tokens": st.integers(-1, 4) | json_values,
})
offline_prompts = (texts | st.lists(token_ids, max_size=8) | st.lists(st.lists(token_ids, min_size=1, max_size=4), max_size=3)
                   | st.fixed_dictionaries({}, optional={"prompt": texts | json_values, "prompt_token_ids": json_values,
                                                         "other": json_values}) | json_values)


@settings(FUZZ, max_examples=80)
@given(prompt=offline_prompts, kwargs=params_kwargs)
def test_fuzzed_llm_generate_raises_value_or_type_error_only(llm, prompt, kwargs):
    from infinite import SamplingParams

    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        assert str(e)
        params = SamplingParams(max_tokens=2)
    try:
        outs = llm.generate(prompt, params, use_tqdm=False)
    except (ValueError, TypeError) as e:
        assert str(e)
    else:
        assert all(o.finished for o in outs)  # generate([]) is [] as in vLLM
    rm = llm.engine.rm
    assert not rm.tables and not rm.lent and rm.pool.num_free == NUM_BLOCKS
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    ok = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 2
