"""RankEndpoint: what one rank answers to the others, message by message.

Every rank serves its instance (requests, creditor work, stats, stop); rank 0
also serves the gManager and the front door (heartbeats, borrowing, outputs).
Handlers run on transport threads: they enqueue, answer from thread-safe
state, or hand work to the creditor's serving thread.
"""

from __future__ import annotations

import torch

from infinite.attention import MAMetadata
from infinite.cluster import messages as M
from infinite.cluster.frontdoor import ClusterEngine
from infinite.cluster.instance import Instance
from infinite.cluster.transport import Future, Reply, Tensors

ACK: Reply = (M.Ack(), None)


class RankEndpoint:
    def __init__(self, instance: Instance, front: ClusterEngine | None = None) -> None:
        self.instance = instance
        self.front = front

    def attention_shape(self) -> tuple[int, int, int, int, torch.dtype]:
        """(layers, query heads, head dim, KV heads, dtype): what a remote MicroAttention call carries."""
        c = self.instance.engine.model_config
        return c.num_layers, c.num_heads, c.head_dim, c.num_kv_heads, self.instance.engine.kv.k.dtype

    def attend(self, layer: int, meta: MAMetadata, t: M.AttentionTensors) -> M.AttentionResultTensors:
        """One layer of MicroAttention over blocks lent to a debtor, on the caller's thread."""
        return self.instance.creditor.attend(layer, meta, t)

    def step_metadata(self, debtor: int, step: int, meta: M.AttentionMeta, num_queries: int) -> MAMetadata:
        """A debtor step's block diffs applied to the rows lent to it -> the step's metadata."""
        return self.instance.creditor.step_metadata(debtor, step, meta, num_queries)

    def handle(self, src: int, msg: M.Msg, tensors: Tensors) -> Reply | Future:
        inst = self.instance
        match msg:
            case M.AttentionCall():
                return inst.creditor.serve_attention(msg, tensors)
            case M.Reserve():
                return inst.creditor.reserve(msg), None
            case M.Release():
                return M.Released(inst.creditor.release(msg)), None
            case M.LendPrefix():
                return M.PrefixLent(inst.creditor.lend_prefix(msg)), None
            case M.WriteBlocks():
                inst.creditor.write_blocks(msg, tensors)
                return ACK
            case M.ReadBlocks():
                return M.Ack(), inst.creditor.read_blocks(msg)
            case M.GroupAsk():
                return inst.guests.ask(msg, tensors)
            case M.GroupStart():
                inst.guests.start(msg)
                return ACK
            case M.GroupRun():
                return inst.guests.run(msg)
            case M.GroupClose():
                inst.guests.close((msg.home, msg.request_id))
                return ACK
            case M.AddRequest() | M.AbortRequest() | M.MoveKV():
                inst.enqueue(msg)
                return ACK
            case M.StatsQuery():
                return inst.stats(), None
            case M.Ping():
                return ACK
            case M.Stop():
                inst.request_stop()
                return ACK
            case M.ClusterView():
                inst.apply_view(msg)
                return ACK
            case M.Drain():
                inst.request_leave(msg.reason)
                return ACK
        front = self.front
        if front is None:
            raise RuntimeError(f"rank {inst.rank} does not serve {type(msg).__name__} (rank 0 does)")
        sup = front.supervisor
        # Membership and borrowing: the handler's return value is the reply.
        answer = {M.Heartbeat: sup.on_heartbeat, M.Join: sup.on_join, M.Suspect: sup.on_suspect,
                  M.Leaving: sup.on_leaving, M.Left: sup.on_left, M.Borrow: front.gmanager.borrow}.get(type(msg))
        if answer is not None:
            return answer(msg), None
        match msg:
            case M.Outputs():
                front.on_outputs(msg)
                return ACK
            case M.ClusterStop():
                front.request_stop()
                return ACK
        raise RuntimeError(f"unknown message {type(msg).__name__}")
