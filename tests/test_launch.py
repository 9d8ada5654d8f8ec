"""Launching clusters as users do, and tearing them down from any rank with no orphans."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        for c in children(todo.pop()):
            seen.append(c)
            todo.append(c)
    return seen


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return " Z " not in stat  # a zombie has exited


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                st = json.loads(r.read())
                if st.get("ready") and len(st.get("instances", [])) >= 2:
                    return st
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become ready")


def complete(port: int) -> dict:
    body = json.dumps({"model": "infinite-tiny-llama", "prompt": "Hello", "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def assert_all_exit(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"orphans left: {[cmdline(p) for p in left]}"


def test_sigterm_to_a_worker_rank_stops_the_whole_cluster():
    port = free_port()
    proc = start([sys.executable, "-m", "infinite.cli", "serve", "--num-instances", "2", "--port", str(port),
                  "--num-kv-blocks", "32", "--dtype", "float32"])
    try:
        wait_ready(port, proc)
        assert complete(port)["usage"]["completion_tokens"] == 4
        ranks = [p for p in descendants(proc.pid) if "infinite.cluster.spawn" in cmdline(p)]
        assert len(ranks) == 1, "one spawned worker rank expected"
        everyone = [proc.pid] + descendants(proc.pid)
        os.kill(ranks[0], signal.SIGTERM)
        assert_all_exit(everyone)
        assert proc.wait(timeout=5) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_torchrun_launch_serves_and_sigint_stops_every_rank():
    port = free_port()
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "infinite.launch.serve", "--port", str(port), "--num-kv-blocks", "32", "--dtype", "float32"])
    try:
        st = wait_ready(port, proc, timeout=180)
        assert [i["rank"] for i in st["instances"]] == [0, 1]
        assert complete(port)["usage"]["completion_tokens"] == 4
        everyone = [proc.pid] + descendants(proc.pid)
        assert sum("infinite.launch.serve" in cmdline(p) for p in everyone) >= 2
        os.kill(proc.pid, signal.SIGINT)
        assert_all_exit(everyone, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
