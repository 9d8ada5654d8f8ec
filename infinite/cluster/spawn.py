"""Start rank processes on this host, and the entry point they run.

Ranks are fresh interpreters (``python -m infinite.cluster.spawn``) that read
their spec from stdin, not ``multiprocessing`` children: those re-import the
caller's ``__main__``, so a script that builds ``LLM(num_instances=N)`` at top
level, without an ``if __name__ == "__main__":`` guard, would spawn itself
again. Here the user's script is never imported by a rank. Each rank watches
its launcher and exits when it is gone, so no orphan is left behind.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import msgspec

from infinite.cluster.rank import RankOptions, run_rank
from infinite.runtime.config import EngineConfig

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class RankSpec(msgspec.Struct):
    config: EngineConfig
    opts: RankOptions
    driver_address: tuple[str, int] | None = None  # LocalCluster's socket (rank 0 connects)
    driver_authkey: bytes | None = None


def local_rendezvous(world_size: int, *, log_level: str = "WARNING", rpc_port: int = 0,
                     tp_size: int = 1) -> list[RankOptions]:
    """Options of every rank process of a cluster of ``world_size`` instances of ``tp_size`` ranks each
    on this host, instance by instance: two loopback ports (RPC, whose store new ranks join through,
    and point-to-point), free ones unless ``rpc_port`` is given."""
    from infinite.cluster.rpc_transport import free_port

    rpc_init, data_init = f"tcp://127.0.0.1:{rpc_port or free_port()}", f"tcp://127.0.0.1:{free_port()}"
    n = world_size * tp_size
    return [RankOptions(r, world_size, rpc_init, data_init, local_world_size=n, log_level=log_level, tp_rank=j,
                        local_rank=r * tp_size + j)
            for r in range(world_size) for j in range(tp_size)]


def check_local(config: EngineConfig) -> None:
    """Before starting ranks on this host: ValueError now, with the numbers, for what every rank would
    fail on (a model the group cannot split, too few GPUs)."""
    from infinite.cluster.devices import host_gpus, rank_device
    from infinite.model.config import ModelConfig
    from infinite.model.parallel import check_divisible

    if config.tensor_parallel_size > 1:
        check_divisible(ModelConfig.from_pretrained(config.model), config.tensor_parallel_size)
    rank_device(config.device, 0, config.num_processes, host_gpus())


def spawn_ranks(config: EngineConfig, opts: list[RankOptions],
                driver: tuple[tuple[str, int], bytes] | None = None) -> list[subprocess.Popen]:
    """Start one process per RankOptions (watching this process); ``driver`` goes to rank 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    procs = []
    for o in opts:
        spec = RankSpec(config, replace(o, watch_parent=True))
        if o.rank == 0 and driver is not None:
            spec.driver_address, spec.driver_authkey = driver
        # INFINITE_RANK names the process's rank for operators and tests (ps e, /proc/PID/environ); a
        # tensor-parallel group's other ranks also carry INFINITE_TP_RANK.
        tp = {"INFINITE_TP_RANK": str(o.tp_rank)} if o.tp_rank else {}
        p = subprocess.Popen([sys.executable, "-m", "infinite.cluster.spawn"], stdin=subprocess.PIPE,
                             env={**env, "INFINITE_RANK": str(o.rank), **tp})
        p.stdin.write(msgspec.msgpack.encode(spec))
        p.stdin.close()
        procs.append(p)
    return procs


def stop_ranks(procs: list[subprocess.Popen], timeout_s: float = 15.0) -> None:
    """Wait for ranks to exit on their own, then terminate, then kill."""
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def main() -> int:
    spec = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=RankSpec)
    front_end = None
    if spec.driver_address is not None:
        from infinite.cluster.driver import driver_front_end

        front_end = functools.partial(driver_front_end, tuple(spec.driver_address), spec.driver_authkey)
    return run_rank(spec.config, spec.opts, front_end)


if __name__ == "__main__":
    sys.exit(main())
