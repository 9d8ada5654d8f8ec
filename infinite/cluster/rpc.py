"""torch.distributed.rpc glue: start-up, the handlers other ranks call, and
bridging torch futures into asyncio.

Handlers are module-level functions (RPC pickles them by name); each forwards
to the Instance or GManager object that this process registered. They run on
TensorPipe's worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import torch
import torch.distributed.rpc as rpc

_instance: Any = None  # infinite.cluster.instance.Instance of this process
_front: Any = None  # infinite.cluster.frontdoor.ClusterEngine (rank 0 only)


def worker_name(rank: int) -> str:
    return f"rank{rank}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float = 120.0) -> None:
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=32,
        rpc_timeout=timeout_s,
        init_method=f"tcp://{master_addr}:{master_port}",
        _transports=["uv"],  # loopback and TCP alike; shm needs a shared /dev/shm setup
    )
    rpc.init_rpc(worker_name(rank), rank=rank, world_size=world_size, rpc_backend_options=opts)


def init_env(rank: int, world_size: int, timeout_s: float = 120.0) -> None:
    """Under torchrun: the env:// rendezvous (MASTER_ADDR/MASTER_PORT, torchrun's store)."""
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=32, rpc_timeout=timeout_s, init_method="env://",
                                           _transports=["uv"])
    rpc.init_rpc(worker_name(rank), rank=rank, world_size=world_size, rpc_backend_options=opts)


def shutdown() -> None:
    rpc.shutdown(graceful=False)


def register(instance: Any = None, front: Any = None) -> None:
    global _instance, _front
    if instance is not None:
        _instance = instance
    if front is not None:
        _front = front


def call_async(rank: int, fn, *args: Any) -> torch.futures.Future:
    return rpc.rpc_async(worker_name(rank), fn, args=args)


def call_sync(rank: int, fn, *args: Any, timeout: float = -1) -> Any:
    return rpc.rpc_sync(worker_name(rank), fn, args=args, timeout=timeout if timeout > 0 else rpc.constants.UNSET_RPC_TIMEOUT)


def to_asyncio(fut: torch.futures.Future, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """Complete an asyncio future from the torch future's done-callback (thread-safe)."""
    af = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if af.done():
            return
        if error is not None:
            af.set_exception(error)
        else:
            af.set_result(value)

    def done(f: torch.futures.Future) -> None:
        try:
            value, error = f.value(), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            value, error = None, e
        loop.call_soon_threadsafe(settle, value, error)

    fut.add_done_callback(done)
    return af


# ---- handlers on any instance --------------------------------------------------------
@rpc.functions.async_execution
def h_remote_attention(debtor: int, layer: int, payload: tuple) -> torch.futures.Future:
    return _instance.serve_micro_attention_async(debtor, layer, payload)


def h_reserve(debtor: int, request_id: str, n: int) -> list[int]:
    return _instance.reserve_for(debtor, request_id, n)


def h_release(debtor: int, request_id: str, blocks: list[int] | None) -> int:
    return _instance.release_for(debtor, request_id, blocks)


def h_write_blocks(blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    _instance.write_blocks(blocks, k, v)


def h_add_request(spec: tuple) -> None:
    _instance.enqueue_add(spec)


def h_abort(request_id: str) -> None:
    _instance.enqueue_abort(request_id)


def h_move(request_id: str, num_blocks: int, dst: int) -> None:
    _instance.enqueue_move(request_id, num_blocks, dst)


def h_ping() -> None:
    return None


def h_stats() -> dict:
    return _instance.stats()


def h_stop() -> None:
    _instance.request_stop()


# ---- handlers on rank 0 (gManager and front door) -----------------------------------
def h_outputs(rank: int, outs: list) -> None:
    _front.on_outputs(rank, outs)


def h_heartbeat(beat: dict) -> dict:
    return _front.gmanager.on_heartbeat(beat)


def h_borrow(debtor: int, request_id: str, n: int) -> list[tuple[int, int]]:
    return _front.gmanager.borrow(debtor, request_id, n)


def h_cluster_stop() -> None:
    _front.request_stop()
