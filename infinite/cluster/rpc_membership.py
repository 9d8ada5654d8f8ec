"""Membership on torch RPC's dynamic groups: how a rank joins a running cluster, and how a
dead rank is taken out so that the next one can.

Every rank starts RPC with ``world_size=None`` (torch.distributed.rpc's dynamic
group): a new process can then ``init_rpc`` into the running cluster, and
TensorPipe tells every member about it. Torch handles a member that *leaves*
(``rpc.shutdown(graceful=True)``), not one that *dies*: a dead member stays in
the group's list in the store, and the next ``init_rpc`` fails trying to reach
it. So rank 0 evicts a dead (or departed) rank the way torch's own leave does —
under torch's group-membership token, it removes the rank from the store's
worker list — and every member drops it from its agent.

A joiner needs three things from the running cluster, which rank 0 publishes
in the same store (``infinite/`` keys): the engine config (every rank runs the
same model and pool size), a fresh rank id (an atomic counter; ids are never
reused, so a rank declared dead can never be confused with its successor), and
the list of current members (the joiner waits until no dead rank is still
listed, so its own ``init_rpc`` does not try to reach one).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from urllib.parse import urlparse

import msgspec
import torch.distributed as dist
import torch.distributed.rpc as rpc

from infinite.runtime.config import EngineConfig

log = logging.getLogger(__name__)

RPC_PREFIX = "rpc_prefix_0"  # init_rpc's PrefixStore in a process's first (and only) RPC start
TOKEN_KEY = "RpcGroupManagementToken"  # torch.distributed.rpc._utils._group_membership_management
WORKERS_KEY = "_ALL_WORKER_INFOS"  # the dynamic group's "name-id," list (torch agent_utils.cpp)
CONFIG_KEY = "config"
NEXT_RANK_KEY = "next_rank"
MEMBERS_KEY = "members"


def worker_name(rank: int) -> str:
    """A rank's name in the RPC group."""
    return f"rank{rank}"


def _agent():
    return rpc.api._get_current_rpc_agent()


def _ours(store: dist.Store) -> dist.PrefixStore:
    return dist.PrefixStore("infinite", store)


def _raw_store() -> dist.Store:
    """The store under this process's RPC agent (whatever prefixes torch added)."""
    store = _agent().store
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return store


# --------------------------------------------------------------------------- rank 0


def publish(config: EngineConfig, world_size: int) -> None:
    """Rank 0, once RPC is up: what joiners read (config, the next free rank id)."""
    ours = _ours(_raw_store())
    ours.set(NEXT_RANK_KEY, str(world_size))
    ours.set(CONFIG_KEY, msgspec.msgpack.encode(config))


def publish_members(members: list[int]) -> None:
    _ours(_raw_store()).set(MEMBERS_KEY, ",".join(str(r) for r in members))


def evict(rank: int) -> None:
    """Rank 0: remove a gone rank from the dynamic group's worker list, under torch's token."""
    from torch.distributed.rpc._utils import _group_membership_management

    store = _agent().store  # the RPC PrefixStore
    name = worker_name(rank)
    with _group_membership_management(store, f"infinite-evict-{name}", False):
        names = dist.PrefixStore("names", store)
        if names.check([WORKERS_KEY]):
            listed = names.get(WORKERS_KEY).decode()
            entry = f"{name}-{rank},"
            if entry in listed:
                names.set(WORKERS_KEY, listed.replace(entry, ""))


# --------------------------------------------------------------------------- a joining rank


class JoinTicket(msgspec.Struct):
    rank: int
    config: EngineConfig
    init_method: str


def store_address(rdzv: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``tcp://HOST:PORT`` of the cluster's store (rank 0's, or torchrun's
    MASTER_ADDR:MASTER_PORT)."""
    url = urlparse(rdzv if "://" in rdzv else f"tcp://{rdzv}")
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"expected HOST:PORT or tcp://HOST:PORT of the cluster's store, got {rdzv!r}")
    return url.hostname, url.port


def claim(rdzv: str, timeout_s: float = 60.0) -> JoinTicket:
    """Connect to the running cluster's store, read its config and take a fresh rank id."""
    host, port = store_address(rdzv)
    store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    ours = _ours(store)
    ours.wait([CONFIG_KEY, NEXT_RANK_KEY], timedelta(seconds=timeout_s))
    config = msgspec.msgpack.decode(ours.get(CONFIG_KEY), type=EngineConfig)
    rank = ours.add(NEXT_RANK_KEY, 1) - 1
    wait_until_clean(store, timeout_s)
    return JoinTicket(rank, config, f"tcp://{host}:{port}")


def wait_until_clean(store: dist.Store, timeout_s: float) -> None:
    """Wait until every rank in the RPC group's list is a member rank 0 vouches for: a dead rank
    still listed would make our init_rpc fail reaching it (rank 0 evicts it within the detection
    bound)."""
    names = dist.PrefixStore("names", dist.PrefixStore(RPC_PREFIX, store))
    ours = _ours(store)
    deadline = time.monotonic() + timeout_s
    while True:
        listed = names.get(WORKERS_KEY).decode() if names.check([WORKERS_KEY]) else ""
        listed_ranks = {int(e.rsplit("-", 1)[1]) for e in listed.split(",") if e}
        members = ours.get(MEMBERS_KEY).decode() if ours.check([MEMBERS_KEY]) else ""
        member_ranks = {int(r) for r in members.split(",") if r}
        stale = listed_ranks - member_ranks
        if not stale:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {sorted(stale)} are still listed in the RPC group but are not members")
        time.sleep(0.2)


def undo_failed_join(rdzv_store: tuple[str, int], rank: int) -> None:
    """torch leaves its group token held and our name listed when a join fails midway; give both
    back so the next join (or leave) is not blocked behind us."""
    host, port = rdzv_store
    store = dist.PrefixStore(RPC_PREFIX, dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=10)))
    name = worker_name(rank)
    store.compare_set(TOKEN_KEY, f"Token_for_{name}_join", "")
    names = dist.PrefixStore("names", store)
    if names.check([WORKERS_KEY]):
        listed = names.get(WORKERS_KEY).decode()
        names.set(WORKERS_KEY, listed.replace(f"{name}-{rank},", ""))
