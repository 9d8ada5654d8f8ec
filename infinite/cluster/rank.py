"""The main of one rank process: its transport, its instance, heartbeats, and on rank 0 the
gManager with the front door, plus whatever front-end the launcher hands in (the HTTP
server, LocalCluster's driver bridge, or none).

The same function runs under torchrun (``env://`` rendezvous), in the ranks that
LocalCluster or ``infinite serve --num-instances N`` start, and in-process in tests.
It imports no front-end: the launch layer composes (infinite/launch, infinite/cli).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import torch

from infinite.cluster import messages as M
from infinite.cluster.membership import HEARTBEAT_S, RANK0_LOST_S, short_error
from infinite.cluster.transport import to_asyncio
from infinite.runtime.config import EngineConfig

log = logging.getLogger(__name__)


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
    joining: bool = False  # joins a running cluster (infinite join) rather than starting with it
    start_timeout_s: float = 600.0  # rank 0 waits this long for the initial ranks (they load the model)
    tp_rank: int = 0  # place in the instance's tensor-parallel group (0: its first rank, which runs the instance)
    local_rank: int | None = None  # rank process index on this host (its GPU); None: rank * tp + tp_rank


def setup_process(config: EngineConfig, opts: RankOptions) -> None:
    """Logging, torch threads and uvloop for a rank process."""
    warnings.filterwarnings("ignore", message=".*ProcessGroupGloo.*")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # tensorpipe's EOF chatter at shutdown
    logging.basicConfig(level=str(opts.log_level).upper(),
                        format=f"[rank{opts.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    device = config.torch_device()
    if device.type == "cpu":
        torch.set_num_threads(config.rank_threads(opts.local_world_size or opts.world_size))
    elif device.index is not None:
        torch.cuda.set_device(device)  # NCCL's communicators and every default allocation on this rank's GPU


def placed(config: EngineConfig, opts: RankOptions) -> EngineConfig:
    """The config with this rank process's own device (cluster/devices.py)."""
    from infinite.cluster.devices import host_gpus, rank_device

    tp = config.tensor_parallel_size
    local = opts.local_rank if opts.local_rank is not None else opts.rank * tp + opts.tp_rank
    local_ranks = opts.local_world_size or opts.world_size * tp
    return replace(config, device=rank_device(config.device, local, local_ranks, host_gpus()))


def settle_heap() -> None:
    """Take what is alive after start-up — torch, the model, the imports: hundreds of thousands of
    objects that live as long as the rank — out of the cyclic garbage collector's sight
    (``gc.freeze``). A full collection otherwise walks them all with the GIL held, pausing the
    event loop for hundreds of milliseconds; on rank 0 the gManager's planner, which allocates a
    working copy of the placement map each round, triggers one every second or so at 64 instances
    and 10K requests, and /health's p99 went past 50 ms (tests/test_gmanager_scale.py)."""
    gc.collect()
    gc.freeze()


def run_rank(config: EngineConfig, opts: RankOptions, front_end: FrontEnd | None = None) -> int:
    here = placed(config, opts)
    setup_process(here, opts)
    if opts.tp_rank > 0:  # a rank of a tensor-parallel group other than its first: no RPC, no event loop
        from infinite.cluster.tp_rank import run_follower

        return run_follower(here, opts.rank, opts.world_size, opts.tp_rank, opts.data_init_method, opts.watch_parent)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        pass
    return asyncio.run(_main(here, opts, front_end, published=config))


async def _main(config: EngineConfig, opts: RankOptions, front_end: FrontEnd | None,
                published: EngineConfig | None = None) -> int:
    """``published``: the config joiners read (devices unplaced); ``config`` is this process's."""
    from infinite.cluster import rpc_membership
    from infinite.cluster.endpoint import RankEndpoint
    from infinite.cluster.frontdoor import ClusterEngine
    from infinite.cluster.instance import Instance
    from infinite.cluster.leave import leave
    from infinite.cluster.p2p import P2PTransport
    from infinite.cluster.rpc_transport import TorchRpcTransport

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    rank, world = opts.rank, opts.world_size
    ready: asyncio.Future = loop.create_future()
    # The front-end starts at once (an HTTP socket answers 503 until the cluster is up).
    front_task = asyncio.ensure_future(front_end(ready, stop)) if front_end is not None and rank == 0 else None
    # The point-to-point group is fixed at start-up; a rank that joins later uses RPC for its data.
    tp = config.tensor_parallel_size
    if config.data_plane == "p2p" and (world > 1 or tp > 1) and not opts.joining:
        transport = P2PTransport(rank, world, opts.init_method, opts.data_init_method, config.torch_device(),
                                 tp_size=tp)
    else:
        transport = TorchRpcTransport(rank, world, opts.init_method)
    try:
        tp_leader = None
        if tp > 1:  # the group's channels exist before the model loads (pool sizing is collective)
            from infinite.cluster.tp_rank import open_leader

            tp_leader = await loop.run_in_executor(None, open_leader, transport, config, opts.joining)
        # Load the model (off the loop) before any peer can call us.
        instance = await loop.run_in_executor(None, functools.partial(
            Instance, config, rank, max(world, 2 if opts.joining else 1), transport, tp=tp_leader))
        front = ClusterEngine(instance, transport) if rank == 0 else None
        if front is not None:
            front.bind(loop, stop)
        await loop.run_in_executor(None, transport.start, RankEndpoint(instance, front))
        if front is not None:
            rpc_membership.publish(published or config, world)
            front.supervisor.on_members = rpc_membership.publish_members
            instance.apply_view(front.supervisor.on_join(M.Join(rank, instance.stats())))
            await front.supervisor.wait_for_initial(opts.start_timeout_s)
            if world > 1:
                rtt = await loop.run_in_executor(None, front.gmanager.calibrate_transport)
                log.info("transport round trip %.0f us", rtt * 1e6)
        else:
            instance.apply_view(await _join(instance, transport, opts.start_timeout_s))
    except BaseException as e:
        if front_task is not None:
            ready.set_exception(e)
            await asyncio.gather(front_task, return_exceptions=True)
        if opts.joining:
            _undo_join(opts, e)
        raise
    settle_heap()
    if not ready.done():
        ready.set_result(front)
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if front is not None:
            front.request_stop()
        elif signals == 1:
            instance.request_leave("a stop signal")  # a worker leaves gracefully: its work moves
        else:
            log.error("rank %d: a second stop signal: stopping without draining", rank)
            instance.exit_code = 1
            instance.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)

    main_task = asyncio.ensure_future(instance.run())
    tasks = [main_task, asyncio.ensure_future(heartbeat_loop(instance, transport))]
    if front is not None:
        tasks.append(asyncio.ensure_future(front.gmanager.run(lambda: instance.stopping)))
        tasks.append(asyncio.ensure_future(front.supervisor.monitor(lambda: instance.stopping)))
    if opts.watch_parent:
        tasks.append(asyncio.ensure_future(_watch_parent(on_signal)))
    code = 0
    try:
        if front_task is not None:
            code = await front_task
        elif front is not None:  # rank 0 without a front-end: run until told to stop
            await stop.wait()
        else:
            leaving: asyncio.Task | None = None
            while not instance.stopping:
                if instance.leave_reason is not None and leaving is None:
                    leaving = asyncio.ensure_future(leave(instance, transport, instance.leave_reason))
                if leaving is not None and leaving.done():
                    code = leaving.result()
                    break
                await asyncio.sleep(0.05)
            code = code or instance.exit_code
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
    if front is not None:
        lost = front.supervisor.membership.lost
        if lost and code == 0:
            # Non-zero so that a launcher (torchrun) does not wait on peers that are gone.
            log.error("stopping a cluster that lost rank(s) %s: exit status 1", [d.rank for d in lost])
            code = 1
    return code


def _undo_join(opts: RankOptions, err: BaseException) -> None:
    """A join that failed midway must not leave torch's group token held (it would block every
    later join and leave)."""
    from infinite.cluster import rpc_membership

    log.error("rank %d could not join the cluster: %s", opts.rank, err)
    try:
        rpc_membership.undo_failed_join(rpc_membership.store_address(opts.init_method), opts.rank)
    except Exception:  # noqa: BLE001
        log.warning("cleaning up after the failed join", exc_info=True)


async def _join(instance, transport, timeout_s: float):
    """Announce this rank to rank 0 (retrying while rank 0 starts); -> the cluster view."""
    from infinite.cluster.transport import PeerError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await to_asyncio(transport.join(M.Join(instance.rank, instance.stats()), timeout=10.0), loop)
        except PeerError as e:
            if "cannot rejoin" in str(e):
                raise RuntimeError(f"rank 0 refused rank {instance.rank}: {e}") from None
            err = e
        except Exception as e:  # noqa: BLE001 - rank 0 not serving yet
            err = e
        if loop.time() > deadline:
            raise RuntimeError(f"rank {instance.rank} could not join through rank 0 in {timeout_s:.0f} s: {err}")
        await asyncio.sleep(0.3)


async def heartbeat_loop(instance, transport) -> None:
    loop = asyncio.get_running_loop()
    lost_since = None
    while not instance.stopping:
        try:
            reply = await asyncio.wait_for(to_asyncio(transport.heartbeat(instance.heartbeat(), timeout=RANK0_LOST_S),
                                                      loop), timeout=RANK0_LOST_S)
            instance.on_heartbeat_reply(reply)
            lost_since = None
        except Exception as e:  # noqa: BLE001 - the next beat resends the whole placement
            instance.forget_sent_placement()
            lost_since = lost_since or loop.time()
            if instance.rank != 0 and loop.time() - lost_since > RANK0_LOST_S:
                log.error("rank 0 has not answered heartbeats for %.1f s (%s): it is gone; stopping this rank "
                          "(exit status 1)", RANK0_LOST_S, short_error(e))
                instance.exit_code = 1
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

