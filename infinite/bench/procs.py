"""Processes of a local cluster for the soak: start the server, find its ranks, kill one, add one,
read their memory, and tear everything down with nothing left behind.

Everything runs on 127.0.0.1 with ports picked free at run time; every process
started here is in a session of its own and is killed (group and all) at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infinite.cluster.rpc_transport import free_port  # noqa: F401 - the soak's ports, and the launch tests'

_ROOT = str(Path(__file__).resolve().parents[2])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(p) for p in out.split()]


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


def rank_of(pid: int) -> int | None:
    """The rank a spawned rank process runs (its INFINITE_RANK), None for any other process."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"INFINITE_RANK="):
            return int(kv.split(b"=", 1)[1])
    return None


def tp_rank_of(pid: int) -> int:
    """A spawned rank process's place in its tensor-parallel group (INFINITE_TP_RANK; 0 when absent)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return 0
    return next((int(kv.split(b"=", 1)[1]) for kv in env if kv.startswith(b"INFINITE_TP_RANK=")), 0)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes, MiB."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def get_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@dataclass
class LocalCluster:
    """``infinite serve --num-instances N`` in its own session, plus instances that joined later."""

    ranks: int
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    cluster_port: int = 0
    proc: subprocess.Popen | None = None
    joiners: list[subprocess.Popen] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="infinite-soak-")))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        self.cluster_port = free_port()
        cmd = [sys.executable, "-m", "infinite.cli", "serve", "--num-instances", str(self.ranks), "--port", "0",
               "--cluster-port", str(self.cluster_port), "--log-level", "warning", *self.extra_args]
        log = open(self.logdir / "server.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.port:
            m = re.search(r"listening on http://[\d.]+:(\d+)", self.log_text())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.wait_health("ok", deadline - time.monotonic())

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("*.log")))

    def health(self) -> tuple[int, dict]:
        try:
            return get_json(self.url + "/health")
        except OSError:
            return 0, {}

    def wait_health(self, status: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            code, body = self.health()
            if body.get("status") == status:
                return body
            if time.monotonic() > deadline:
                raise RuntimeError(f"/health is not {status!r} after {timeout:.0f} s: {code} {body}")
            time.sleep(0.1)

    def status(self) -> dict:
        return get_json(self.url + "/status")[1]

    def rank_pids(self) -> list[int]:
        """Every live rank process: rank 0 (the server), the spawned workers, the joiners."""
        pids = [self.proc.pid] + [p for p in descendants(self.proc.pid) if "infinite.cluster.spawn" in cmdline(p)]
        pids += [j.pid for j in self.joiners]
        return [p for p in pids if alive(p)]

    def worker_pids(self) -> dict[int, int]:
        """rank -> pid of the live spawned workers."""
        out = {}
        for p in descendants(self.proc.pid):
            r = rank_of(p)
            if r is not None and alive(p):
                out[r] = p
        return out

    def join(self) -> subprocess.Popen:
        i = len(self.joiners)
        log = open(self.logdir / f"join{i}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "infinite.cli", "join", "--cluster", f"127.0.0.1:{self.cluster_port}",
                              "--log-level", "warning"], cwd=_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.joiners.append(p)
        return p

    def stop(self, timeout: float = 30.0) -> list[str]:
        """SIGTERM to the server (it stops every rank), then to joiners; SIGKILL what lingers.
        Returns the command lines of processes that had to be killed (orphans)."""
        procs = [p for p in [self.proc, *self.joiners] if p is not None]
        everyone: dict[int, str] = {}  # pid -> command line: a pid reused meanwhile is not ours
        for p in procs:
            if p.poll() is None:
                everyone.update({q: cmdline(q) for q in [p.pid] + descendants(p.pid)})
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout

        def ours() -> list[int]:
            return [q for q, cmd in everyone.items() if alive(q) and cmdline(q) == cmd]

        while time.monotonic() < deadline and ours():
            time.sleep(0.1)
        left = ours()
        names = [everyone[q] for q in left]
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return names
