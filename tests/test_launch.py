"""Launching clusters as users do, and tearing them down from any rank with no orphans."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infinite.bench.procs import alive, cmdline, descendants, free_port, get_json, rank_of
from infinite.cluster.membership import RANK0_LOST_S


ROOT = Path(__file__).resolve().parent.parent


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0, n: int = 2) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                st = json.loads(r.read())
                if st.get("ready") and len(st.get("instances", [])) >= n:
                    return st
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("server did not become ready")


def complete(port: int, prompt: str = "Hello", max_tokens: int = 4, stream: bool = False, key: str | None = None):
    """A greedy completion: the JSON body, or for a stream (its text, its error events, whether it ended)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "stream": stream}).encode()
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    if not stream:
        return json.loads(raw)
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    finishes = [e["choices"][0]["finish_reason"] for e in events if e.get("choices") and e["choices"][0]["finish_reason"]]
    return text, [e["error"] for e in events if "error" in e], "data: [DONE]" in raw and finishes[-1:] == ["length"]


def post(port: int, path: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", b"", {"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def in_thread(fn, *args):
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    t.start()
    return t, box


def wait_exit(pid_or_proc, timeout: float) -> float:
    t0 = time.monotonic()
    while (pid_or_proc.poll() is None) if isinstance(pid_or_proc, subprocess.Popen) else alive(pid_or_proc):
        assert time.monotonic() - t0 < timeout, f"{pid_or_proc} still running after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def start(cmd: list[str], log: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    out = open(log, "wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def assert_all_exit(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"orphans left: {[cmdline(p) for p in left]}"


MID = " ".join(["the keeper of the light walked up the stairs"] * 13)  # ~120 tokens: with 100 more, 14 of 16 blocks


def test_workers_leave_by_sigterm_and_by_the_admin_endpoint_while_streams_go_on():
    key = "admin-key"
    port = free_port()
    proc = start([sys.executable, "-m", "infinite.cli", "serve", "--num-instances", "3", "--port", str(port),
                  "--num-kv-blocks", "16", "--dtype", "float32", "--threads-per-rank", "1", "--api-key", key,
                  "--eager-lending",  # every request fits a pool: lend for throughput without measured remote steps
                  # the prompts share a prefix: with the prefix cache the router would home them with it on
                  # rank 0, which would lend its prefix to the workers (so they could not lend)
                  "--no-enable-prefix-caching"])
    try:
        wait_ready(port, proc, n=3)
        # Four of these cannot share one 16-block pool: some are homed on the workers, some borrow there.
        prompts = [MID, "A short one", MID + " again", MID + " and again"]
        refs = [complete(port, p, 100, key=key)["choices"][0]["text"] for p in prompts]
        streams = [in_thread(complete, port, p, 100, True, key) for p in prompts]
        deadline = time.monotonic() + 30
        while True:  # the workers are home to requests and lend blocks to others
            insts = get_json(f"http://127.0.0.1:{port}/status")[1]["instances"]
            if sum(i["num_running"] for i in insts[1:]) >= 1 and sum(i["lent_blocks"] for i in insts[1:]) > 0:
                break
            assert time.monotonic() < deadline, f"the workers did not get requests and lend: {insts}"
            time.sleep(0.05)
        workers = {rank_of(p): p for p in descendants(proc.pid) if rank_of(p)}
        assert sorted(workers) == [1, 2]
        assert post(port, "/admin/instances/2/leave")[0] == 401  # behind the API key
        assert post(port, "/admin/instances/0/leave", key)[0] == 400  # rank 0 runs the front end
        code, body = post(port, "/admin/instances/2/leave", key)
        assert code == 200 and body["status"] == "draining", body
        os.kill(workers[1], signal.SIGTERM)  # a graceful leave too
        for r in (1, 2):
            wait_exit(workers[r], 40)
        for (t, box), want in zip(streams, refs):
            t.join(120)
            text, errors, ended = box[0]
            assert ended and not errors and text == want  # moved and recomputed, nothing lost or repeated
        code, health = get_json(f"http://127.0.0.1:{port}/health")
        assert code == 200 and health["status"] == "ok" and health["instances"] == 1 and health["target"] == 1
        assert complete(port, "still there", 3, key=key)["usage"]["completion_tokens"] == 3
        everyone = [proc.pid] + descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert_all_exit(everyone)
        assert proc.wait(timeout=5) == 0  # no rank was lost: a clean exit
    finally:
        kill_all([proc])


@pytest.mark.parametrize("nproc,tp", [(2, 1), (4, 2)])
def test_torchrun_launch_serves_and_sigint_stops_every_rank(nproc, tp):
    """Two instances: of one torchrun rank each, or of two (tensor-parallel groups of consecutive ranks)."""
    port = free_port()
    proc = start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                  "-m", "infinite.launch.serve", "--port", str(port), "--num-kv-blocks", "32", "--dtype", "float32",
                  "--tensor-parallel-size", str(tp), "--threads-per-rank", "1"])
    try:
        st = wait_ready(port, proc, timeout=180)
        assert [i["rank"] for i in st["instances"]] == [0, 1]
        assert complete(port)["usage"]["completion_tokens"] == 4
        everyone = [proc.pid] + descendants(proc.pid)
        assert sum("infinite.launch.serve" in cmdline(p) for p in everyone) >= nproc
        os.kill(proc.pid, signal.SIGINT)
        assert_all_exit(everyone, timeout=60)
    finally:
        kill_all([proc])


def torchrun_node(node_rank: int, master_port: int, http_port: int, log: Path | None = None) -> subprocess.Popen:
    return start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
                  "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(master_port),
                  "-m", "infinite.launch.serve", "--port", str(http_port), "--num-kv-blocks", "32", "--dtype", "float32",
                  "--threads-per-rank", "1"], log)


def kill_all(procs: list[subprocess.Popen]) -> None:
    """Whatever a failed test left: each process still running and everything under it (torchrun's
    workers run in sessions of their own, so killing the agent's group is not enough; a worker
    whose agent is gone already stops by itself, watching its parent)."""
    for p in procs:
        if p.poll() is not None:
            continue  # exited and reaped: its pid may be another process's by now
        for pid in descendants(p.pid) + [p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def kill_node(node: subprocess.Popen) -> list[int]:
    """SIGKILL a torchrun node: its agent and every process under it (workers run in a session of their own)."""
    pids = [node.pid] + descendants(node.pid)
    for p in pids:
        os.kill(p, signal.SIGKILL)
    return pids


def test_two_torchrun_nodes_survive_node1_being_killed():
    mport, port = free_port(), free_port()
    nodes = [torchrun_node(0, mport, port), torchrun_node(1, mport, port)]
    try:
        wait_ready(port, nodes[0], timeout=180)
        ref = complete(port, "Hello", 300)["choices"][0]["text"]
        streams = [in_thread(complete, port, "Hello", 300, True) for _ in range(4)]  # homes spread over both
        deadline = time.monotonic() + 30
        while not get_json(f"http://127.0.0.1:{port}/status")[1]["instances"][1]["num_running"]:
            assert time.monotonic() < deadline, "no request reached rank 1"
            time.sleep(0.05)
        node0 = [nodes[0].pid] + descendants(nodes[0].pid)
        kill_node(nodes[1])
        t_kill = time.monotonic()
        for t, box in streams:
            t.join(120)
            text, errors, ended = box[0]
            assert ended and not errors and text == ref  # the requests on rank 1 were recomputed on rank 0
        code, health = get_json(f"http://127.0.0.1:{port}/health")
        assert code == 503 and health["status"] == "degraded" and [x["rank"] for x in health["lost"]] == [1]
        assert health["lost"][0]["seconds_ago"] <= time.monotonic() - t_kill
        st = get_json(f"http://127.0.0.1:{port}/status")[1]
        assert [i["rank"] for i in st["instances"]] == [0] and st["recovery"]["moved"] >= 1  # no stale rank 1
        assert complete(port, "and after", 3)["usage"]["completion_tokens"] == 3
        # A new instance joins through torchrun's store (MASTER_ADDR:MASTER_PORT) in place of rank 1.
        nodes.append(start([sys.executable, "-m", "infinite.cli", "join", "--cluster", f"127.0.0.1:{mport}"]))
        deadline = time.monotonic() + 60
        while (health := get_json(f"http://127.0.0.1:{port}/health")[1])["status"] != "ok":
            assert time.monotonic() < deadline and nodes[2].poll() is None, health
            time.sleep(0.1)
        assert health["serving"] == [0, 2] and complete(port, "with a new rank", 3)["usage"]["completion_tokens"] == 3
        node0 += [nodes[2].pid]
        nodes[0].send_signal(signal.SIGINT)
        took = wait_exit(nodes[0], 30)  # no 300 s wait on torchrun's exit barrier for the dead node
        assert nodes[0].returncode != 0, "a node whose peer died must not exit 0"
        assert_all_exit(node0, timeout=10)
        print(f"\nnode 0 exited {nodes[0].returncode} {took:.1f} s after SIGINT")
    finally:
        kill_all(nodes)


def test_a_torchrun_node_whose_rank0_died_exits_nonzero_promptly(tmp_path):
    mport, port = free_port(), free_port()
    nodes = [torchrun_node(0, mport, port), torchrun_node(1, mport, port, tmp_path / "node1.log")]
    try:
        wait_ready(port, nodes[0], timeout=180)
        node1 = [nodes[1].pid] + descendants(nodes[1].pid)
        kill_node(nodes[0])
        took = wait_exit(nodes[1], RANK0_LOST_S + 20)
        assert nodes[1].returncode != 0
        assert_all_exit(node1, timeout=10)
        assert "rank 0 has not answered heartbeats" in (tmp_path / "node1.log").read_text(errors="replace")
        print(f"\nnode 1 exited {nodes[1].returncode} {took:.1f} s after node 0 was killed")
    finally:
        kill_all(nodes)
