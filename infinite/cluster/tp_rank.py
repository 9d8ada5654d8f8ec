"""The ranks of a tensor-parallel instance in a cluster: the first one runs the instance (rank.py,
with a TPLeader in its engine), the others run ``run_follower``.

A follower is in the point-to-point process group (cluster/p2p.py) but not in RPC: it serves
remote MicroAttention for the matching ranks of debtor groups (over its heads of the blocks its
first rank lent), and runs what its first rank broadcasts: local steps, steps with remote blocks
(calling the matching ranks of creditor groups), the cost probe, block reads and writes of
migrations. When a collective of its group fails (its first rank, or another rank, is gone) it
exits 1: the group as a whole has failed, and the cluster recomputes the instance's requests
elsewhere (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from infinite.attention import MAMetadata
from infinite.cluster import messages as M
from infinite.cluster.counters import StepCounters
from infinite.cluster.creditor import attend_lent
from infinite.cluster.device_timer import device_timer
from infinite.cluster.lent_rows import LentRows
from infinite.cluster.p2p import P2PTransport
from infinite.cluster.step_runner import StepRunner
from infinite.cluster.tp_commands import follow_probe, follow_remote
from infinite.model.config import ModelConfig
from infinite.model.parallel import GroupError, TPGroup, kv_layout
from infinite.runtime.config import EngineConfig
from infinite.runtime.engine import resolve_model_dir
from infinite.runtime.tp import PROBE, REMOTE, TPLeader

log = logging.getLogger(__name__)


def groups(transport: P2PTransport) -> tuple[TPGroup, TPGroup]:
    """This rank's (step, block) channels; the transport must be open."""
    step, blocks = transport.tp_groups
    return (TPGroup(step, transport.tp_rank, transport.tp_size, transport.device),
            TPGroup(blocks, transport.tp_rank, transport.tp_size, transport.device))


def open_leader(transport: P2PTransport, config: EngineConfig, joining: bool = False) -> TPLeader:
    """A first rank: open the process group (every rank of every group at once), then its group's channels."""
    if joining:
        raise ValueError("an instance with tensor_parallel_size > 1 cannot join a running cluster: its ranks need "
                         "the point-to-point group fixed at the cluster's start")
    transport.open()
    cfg = ModelConfig.from_pretrained(resolve_model_dir(config.model))
    return TPLeader(*groups(transport), kv_layout(cfg.num_kv_heads, config.tensor_parallel_size))


class FollowerEndpoint:
    """What a follower answers on the data plane: MicroAttention over its heads of lent blocks."""

    def __init__(self, worker, counters: StepCounters) -> None:
        self.worker = worker
        self.counters = counters
        # the debtors' rows over the blocks the first rank lent (the same ids in every rank's pool), built
        # from the same diffs the first rank's counterpart gets; rows go when a debtor drops them
        self.rows = LentRows(worker.kv.k.shape[1], worker.kv.k.device)

    def attention_shape(self) -> tuple[int, int, int, int, torch.dtype]:
        c = self.worker.model_config
        return c.num_layers, c.num_heads, c.head_dim, c.num_kv_heads, self.worker.kv.k.dtype

    def attend(self, layer: int, meta: MAMetadata, t: M.AttentionTensors) -> M.AttentionResultTensors:
        return attend_lent(self.worker.kv, self.worker.scale, self.counters, device_timer(self.worker.kv.k.device),
                           layer, meta, t)

    def step_metadata(self, debtor: int, step: int, meta: M.AttentionMeta, num_queries: int) -> MAMetadata:
        return self.rows.apply(debtor, step, meta, num_queries)

    def handle(self, src: int, msg: M.Msg, tensors) -> None:
        raise RuntimeError(f"a follower rank takes no RPC ({type(msg).__name__} from rank {src})")


def run_follower(config: EngineConfig, rank: int, world_size: int, tp_rank: int, data_init_method: str,
                 watch_parent: bool = False, timeout_s: float = 30.0) -> int:
    """The main of rank ``tp_rank`` > 0 of instance ``rank``'s group -> exit status (0 when its first
    rank stopped it, 1 when the group failed)."""
    from infinite.runtime.tp_worker import TPWorker

    tp = config.tensor_parallel_size
    who = f"rank {rank}.{tp_rank}"
    # Ctrl-C reaches every process of a terminal: the first rank decides what the group does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if watch_parent:
        threading.Thread(target=_watch_parent, args=(who,), daemon=True).start()
    transport = P2PTransport(rank, world_size, data_init_method=data_init_method, device=config.torch_device(),
                             tp_size=tp, tp_rank=tp_rank, rpc=False)
    code = 0
    try:
        transport.open()
        step, blocks = groups(transport)
        worker = TPWorker(config, step, blocks, rank)
        counters = StepCounters()
        transport.start(FollowerEndpoint(worker, counters))
        runner = StepRunner(worker, transport, counters, timeout_s)
        worker.handlers[REMOTE] = follow_remote(runner, worker.input_batch, step)
        worker.handlers[PROBE] = follow_probe(worker)
        worker.serve()
        log.info("%s: stopped by its group's first rank after %d steps", who, worker.steps)
    except GroupError as e:
        log.error("%s: its tensor-parallel group failed (%s): exiting (status 1)", who, e)
        code = 1
    finally:
        try:
            transport.close()
        except Exception:  # noqa: BLE001
            log.debug("transport close", exc_info=True)
    return code


def _watch_parent(who: str) -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    log.error("%s: the launching process is gone: exiting", who)
    os._exit(1)
