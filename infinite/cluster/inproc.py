"""A whole cluster in one process: N Instances, rank 0's gManager and front door, wired by the
in-process transport and run on the calling event loop.

Why: the gManager, the front door, borrowing, migration and failure handling can then be
driven (and broken: ``kill(rank)``) by unit tests in well under a second per step,
without spawning processes or opening ports. The code paths are the runtime's own; only
the transport differs (TorchRpcTransport between processes). Every rank joins through the
supervisor as a process does; ``add_rank`` joins a new one into the running cluster.
"""

from __future__ import annotations

import asyncio
import gc
from dataclasses import replace

from infinite.cluster import messages as M
from infinite.cluster.endpoint import RankEndpoint
from infinite.cluster.frontdoor import ClusterEngine
from infinite.cluster.instance import Instance
from infinite.cluster.rank import heartbeat_loop, settle_heap
from infinite.cluster.transport import InProcessHub, to_asyncio
from infinite.runtime.config import EngineConfig


class InProcessCluster:
    def __init__(self, config: EngineConfig, world_size: int, timeout_s: float = 30.0) -> None:
        self.config = replace(config, num_instances=world_size)
        self.timeout_s = timeout_s
        self.hub = InProcessHub(world_size, workers=16)
        self.instances = [Instance(self.config, r, world_size, self.hub.transport(r), timeout_s)
                          for r in range(world_size)]
        self.front = ClusterEngine(self.instances[0], self.hub.transport(0))
        for r, inst in enumerate(self.instances):
            inst.transport.start(RankEndpoint(inst, self.front if r == 0 else None))
        for inst in self.instances:  # each rank announces itself, as rank.py's do
            inst.apply_view(self.front.supervisor.on_join(M.Join(inst.rank, inst.stats())))
        self._tasks: list[asyncio.Task] = []
        self._heartbeats = False
        self._frozen = False

    @property
    def gmanager(self):
        return self.front.gmanager

    async def start(self, heartbeats: bool = True, placement: bool = False) -> InProcessCluster:
        """Run every instance's step loop (and heartbeats, and the placement loop) on this loop. As a
        rank does once started, the heap alive now leaves the collector's sight until stop()."""
        settle_heap()
        self._frozen = True
        self.front.bind(asyncio.get_running_loop())
        self._heartbeats = heartbeats
        for inst in self.instances:
            self._run(inst)
        if placement:
            self._tasks.append(asyncio.ensure_future(self.gmanager.run(lambda: self.instances[0].stopping)))
        if heartbeats:  # silence is only a sign of death when ranks beat
            self._tasks.append(asyncio.ensure_future(self.front.supervisor.monitor(lambda: self.instances[0].stopping)))
        return self

    def _run(self, inst: Instance) -> None:
        self._tasks.append(asyncio.ensure_future(inst.run()))
        if self._heartbeats:
            self._tasks.append(asyncio.ensure_future(heartbeat_loop(inst, inst.transport)))

    def kill(self, rank: int) -> None:
        """Rank ``rank`` dies: every call to or from it fails from now on, and its loops stop."""
        self.hub.kill(rank)
        self.instances[rank].stopping = True

    async def add_rank(self) -> int:
        """A new instance joins the running cluster (as ``infinite join`` does) and starts serving."""
        loop = asyncio.get_running_loop()
        r = len(self.instances)
        inst = await loop.run_in_executor(None, Instance, self.config, r, 2, self.hub.transport(r), self.timeout_s)
        self.instances.append(inst)
        inst.transport.start(RankEndpoint(inst, None))
        inst.apply_view(await to_asyncio(inst.transport.join(M.Join(r, inst.stats()), timeout=10.0), loop))
        self._run(inst)
        return r

    def beat(self) -> None:
        """Deliver one heartbeat of every instance to the gManager now (tests that step by hand)."""
        for inst in self.instances:
            inst.on_heartbeat_reply(self.gmanager.on_heartbeat(inst.heartbeat()))

    async def stop(self) -> None:
        await self.front.shutdown()
        for inst in self.instances:
            inst.request_stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for inst in self.instances:
            inst.close()
        self.hub.close()
        if self._frozen:
            gc.unfreeze()
            self._frozen = False

    async def __aenter__(self) -> InProcessCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
