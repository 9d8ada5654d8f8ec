"""The creditor side of an instance: blocks it lends, and MicroAttention over them for debtors.

Handlers arrive on transport threads; the pool's accounting is the rManager's
(thread-safe), and all MicroAttention for debtors runs on one serving thread:
its gather buffers are reused from layer to layer (a fresh multi-MB buffer per
call costs page faults on CPU), and no transport worker is held while it
computes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from infinite.attention import MAMetadata, micro_attention, write_kv
from infinite.cluster import messages as M
from infinite.cluster.counters import StepCounters
from infinite.cluster.device_timer import DeviceTimer, device_timer
from infinite.cluster.lent_rows import LentRows
from infinite.cluster.policy import LendingPolicy, Peer
from infinite.cluster.remote_attention import handle_of
from infinite.cluster.transport import Future, Reply, StaleRows, chain, failed_reply
from infinite.kv.cache import KVCache
from infinite.kv.rmanager import RManager

log = logging.getLogger(__name__)


class Creditor:
    def __init__(self, rm: RManager, kv: KVCache, scale: float, policy: LendingPolicy, counters: StepCounters,
                 own_demand: Callable[[], int] = lambda: 0,
                 make_timer: Callable[[], DeviceTimer] | None = None) -> None:
        self.rm = rm
        # a timer per served call (calls run on the serving thread or a caller's): the device's time
        self.make_timer = make_timer or (lambda: device_timer(kv.k.device))
        self.own_demand = own_demand  # free blocks this instance keeps for its own requests
        self.kv = kv
        self.scale = scale
        self.policy = policy
        self.counters = counters
        self.num_layers = kv.k.shape[0]
        self._serve = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"rank{rm.rank}-serve")
        self.rows = LentRows(rm.num_blocks, kv.k.device)  # what debtors told us of their requests' blocks
        # StepKey -> the step's metadata (or why its diffs were refused), for its later layers (RPC plane)
        self._step_meta: dict[tuple[int, int, int], MAMetadata | Exception] = {}

    # ---- blocks ---------------------------------------------------------------------------
    def _lendable(self, rm: RManager) -> int:
        return self.policy.lendable(Peer(rm.rank, rm.num_blocks, rm.num_free, rm.num_lent, rm.num_borrowed,
                                         reserved=self.own_demand()))

    def reserve(self, msg: M.Reserve) -> M.Reserved:
        """try_move_kvcache: first come, first served; no blocks means refused (wait for the next
        plan). The pool's counts, read after reserving, travel with the blocks."""
        blocks = self.rm.try_lend(msg.debtor, msg.request_id, msg.num_blocks, self._lendable)
        s = self.rm.stats()
        return M.Reserved(blocks, s["free_blocks"], s["used_blocks"], s["lent_blocks"], s["pool_version"])

    def lend_prefix(self, msg: M.LendPrefix) -> list[int]:
        """A cached prefix by reference for a debtor's request (its blocks stay where they are and
        serve it by MicroAttention); as many blocks as are cached, of which those nobody holds now
        within what this instance may lend (roles: a debtor lends nothing)."""
        return self.rm.lend_cached(msg.debtor, msg.request_id, list(msg.names), self._lendable)

    def release(self, msg: M.Release) -> int:
        try:
            n = self.rm.release_lent(msg.debtor, msg.request_id, msg.blocks)
        except RuntimeError:
            log.warning("rank %d: release of unknown blocks for %d/%s", self.rm.rank, msg.debtor, msg.request_id)
            n = 0
        if (msg.debtor, msg.request_id) not in self.rm.lent:  # none of its blocks left here: nor its rows
            self.rows.drop(msg.debtor, [handle_of(msg.request_id)])
        return n

    def step_metadata(self, debtor: int, step: int, meta: M.AttentionMeta, num_queries: int) -> MAMetadata:
        """A debtor step's diffs applied to its rows here -> the step's MicroAttention metadata
        (StaleRows when they do not continue what is held)."""
        return self.rows.apply(debtor, step, meta, num_queries)

    def read_blocks(self, msg: M.ReadBlocks) -> M.BlockTensors:
        """Blocks lent to msg.debtor's request, for it to take them home: k/v [L, n, B, nkv, d]."""
        if not self.rm.is_lent(msg.debtor, msg.request_id, msg.blocks):
            raise RuntimeError(f"blocks {msg.blocks} are not all lent to {msg.debtor}/{msg.request_id}")
        return M.BlockTensors(*self.kv.read_blocks(msg.blocks))

    def write_blocks(self, msg: M.WriteBlocks, t: M.BlockTensors) -> None:
        """Receive migrated blocks: k/v [L, n, B, nkv, d]."""
        self.kv.write_blocks(msg.blocks, t.k, t.v)

    # ---- MicroAttention for debtors -----------------------------------------------------------
    def serve_attention(self, call: M.AttentionCall, t: M.AttentionTensors) -> Future:
        fut: Future = torch.futures.Future()

        def run() -> None:
            try:
                result: Reply = (M.AttentionResult(), self._attention(call, t))
            except BaseException as e:  # noqa: BLE001 - travels back to the debtor
                result = failed_reply(e)
            chain(result, fut)

        self._serve.submit(run)
        return fut

    def _attention(self, call: M.AttentionCall, t: M.AttentionTensors) -> M.AttentionResultTensors:
        """The RPC data plane's call: the block metadata comes with layer 0 and is kept for the
        step's other layers."""
        key = (call.key.debtor, call.key.step, call.key.micro_batch)
        if call.meta is not None:
            # A debtor's step that failed midway never sends its last layer: drop what it left.
            for old in [k for k in self._step_meta if k[0] == key[0] and k[1] < key[1] - 1]:
                del self._step_meta[old]
            try:
                self._step_meta[key] = self.step_metadata(key[0], key[1], call.meta, t.q.shape[0])
            except Exception as e:  # noqa: BLE001 - every layer of the step answers it
                self._step_meta[key] = e
        meta = self._step_meta.get(key)
        if meta is None:  # its layer 0 never came, or was dropped (forget_debtor): the debtor resends
            meta = StaleRows(f"no metadata for rank {key[0]}'s step {key[1]} (micro-batch {key[2]})")
        if call.layer == self.num_layers - 1:
            self._step_meta.pop(key, None)
        if isinstance(meta, Exception):
            raise meta
        return self.attend(call.layer, meta, t)

    def attend(self, layer: int, meta: MAMetadata, t: M.AttentionTensors) -> M.AttentionResultTensors:
        """One layer of MicroAttention over lent blocks, on the calling thread (thread-safe: the
        gather buffers are per thread)."""
        return attend_lent(self.kv, self.scale, self.counters, self.make_timer(), layer, meta, t)

    def forget_debtor(self, debtor: int) -> None:
        """Drop the rows and step metadata a (dead) debtor left behind."""
        self.rows.forget_debtor(debtor)
        self._serve.submit(lambda: [self._step_meta.pop(k) for k in list(self._step_meta) if k[0] == debtor])

    def close(self) -> None:
        self._serve.shutdown(wait=False, cancel_futures=True)


@torch.inference_mode()
def attend_lent(kv: KVCache, scale: float, counters: StepCounters, timer: DeviceTimer, layer: int, meta: MAMetadata,
                t: M.AttentionTensors) -> M.AttentionResultTensors:
    """One layer of MicroAttention over blocks lent to a debtor (writing the new K/V that land there
    first), timed on the device; a rank of a tensor-parallel group runs it over its heads of them."""
    timer.start()
    try:
        dev = kv.k.device
        kc, vc = kv.k[layer], kv.v[layer]
        if t.slots is not None:
            write_kv(kc, vc, t.k.to(dev), t.v.to(dev), t.slots.to(dev))
        out, lse = micro_attention(t.q.to(dev), kc, vc, meta, scale)
        return M.AttentionResultTensors(out, lse)
    finally:
        counters.served(timer.elapsed(), meta.max_q_len <= 1)
