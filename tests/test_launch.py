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


MID = " ".join(["the keeper of the light walked up the stairs"] * 13)  # 131 tokens: with 100 more, 15 of 16 blocks
LONG = " ".join(["the keeper of the light walked up the stairs"] * 30)  # 301 tokens: 19 blocks, 29 with 160 more


def leavers_of(status: dict) -> tuple[int, int] | None:
    """Two workers to send away, read off /status: one lending blocks to another instance's request
    and one home to a running request (any other worker when the lender is both); None while no
    worker lends or none runs a request."""
    workers = sorted(i["rank"] for i in status["instances"] if i["rank"] != 0)
    lenders = sorted({d["creditor"] for d in status["debts"]} - {0})
    homes = [i["rank"] for i in status["instances"] if i["rank"] != 0 and i["num_running"] > 0]
    if not lenders or not homes:
        return None
    lender = lenders[0]
    other = next((h for h in homes if h != lender), None)
    if other is None:  # the lender is also the only worker running a request: any other worker goes too
        other = next(w for w in workers if w != lender)
    return lender, other


def test_workers_leave_by_sigterm_and_by_the_admin_endpoint_while_streams_go_on():
    """Two of three workers leave — one by the admin endpoint, one by SIGTERM — while a request
    borrows blocks from one of them and another runs at home on one of them; every stream ends
    as it would have undisturbed. The loans are for capacity (a prompt longer than a pool), which
    the gManager grants whatever its cost model says, so the test does not hang on whether a
    loan for throughput would pay on this machine (the no-regret rule decides that from measured
    step times). Four instances, so that the two that stay can still hold the long request."""
    key = "admin-key"
    port = free_port()
    proc = start([sys.executable, "-m", "infinite.cli", "serve", "--num-instances", "4", "--port", str(port),
                  "--num-kv-blocks", "16", "--dtype", "float32", "--threads-per-rank", "1", "--api-key", key,
                  # the prompts share a prefix: with the prefix cache the router would home them with it
                  "--no-enable-prefix-caching"])
    try:
        wait_ready(port, proc, n=4)
        # MID fits a pool; LONG's prompt does not (19 blocks of 16), so it borrows as it is admitted,
        # and with its output (29 blocks) it still fits the two instances that stay (16 + 15).
        prompts = [(MID, 100), (LONG, 160), ("A short one", 100), (MID + " again", 100)]
        refs = [complete(port, p, n, key=key)["choices"][0]["text"] for p, n in prompts]
        streams = [in_thread(complete, port, *prompts[0], True, key)]
        wait_status(port, lambda st: sum(i["num_running"] for i in st["instances"]) >= 1, "MID to run")
        # LONG goes to the freest instance; its loan comes from a worker: rank 0 is LONG's home
        # when idle, and when MID runs there it has less to lend than an idle worker.
        streams.append(in_thread(complete, port, *prompts[1], True, key))
        st = wait_status(port, leavers_of, "a worker to lend blocks while a worker runs a request")
        streams += [in_thread(complete, port, p, n, True, key) for p, n in prompts[2:]]
        by_admin, by_sigterm = leavers_of(st)
        print(f"\nleaving: rank {by_admin} (admin endpoint), rank {by_sigterm} (SIGTERM); debts {st['debts']}")
        workers = {rank_of(p): p for p in descendants(proc.pid) if rank_of(p)}
        assert sorted(workers) == [1, 2, 3]
        assert post(port, f"/admin/instances/{by_admin}/leave")[0] == 401  # behind the API key
        assert post(port, "/admin/instances/0/leave", key)[0] == 400  # rank 0 runs the front end
        code, body = post(port, f"/admin/instances/{by_admin}/leave", key)
        assert code == 200 and body["status"] == "draining", body
        os.kill(workers[by_sigterm], signal.SIGTERM)  # a graceful leave too
        for r in (by_admin, by_sigterm):
            wait_exit(workers[r], 40)
        for (t, box), want in zip(streams, refs):
            t.join(120)
            text, errors, ended = box[0]
            assert ended and not errors and text == want  # moved and recomputed, nothing lost or repeated
        stay = sorted({0, 1, 2, 3} - {by_admin, by_sigterm})
        code, health = get_json(f"http://127.0.0.1:{port}/health")
        assert code == 200 and health["status"] == "ok" and health["serving"] == stay, health
        assert health["instances"] == 2 and health["target"] == 2
        assert complete(port, "still there", 3, key=key)["usage"]["completion_tokens"] == 3
        everyone = [proc.pid] + descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert_all_exit(everyone)
        assert proc.wait(timeout=5) == 0  # no rank was lost: a clean exit
    finally:
        kill_all([proc])


def wait_status(port: int, cond, what: str, timeout: float = 60.0) -> dict:
    """Poll /status until ``cond(status)`` holds; the status that satisfied it."""
    deadline = time.monotonic() + timeout
    while True:
        st = get_json(f"http://127.0.0.1:{port}/status")[1]
        if cond(st):
            return st
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {st['instances']} {st['debts']}"
        time.sleep(0.05)


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
