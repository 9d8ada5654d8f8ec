"""A cluster of real Instances in this process, over the in-process transport.

Each rank is what infinite/cluster/rank.py runs — an Instance with its step loop
and heartbeats, rank 0 with the gManager, the supervisor and the front door —
but the ranks are objects on one event loop and their calls go through an
InProcessHub. ``kill(rank)`` is a death: the hub fails every call to or from
it and its loops stop. Tests of detection, recovery, leaving and joining run
here in seconds, with no process to spawn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from infinite.cluster import messages as M
from infinite.cluster.endpoint import RankEndpoint
from infinite.cluster.frontdoor import ClusterEngine
from infinite.cluster.instance import Instance
from infinite.cluster.rank import _heartbeats
from infinite.cluster.transport import InProcessHub, to_asyncio
from infinite.runtime.config import EngineConfig


@dataclass
class Rank:
    instance: Instance
    tasks: list[asyncio.Task] = field(default_factory=list)
    dead: bool = False


class InProcessCluster:
    def __init__(self, config: EngineConfig, n: int) -> None:
        self.config = config
        self.n = n
        self.hub = InProcessHub(n, workers=16)
        self.ranks: dict[int, Rank] = {}
        self.front: ClusterEngine | None = None

    async def start(self) -> InProcessCluster:
        loop = asyncio.get_running_loop()
        for r in range(self.n):
            inst = await loop.run_in_executor(None, Instance, self.config, r, self.n, self.hub.transport(r), 10.0)
            self.ranks[r] = Rank(inst)
        r0 = self.ranks[0].instance
        self.front = ClusterEngine(r0, r0.transport)
        self.front.bind(loop)
        for r, rk in self.ranks.items():
            rk.instance.transport.start(RankEndpoint(rk.instance, self.front if r == 0 else None))
        r0.apply_view(self.front.supervisor.on_join(M.Join(0, r0.stats())))
        for r in range(1, self.n):
            await self._join(r)
        await self.front.supervisor.wait_for_initial(30)
        for r in self.ranks:
            self._run(r)
        return self

    async def _join(self, r: int) -> None:
        inst = self.ranks[r].instance
        view = await to_asyncio(inst.transport.join(M.Join(r, inst.stats()), timeout=10), asyncio.get_running_loop())
        inst.apply_view(view)

    def _run(self, r: int) -> None:
        rk = self.ranks[r]
        inst = rk.instance
        rk.tasks = [asyncio.ensure_future(inst.run()), asyncio.ensure_future(_heartbeats(inst, inst.transport))]
        if r == 0:
            rk.tasks += [asyncio.ensure_future(self.front.gmanager.run(lambda: inst.stopping)),
                         asyncio.ensure_future(self.front.supervisor.monitor(lambda: inst.stopping))]

    async def add_rank(self) -> int:
        """A new instance joins the running cluster."""
        r = max(self.ranks) + 1
        loop = asyncio.get_running_loop()
        inst = await loop.run_in_executor(None, Instance, self.config, r, 2, self.hub.transport(r), 10.0)
        self.ranks[r] = Rank(inst)
        inst.transport.start(RankEndpoint(inst, None))
        await self._join(r)
        self._run(r)
        return r

    def kill(self, r: int) -> None:
        """Rank ``r`` dies: unreachable at once, its loops stop, nothing is cleaned up."""
        rk = self.ranks[r]
        rk.dead = True
        self.hub.kill(r)
        rk.instance.stopping = True
        for t in rk.tasks:
            t.cancel()

    def instance(self, r: int) -> Instance:
        return self.ranks[r].instance

    async def stop(self) -> None:
        for rk in self.ranks.values():
            rk.instance.request_stop()
        for rk in self.ranks.values():
            for t in rk.tasks:
                t.cancel()
            await asyncio.gather(*rk.tasks, return_exceptions=True)
            rk.instance.close()
        self.hub.close()

    def assert_no_block_held(self) -> None:
        """On every live rank: the free list is the whole pool, no table, nothing lent (walked)."""
        for r, rk in self.ranks.items():
            if rk.dead or rk.instance.stopping:
                continue
            rm = rk.instance.rm
            assert rm.walk() == {"table_blocks": 0, "lent_entries": 0}, (r, rm.tables, rm.lent)
            assert rm.pool.num_free == rm.num_blocks, (r, rm.pool.num_free)
            assert rm.num_borrowed == 0 and rm.num_lent == 0, r


@contextlib.asynccontextmanager
async def running(config: EngineConfig, n: int) -> AsyncIterator[InProcessCluster]:
    """A started cluster of ``n`` ranks, always stopped on the way out."""
    cl = await InProcessCluster(config, n).start()
    try:
        yield cl
    finally:
        await cl.stop()
