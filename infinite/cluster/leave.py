"""A rank leaving a running cluster gracefully (SIGTERM to it, or the admin endpoint).

It tells rank 0 it is draining: from then on it is out of routing and
lending, rank 0 moves every request it was home to onto the others (each goes
on from the tokens it has, recomputed there), and the debtors holding blocks
it lent recompute those requests and give the blocks back. Once it holds
nothing — no request, no block lent, walked in its tables — it says it has
left and exits 0. A drain that cannot finish in time exits non-zero and says
what was still held; rank 0 then treats what is left as lost.
"""

from __future__ import annotations

import asyncio
import logging
import time

from infinite.cluster import messages as M
from infinite.cluster.instance import Instance
from infinite.cluster.transport import Transport, to_asyncio

log = logging.getLogger(__name__)

LEAVE_S = 25.0  # torchrun's agent waits 30 s for a signalled worker before it kills it
CALL_S = 10.0


def drained(stats: M.InstanceStats) -> bool:
    """Nothing held: no request queued or running, no block in a table, none lent."""
    return (stats.num_running == 0 and stats.num_waiting == 0 and stats.table_blocks == 0
            and stats.lent_entries == 0 and stats.lent_blocks == 0)


async def leave(instance: Instance, transport: Transport, reason: str, timeout_s: float = LEAVE_S) -> int:
    """Drain this rank out of the cluster; returns the exit code (0 once it held nothing)."""
    loop = asyncio.get_running_loop()
    rank = instance.rank
    instance.draining = True
    log.warning("rank %d: leaving the cluster (%s): draining", rank, reason)
    t0 = time.monotonic()
    try:
        await to_asyncio(transport.leaving(M.Leaving(rank, reason), timeout=CALL_S), loop)
    except Exception as e:  # noqa: BLE001
        log.error("rank %d: rank 0 did not take the leave (%s): stopping", rank, e)
        return 1
    code = 0
    while not drained(stats := instance.stats()):
        if instance.stopping:
            return instance.exit_code or 1
        if time.monotonic() - t0 > timeout_s:
            log.error("rank %d: not drained after %.0f s (%d running, %d waiting, %d blocks in tables, %d lent): "
                      "leaving anyway", rank, timeout_s, stats.num_running, stats.num_waiting, stats.table_blocks,
                      stats.lent_entries)
            code = 1
            break
        await asyncio.sleep(0.05)
    try:
        await to_asyncio(transport.left(M.Left(rank), timeout=CALL_S), loop)
    except Exception as e:  # noqa: BLE001
        log.error("rank %d: telling rank 0 we left failed: %s", rank, e)
        code = 1
    log.warning("rank %d: left the cluster after %.1f s", rank, time.monotonic() - t0)
    return code
