"""End to end: the real ``python -m infinite.server`` process on the embedded default model.

One server for the whole module (starting it is the slow part), driven with
the official ``openai`` package and, where the raw bytes matter (malformed
JSON, ``[DONE]``, disconnects), with plain HTTP. The server runs in its own
process group and is always killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest

from infinite.tiny import default_model_dir
from infinite.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
KEY = "e2e-secret"
MODEL = "tiny-e2e"
NUM_BLOCKS = 96  # x16 = 1536 tokens of cluster capacity, under max_model_len
MAX_MODEL_LEN = 2048
MAX_PENDING = 64
MAX_BODY = 256 * 1024
PROMPT = "The lighthouse keeper woke before dawn"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_for_port(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on http://[\d.]+:(\d+)", log.read_text(errors="replace"))
        if m:
            return int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"server did not open its port in {timeout} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(*args: str, ready_timeout: float = 90.0):
    """The real server process with these arguments; always killed (process group) on exit."""
    default_model_dir()  # build the default checkpoint here, not under the server's startup clock
    tmp = Path(tempfile.mkdtemp(prefix="infinite-e2e-"))
    log = tmp / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "infinite.server", "--port", "0", "--api-key", KEY, "--served-model-name", MODEL, *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        srv = Server(proc, _wait_for_port(proc, log, 60), log)
        deadline = time.monotonic() + ready_timeout
        while request(srv, "GET", "/health")[0] != 200:
            assert proc.poll() is None, srv.log_tail()
            assert time.monotonic() < deadline, f"not healthy in time:\n{srv.log_tail()}"
            time.sleep(0.1)
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server():
    with running_server(
        "--num-kv-blocks", str(NUM_BLOCKS), "--max-model-len", str(MAX_MODEL_LEN), "--max-pending", str(MAX_PENDING),
        "--max-request-bytes", str(MAX_BODY), "--dtype", "float32",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_dir())


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def request(server: Server, method: str, path: str, body: bytes | dict | None = None, key: str | None = KEY) -> tuple[int, dict | str]:
    """One plain HTTP call; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except ConnectionError:
        return 0, ""
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else ""
    except ValueError:
        return resp.status, raw.decode(errors="replace")


def status(server: Server) -> dict:
    code, body = request(server, "GET", "/status")
    assert code == 200
    return body


def wait_idle(server: Server, timeout: float = 15.0) -> dict:
    """Poll /status until no request holds a block anywhere."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(server)
        busy = st["in_flight"] or any(i["used_blocks"] or i["num_running"] or i["num_waiting"] for i in st["instances"])
        if not busy:
            return st
        assert time.monotonic() < deadline, f"blocks still held: {st}"
        time.sleep(0.05)


def assert_still_serving(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="still there?", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


# --------------------------------------------------------------------------- happy paths


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert request(server, "GET", "/health", key=None)[0] == 200
    assert request(server, "GET", "/version", key=None)[1]["version"]
    code, text = request(server, "GET", "/metrics", key=None)
    assert code == 200
    for name in (
        "infinite:num_requests_running", "infinite:num_requests_waiting", "infinite:kv_cache_usage_perc",
        "infinite:kv_blocks_lent", "infinite:kv_blocks_borrowed", "infinite:num_preemptions_total",
    ):
        assert f'{name}{{instance="0"}}' in text, name
    st = status(server)
    assert st["ready"] and st["instances"][0]["total_blocks"] == NUM_BLOCKS


def test_completion_usage_equals_token_counts(server, client, tok):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, logprobs=1, extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert r.usage.completion_tokens == 6 == len(choice.logprobs.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    # token-id prompts are counted as given
    ids = tok.encode(PROMPT)[:5]
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, extra_body={"ignore_eos": True})
    assert (r2.usage.prompt_tokens, r2.usage.completion_tokens) == (5, 3)


def test_cached_tokens_in_usage_and_metrics_and_cache_salt_apart(server, client, tok):
    """A prompt sent again reports its prefix-cache hit in usage.prompt_tokens_details.cached_tokens
    (whole blocks, its last token computed), the counters show it, and another salt gets nothing."""
    ids = [t % 200 + 50 for t in range(70)]  # 4 full blocks and 6 tokens, seen by no other test
    kw = dict(model=MODEL, prompt=ids, max_tokens=2, extra_body={"ignore_eos": True})
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    other = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "cache_salt": "tenant-b"}})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 64
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    text = request(server, "GET", "/metrics", key=None)[1]
    hits = re.search(r'infinite:prefix_cache_hits_total\{instance="0"\} ([0-9.e+]+)', text)
    queries = re.search(r'infinite:prefix_cache_queries_total\{instance="0"\} ([0-9.e+]+)', text)
    assert hits and queries and float(hits.group(1)) >= 64 and float(queries.group(1)) >= 3 * 70
    code, body = request(server, "POST", "/v1/completions", {**kw, "cache_salt": ""})
    assert code == 400 and body["error"]["param"] == "cache_salt"


def test_streaming_completion_matches_non_streaming(server, client, tok):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.8, seed=11, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(PROMPT))


def test_chat_streaming_and_not(server, client, tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Describe the sea."}]
    kw = dict(model=MODEL, messages=msgs, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    expected_prompt = len(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False))
    assert r.usage.prompt_tokens == expected_prompt
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].usage.prompt_tokens == expected_prompt
    # max_completion_tokens is honoured too
    r3 = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r3.usage.completion_tokens == 3


def test_seed_reproducibility(server, client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, n=2, seed=1234, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # choice i samples with seed + i
    assert a.usage.completion_tokens == 20


def test_stop_strings(server, client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    i = next(i for i in range(2, len(text) - 2) if text[i:i + 2].isalpha())
    stop = text[i:i + 2]
    expected = text[: text.index(stop)]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == expected


# --------------------------------------------------------------------------- bad input


BAD_COMPLETIONS = [
    (b'{"model": "tiny-e2e", "prompt": "x"', 400, None),
    (b"not json at all", 400, None),
    (b"", 400, None),
    ({"model": MODEL, "prompt": "x", "max_tokens": "five"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": 12.5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": [10**7]}, 400, "prompt"),
    ({"model": "no-such-model", "prompt": "x"}, 404, "model"),
]


@pytest.mark.parametrize("body, code, param", BAD_COMPLETIONS)
def test_bad_completion_requests_get_4xx_and_the_server_keeps_serving(server, client, body, code, param):
    got, err = request(server, "POST", "/v1/completions", body)
    assert got == code, err
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["code"] == code
    if param is not None:
        assert err["error"]["param"] == param
    assert_still_serving(client)


def test_bad_chat_requests(server, client):
    for body in (
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        {"model": MODEL, "messages": "hello"},
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
        {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]},  # the template refuses the role
    ):
        got, err = request(server, "POST", "/v1/chat/completions", body)
        assert got == 400, (body, err)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert_still_serving(client)


def test_too_long_prompts_say_the_numbers(server, client, tok):
    words = "the sea " * 2000
    ids = tok.encode(words)
    over_capacity = ids[: NUM_BLOCKS * 16 + 10]  # fits max_model_len, not the KV pool
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=over_capacity, max_tokens=4)
    assert str(NUM_BLOCKS * 16) in str(e.value) and str(len(over_capacity) + 4) in str(e.value)
    over_context = ids[: MAX_MODEL_LEN + 5]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=over_context, max_tokens=4)
    assert str(MAX_MODEL_LEN) in str(e.value) and str(len(over_context) + 4) in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": words[:8000]}])
    assert_still_serving(client)


def test_api_key_is_required_on_v1_only(server, client):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    got, err = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None)
    assert got == 401 and err["error"]["type"] == "AuthenticationError"
    assert request(server, "GET", "/v1/models", key=None)[0] == 401
    assert request(server, "GET", "/health", key=None)[0] == 200
    assert_still_serving(client)


def test_oversized_body_is_413(server, client):
    got, err = request(server, "POST", "/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_BODY + 10)})
    assert got == 413 and str(MAX_BODY) in err["error"]["message"]
    assert_still_serving(client)


def test_overload_is_503(server, client):
    with pytest.raises(openai.InternalServerError) as e:  # openai maps every 5xx to this class
        client.completions.create(model=MODEL, prompt="x", n=MAX_PENDING + 1, max_tokens=1)
    assert e.value.status_code == 503
    assert_still_serving(client)


# --------------------------------------------------------------------------- disconnects and load


def aborted_count(server: Server) -> float:
    text = request(server, "GET", "/metrics", key=None)[1]
    m = re.search(r'^infinite:request_aborted_total\{model_name="tiny-e2e"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def test_disconnect_mid_stream_frees_every_block(server):
    wait_idle(server)
    before = aborted_count(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(server.url + "/v1/completions", json=body, headers=headers)
        assert resp.status == 200
        events = 0
        async for line in resp.content:
            events += line.startswith(b"data: ")
            if events == 3:
                break
        busy = status(server)["instances"][0]
        assert busy["used_blocks"] > 0 and busy["num_running"] == 1
        resp.close()  # drop the connection mid-stream
    st = wait_idle(server)
    assert st["instances"][0]["free_blocks"] == NUM_BLOCKS
    assert aborted_count(server) == before + 1  # freed by the abort, not by running to the end


async def test_load_64_concurrent_streaming_clients(server):
    wait_idle(server)
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 3.0
    rng = random.Random(0)

    async def one_client(s: aiohttp.ClientSession, k: int) -> int:
        done = 0
        while done == 0 or time.monotonic() < deadline:
            body = {"model": MODEL, "prompt": f"{PROMPT} {k}", "max_tokens": rng.randint(2, 8), "ignore_eos": True,
                    "stream": True, "temperature": 1.0}
            async with s.post(server.url + "/v1/completions", json=body, headers=headers) as resp:
                raw = await resp.read()
            assert resp.status == 200, raw
            events = [e for e in raw.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]", raw[-200:]
            assert not any(b'"error"' in e for e in events), raw
            assert sum(json.loads(e[6:])["choices"][0]["finish_reason"] == "length" for e in events[:-1]) == 1
            done += 1
        return done

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
        t0 = time.monotonic()
        counts = await asyncio.gather(*(one_client(s, k) for k in range(64)))
        elapsed = time.monotonic() - t0
    assert min(counts) >= 1
    st = wait_idle(server)
    assert st["instances"][0]["free_blocks"] == NUM_BLOCKS and st["in_flight"] == 0
    print(f"\nload: 64 clients, {sum(counts)} streams in {elapsed:.1f} s, all ended with [DONE]")


# --------------------------------------------------------------------------- two instances


def test_two_instance_cluster_behind_the_same_front_end():
    """--num-instances 2: same API; status shows both pools; a disconnect frees blocks on both."""
    with running_server("--num-instances", "2", "--num-kv-blocks", "48", "--dtype", "float32", ready_timeout=180) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, seed=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, seed=3, extra_body={"ignore_eos": True})
        assert again.choices[0].text == r.choices[0].text
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ))
        assert chunks[-1].usage.completion_tokens == 4
        st = status(srv)
        assert sorted(i["rank"] for i in st["instances"]) == [0, 1]
        assert srv.url and request(srv, "GET", "/metrics", key=None)[1].count('infinite:kv_blocks_free{instance=') == 2

        async def disconnect() -> None:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True, "stream": True}
            async with aiohttp.ClientSession() as s:
                resp = await s.post(srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
                n = 0
                async for line in resp.content:
                    n += line.startswith(b"data: ")
                    if n == 2:
                        break
                resp.close()

        asyncio.run(disconnect())
        st = wait_idle(srv, timeout=30)
        assert all(i["free_blocks"] == i["total_blocks"] for i in st["instances"]), st
