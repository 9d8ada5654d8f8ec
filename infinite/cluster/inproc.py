"""A whole cluster in one process: N Instances, rank 0's gManager and front door, wired by the
in-process transport and run on the calling event loop.

Why: the gManager, the front door, borrowing, migration and failure handling can then be
driven (and broken: ``hub.kill(rank)``) by unit tests in well under a second per step,
without spawning processes or opening ports. The code paths are the runtime's own; only
the transport differs (TorchRpcTransport between processes).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from infinite.cluster.endpoint import RankEndpoint
from infinite.cluster.frontdoor import ClusterEngine
from infinite.cluster.instance import Instance
from infinite.cluster.rank import heartbeat_loop
from infinite.cluster.transport import InProcessHub
from infinite.runtime.config import EngineConfig


class InProcessCluster:
    def __init__(self, config: EngineConfig, world_size: int, timeout_s: float = 30.0) -> None:
        self.config = replace(config, num_instances=world_size)
        self.hub = InProcessHub(world_size)
        self.instances = [Instance(self.config, r, world_size, self.hub.transport(r), timeout_s)
                          for r in range(world_size)]
        self.front = ClusterEngine(self.instances[0], self.hub.transport(0))
        for r, inst in enumerate(self.instances):
            inst.transport.start(RankEndpoint(inst, self.front if r == 0 else None))
        self._tasks: list[asyncio.Task] = []

    @property
    def gmanager(self):
        return self.front.gmanager

    async def start(self, heartbeats: bool = True, placement: bool = False) -> InProcessCluster:
        """Run every instance's step loop (and heartbeats, and the placement loop) on this loop."""
        self.front.bind(asyncio.get_running_loop())
        for inst in self.instances:
            self._tasks.append(asyncio.ensure_future(inst.run()))
            if heartbeats:
                self._tasks.append(asyncio.ensure_future(heartbeat_loop(inst, inst.transport)))
        if placement:
            self._tasks.append(asyncio.ensure_future(self.gmanager.run(lambda: self.instances[0].stopping)))
        return self

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

    async def __aenter__(self) -> InProcessCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
