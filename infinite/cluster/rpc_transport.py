"""TorchRpcTransport: the Transport over torch.distributed RPC (TensorPipe).

Messages travel msgpack-encoded, tensors beside them as RPC arguments (so
TensorPipe moves them without pickling); tensors leave as contiguous CPU
copies (a view would ship its whole storage) and each receiver moves them to
its own device. Works under torchrun (``env://``) and with an explicit
``tcp://`` address (LocalCluster, ``infinite serve --num-instances``).

The group is dynamic (``init_rpc(world_size=None)``): ranks can join a running
cluster and gone ranks are evicted (infinite/cluster/rpc_membership.py). Every
call has a timeout (``timeout_s`` unless the call names one), so a peer that
stalls ends in an error, never a hang.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import ClassVar

import torch
import torch.distributed.rpc as rpc

from infinite.cluster import messages as M
from infinite.cluster import rpc_membership
from infinite.cluster.rpc_membership import worker_name
from infinite.cluster.transport import Endpoint, Future, Tensors, Transport, chain, failed_reply


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TorchRpcTransport(Transport):
    # torch RPC calls a function by its importable name, so the one entry point (_deliver)
    # finds this process's endpoint here; RPC allows one agent per process, hence one slot.
    _serving: ClassVar[Endpoint | None] = None

    def __init__(self, rank: int, world_size: int, init_method: str = "env://", timeout_s: float = 30.0,
                 num_worker_threads: int = 32) -> None:
        self.rank = rank
        self.world_size = world_size
        self.init_method = init_method
        self.timeout_s = timeout_s
        self.num_worker_threads = num_worker_threads
        self._started = False

    def start(self, endpoint: Endpoint) -> None:
        TorchRpcTransport._serving = endpoint
        opts = rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=self.num_worker_threads,
            rpc_timeout=self.timeout_s,
            init_method=self.init_method,
            _transports=["uv"],  # loopback and TCP alike; shm needs a shared /dev/shm setup
        )
        rpc.init_rpc(worker_name(self.rank), rank=self.rank, world_size=None, rpc_backend_options=opts)
        self._started = True

    def request(self, dst: int, msg: M.Msg, tensors: Tensors = None, timeout: float | None = None) -> Future:
        try:
            fut = rpc.rpc_async(worker_name(dst), _deliver, args=(self.rank, M.encode(msg), _cpu(tensors)),
                                timeout=timeout if timeout is not None and timeout > 0 else rpc.constants.UNSET_RPC_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - e.g. a rank evicted from the group: the error is the future's
            failed: Future = torch.futures.Future()
            failed.set_exception(ConnectionError(f"rank {dst} is unreachable: {e}"))
            return failed
        return fut.then(_decode_reply)

    def evict(self, rank: int) -> None:
        if self._started:
            rpc_membership.evict(rank)

    def close(self) -> None:
        if self._started:
            self._started = False
            rpc.shutdown(graceful=False)
        TorchRpcTransport._serving = None


def _cpu(tensors: Tensors) -> Tensors:
    if tensors is None:
        return None
    return dataclasses.replace(tensors, **{
        f.name: getattr(tensors, f.name).detach().cpu().contiguous()
        for f in dataclasses.fields(tensors) if getattr(tensors, f.name) is not None
    })


def _decode_reply(fut: Future):
    data, tensors = fut.value()
    return M.decode(data), tensors


@rpc.functions.async_execution
def _deliver(src: int, data: bytes, tensors: Tensors) -> Future:
    out: Future = torch.futures.Future()
    endpoint = TorchRpcTransport._serving
    try:
        if endpoint is None:
            raise RuntimeError("this rank serves no endpoint yet")
        chain(endpoint.handle(src, M.decode(data), tensors), out)
    except BaseException as e:  # noqa: BLE001 - answered as Failed
        chain(failed_reply(e), out)
    return out.then(lambda f: (M.encode(f.value()[0]), _cpu(f.value()[1])))
