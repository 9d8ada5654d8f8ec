"""The main of one rank process: its instance, RPC, heartbeats, and on rank 0 the
gManager plus the front-end (HTTP server, or the bridge to an offline LLM).

The same function runs under torchrun (env:// rendezvous) and in processes
that LLM(num_instances=N) or `infinite serve --num-instances N` spawn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from infinite.cluster import rpc
from infinite.runtime.config import EngineConfig

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
RANK0_LOST_S = 10.0


@dataclass
class ServeArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    settings: Any = None  # infinite.server.app.ServerSettings
    on_listening: Any = None  # callable(host, port), called once the socket is open


def run_rank(
    rank: int,
    world_size: int,
    config: EngineConfig,
    *,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    role: str = "worker",  # worker | serve | driver
    serve: ServeArgs | None = None,
    driver_conn: Any = None,
    num_threads: int | None = None,
    watch_parent: bool = False,
) -> int:
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")
    logging.basicConfig(level=os.environ.get("INFINITE_LOG_LEVEL", "WARNING"),
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    if config.torch_device().type == "cpu":
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // world_size))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    return asyncio.run(_main(rank, world_size, config, master_addr, master_port, role, serve, driver_conn,
                             watch_parent))


async def _main(rank, world_size, config, master_addr, master_port, role, serve, driver_conn, watch_parent) -> int:
    from infinite.cluster.frontdoor import ClusterEngine
    from infinite.cluster.instance import Instance

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    http = None
    if role == "serve":
        # The socket opens at once; /health answers 503 until the cluster is up, as with one instance.
        from infinite.server.app import serve as serve_http

        ready: asyncio.Future = loop.create_future()

        async def start_engine():
            return await ready

        http = asyncio.ensure_future(serve_http(start_engine, serve.settings, serve.host, serve.port,
                                                stop=stop, on_listening=serve.on_listening))
    try:
        # Load the model (off the loop) before any peer can call us.
        instance = await loop.run_in_executor(None, Instance, config, rank, world_size)
        front = ClusterEngine(instance, world_size) if rank == 0 else None
        if front is not None:
            front.bind(loop, stop)
        rpc.register(instance, front)
        if master_port is None:  # torchrun: env:// rendezvous
            rpc.init_env(rank, world_size)
        else:
            await loop.run_in_executor(None, rpc.init, rank, world_size, master_addr, master_port)
        if front is not None and world_size > 1:
            rtt = await loop.run_in_executor(None, front.gmanager.calibrate_transport)
            log.info("RPC round trip %.0f us", rtt * 1e6)
    except BaseException as e:
        if http is not None:
            ready.set_exception(e)
            await asyncio.gather(http, return_exceptions=True)
        raise
    if http is not None:
        ready.set_result(front)

    def on_signal() -> None:
        if front is not None:
            front.request_stop()
        else:
            try:
                rpc.call_async(0, rpc.h_cluster_stop)
            except Exception:  # noqa: BLE001
                pass
            instance.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    main_task = asyncio.ensure_future(instance.run())
    tasks = [main_task, asyncio.ensure_future(_heartbeats(instance))]
    if front is not None:
        tasks.append(asyncio.ensure_future(front.gmanager.run(lambda: instance.stopping)))
    if watch_parent:
        tasks.append(asyncio.ensure_future(_watch_parent(on_signal)))
    code = 0
    try:
        if http is not None:
            code = await http
        elif role == "driver":
            from infinite.cluster.local import DriverBridge

            await DriverBridge(front, driver_conn).run()
        elif front is not None:  # torchrun rank 0 without a front-end: run until told to stop
            await front.stop_event.wait()
        else:
            while not instance.stopping:
                await asyncio.sleep(0.1)
    finally:
        if front is not None:
            await front.shutdown()
        instance.request_stop()
        await asyncio.wait([main_task], timeout=5.0)
        for t in tasks:
            t.cancel()
        try:
            rpc.shutdown()
        except Exception:  # noqa: BLE001
            log.debug("rpc shutdown", exc_info=True)
    return code


async def _heartbeats(instance) -> None:
    loop = asyncio.get_running_loop()
    lost_since = None
    while not instance.stopping:
        try:
            reply = await asyncio.wait_for(
                rpc.to_asyncio(rpc.call_async(0, rpc.h_heartbeat, instance.heartbeat()), loop), timeout=5.0)
            instance.borrowable = reply["borrowable"]
            lost_since = None
        except Exception:  # noqa: BLE001 - the next beat resends the whole placement
            instance.forget_sent_placement()
            lost_since = lost_since or loop.time()
            if instance.rank != 0 and loop.time() - lost_since > RANK0_LOST_S:
                log.error("rank 0 has not answered for %.0f s: stopping", RANK0_LOST_S)
                instance.request_stop()
                return
        await asyncio.sleep(HEARTBEAT_S)


async def _watch_parent(stop) -> None:
    parent = os.getppid()
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            log.error("the launching process is gone: stopping")
            stop()
            await asyncio.sleep(10)
            os._exit(1)  # peers unreachable: do not linger as an orphan


