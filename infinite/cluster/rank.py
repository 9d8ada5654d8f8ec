"""The main of one rank process: its transport, its instance, heartbeats, and on rank 0 the
gManager with the front door, plus whatever front-end the launcher hands in (the HTTP
server, LocalCluster's driver bridge, or none).

The same function runs under torchrun (``env://`` rendezvous), in the ranks that
LocalCluster or ``infinite serve --num-instances N`` start, and in-process in tests.
It imports no front-end: the launch layer composes (infinite/launch, infinite/cli).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from infinite.cluster.transport import to_asyncio
from infinite.runtime.config import EngineConfig

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
RANK0_LOST_S = 10.0

# What rank 0 runs beside its instance: given a future of the ClusterEngine (set once the
# cluster is up) and the stop event, it serves until told to stop and returns an exit code.
FrontEnd = Callable[["asyncio.Future", asyncio.Event], Awaitable[int]]


@dataclass
class RankOptions:
    rank: int
    world_size: int
    init_method: str = "env://"  # RPC: torchrun's rendezvous, or tcp://HOST:PORT
    data_init_method: str = "env://"  # the point-to-point process group: env://, or another tcp:// port
    local_world_size: int | None = None  # ranks on this host (threads are shared among them)
    log_level: str = "WARNING"
    watch_parent: bool = False  # exit when the launching process is gone (no orphans)


def setup_process(config: EngineConfig, opts: RankOptions) -> None:
    """Logging, torch threads and uvloop for a rank process."""
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # tensorpipe's EOF chatter at shutdown
    logging.basicConfig(level=str(opts.log_level).upper(),
                        format=f"[rank{opts.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.torch_device().type == "cpu":
        torch.set_num_threads(config.rank_threads(opts.local_world_size or opts.world_size))


def run_rank(config: EngineConfig, opts: RankOptions, front_end: FrontEnd | None = None) -> int:
    setup_process(config, opts)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    return asyncio.run(_main(config, opts, front_end))


async def _main(config: EngineConfig, opts: RankOptions, front_end: FrontEnd | None) -> int:
    from infinite.cluster.endpoint import RankEndpoint
    from infinite.cluster.frontdoor import ClusterEngine
    from infinite.cluster.instance import Instance
    from infinite.cluster.p2p import P2PTransport
    from infinite.cluster.rpc_transport import TorchRpcTransport

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    rank, world = opts.rank, opts.world_size
    ready: asyncio.Future = loop.create_future()
    # The front-end starts at once (an HTTP socket answers 503 until the cluster is up).
    front_task = asyncio.ensure_future(front_end(ready, stop)) if front_end is not None and rank == 0 else None
    if config.data_plane == "p2p" and world > 1:
        transport = P2PTransport(rank, world, opts.init_method, opts.data_init_method, config.torch_device())
    else:
        transport = TorchRpcTransport(rank, world, opts.init_method)
    try:
        # Load the model (off the loop) before any peer can call us.
        instance = await loop.run_in_executor(None, Instance, config, rank, world, transport)
        front = ClusterEngine(instance, transport) if rank == 0 else None
        if front is not None:
            front.bind(loop, stop)
        await loop.run_in_executor(None, transport.start, RankEndpoint(instance, front))
        if front is not None and world > 1:
            rtt = await loop.run_in_executor(None, front.gmanager.calibrate_transport)
            log.info("transport round trip %.0f us", rtt * 1e6)
    except BaseException as e:
        if front_task is not None:
            ready.set_exception(e)
            await asyncio.gather(front_task, return_exceptions=True)
        raise
    if not ready.done():
        ready.set_result(front)

    def on_signal() -> None:
        if front is not None:
            front.request_stop()
        else:
            try:
                transport.cluster_stop()
            except Exception:  # noqa: BLE001
                pass
            instance.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    main_task = asyncio.ensure_future(instance.run())
    tasks = [main_task, asyncio.ensure_future(heartbeat_loop(instance, transport))]
    if front is not None:
        tasks.append(asyncio.ensure_future(front.gmanager.run(lambda: instance.stopping)))
    if opts.watch_parent:
        tasks.append(asyncio.ensure_future(_watch_parent(on_signal)))
    code = 0
    try:
        if front_task is not None:
            code = await front_task
        elif front is not None:  # rank 0 without a front-end: run until told to stop
            await stop.wait()
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
            transport.close()
        except Exception:  # noqa: BLE001
            log.debug("transport close", exc_info=True)
        instance.close()
    return code


async def heartbeat_loop(instance, transport) -> None:
    loop = asyncio.get_running_loop()
    lost_since = None
    while not instance.stopping:
        try:
            reply = await asyncio.wait_for(to_asyncio(transport.heartbeat(instance.heartbeat()), loop), timeout=5.0)
            instance.on_heartbeat_reply(reply)
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

