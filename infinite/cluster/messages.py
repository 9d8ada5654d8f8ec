"""The message catalogue: every message between ranks (and on LocalCluster's driver pipe).

Each message is a named msgspec Struct, tagged so one decoder reads any of
them; tensors never go inside a Struct — they travel beside it in a small
dataclass (``AttentionTensors``, ``BlockTensors``, ``AttentionResultTensors``)
so that each transport moves them its own way (TensorPipe, gloo/NCCL
point-to-point, or by reference in-process). docs/architecture.md lists the
catalogue: who sends what to whom.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import torch

from infinite.outputs import RequestOutput
from infinite.sampling.params import SamplingParams


class Msg(msgspec.Struct, tag=True, frozen=True):
    """Base of every message."""


# --------------------------------------------------------------------------- replies


class Ack(Msg):
    pass


class Failed(Msg):
    """The handler raised: ``reason`` is a RequestError reason when it was one."""

    message: str
    reason: str = "internal"


# --------------------------------------------------------------------------- requests (rank 0 -> home)


class GroupLayout(Msg):
    """A prompt's segment layout over a prefill group (``sp_layout.SegmentLayout`` as it travels:
    each stripe as ``[member, start, end, offset, row, round]``)."""

    prompt_len: int
    block_size: int
    members: list[int]  # ranks; members[0] is the home
    stripe_blocks: list[int]
    stripes: list[list[int]]


class AddRequest(Msg):
    """A request validated by the front door, for its home to run. A request moved off a rank
    that died (or left) carries what it generated so far: its new home recomputes the KV of
    prompt + those tokens and the stream goes on from there."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    prompt: str | None = None
    output_token_ids: list[int] = []
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    text_len: int = 0  # characters of output text rank 0 has already (the new home's deltas go on from there)
    prompt_logprobs_sent: bool = False  # rank 0 has the prompt logprobs already
    # where the gManager saw the longest cached prefix of the prompt when it is not the home:
    # that instance and how many blocks deep (a hint: the holder confirms with the block names)
    prefix_holder: int = -1
    prefix_blocks: int = 0
    # a group prefills the prompt (docs/distributed.md "Prefill groups"): its layout; None: the home alone
    group: GroupLayout | None = None


class AbortRequest(Msg):
    request_id: str


class MoveKV(Msg):
    """move_kvcache, sent to a request's home: move ``num_blocks`` of its oldest blocks that sit
    on ``src`` (-1: the home itself) to ``dst`` (the home itself when they come home)."""

    request_id: str
    num_blocks: int
    dst: int
    src: int = -1


class Stop(Msg):
    """Rank 0 tells an instance to stop."""


class StatsQuery(Msg):
    pass


class Ping(Msg):
    pass


# --------------------------------------------------------------------------- to rank 0


class RequestFailure(Msg):
    request_id: str
    message: str
    reason: str = "internal"


class Outputs(Msg):
    # Delta outputs (RequestOutput.delta_offset set): only what each request made since its last
    # output, so a step's message does not grow with the requests' lengths; rank 0 assembles them.
    """A home's new outputs (cumulative per request) and the requests it could not run."""

    rank: int
    outputs: list[RequestOutput] = []
    failures: list[RequestFailure] = []


class PlacementEntry(Msg):
    """How many blocks of one of the sender's requests sit on each instance."""

    request_id: str
    context_len: int
    blocks: dict[int, int]


class GroupStat(Msg):
    """One request's prefill group, as its home reports it: the members and its TTFT split (per
    member, compute and waiting for the other members' parts)."""

    request_id: str
    members: list[int]
    prompt_tokens: int
    prefill_ms: float
    outcome: str  # running | done | recomputed | aborted
    compute_ms: dict[int, float] = {}
    wait_ms: dict[int, float] = {}


class InstanceStats(Msg):
    rank: int
    total_blocks: int
    free_blocks: int
    used_blocks: int
    lent_blocks: int
    borrowed_blocks: int
    cached_blocks: int = 0  # blocks holding a named prefix (in use or not)
    evictable_blocks: int = 0  # free blocks that still hold a named prefix (counted in free_blocks)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, over admissions
    prefix_cache_hits: int = 0  # ... of which their KV came from a cache (this pool's or another's)
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_remote_hits: int = 0  # ... of which their KV stayed on another instance (lent by reference)
    prefix_copies: int = 0  # requests whose prefix lent in place was then copied home (copy_pays)
    num_running: int = 0
    num_waiting: int = 0
    waiting_blocks: int = 0
    tokens_held: int = 0
    step_time_ms: float = 0.0
    num_preemptions: int = 0
    steps: int = 0
    remote_steps: int = 0
    remote_calls: int = 0
    remote_wait_ms: float = 0.0
    remote_step_ms: float = 0.0
    remote_compute_ms: float = 0.0
    served_calls: int = 0
    served_ms: float = 0.0
    decode_remote_calls: int = 0  # remote calls, waits and served calls of decode steps alone
    decode_remote_wait_ms: float = 0.0
    decode_served_calls: int = 0
    decode_served_ms: float = 0.0
    migrations: int = 0
    migrated_blocks: int = 0
    lend_cap: int = 0
    demand_blocks: int = 0  # free blocks it keeps for its own queue and running requests' growth
    remote_wait_per_call_ms: float = 0.0  # exposed wait per remote MicroAttention call (recent)
    remote_calls_per_step: float = 0.0  # remote calls per layer, over the steps step_time_ms averages
    torch_threads: int = 0  # intra-op threads of this rank's torch
    # Walked, not derived from the free count: blocks in the request tables, blocks lent. A walk
    # costs O(tables), so a heartbeat walks only when its instance is idle (then what it finds is
    # a leak); None: not walked in this report. StatsQuery (LLM.stats()) always walks.
    table_blocks: int | None = None
    lent_entries: int | None = None
    recomputed: int = 0  # requests recomputed here because a rank holding some of their blocks left
    # prefill groups: requests this home had prefilled by one, those recomputed alone (a member failed or
    # refused), its time computing rounds as a member (its own groups' included) and waiting for the others
    prefill_groups: int = 0
    group_recomputes: int = 0
    group_compute_ms: float = 0.0
    group_wait_ms: float = 0.0
    groups: list[GroupStat] = []  # the last groups this home ran
    pool_version: int = 0  # the pool's version when free/used/lent were read (BlockPool.version)


class StepRecord(msgspec.Struct, array_like=True, frozen=True):
    """One decode step as its instance measured it: the batch, the context held (blocks in use
    times the block size, as the planner counts it) and the remote calls per layer of that step,
    with that step's time (the device's, synchronized)."""

    batch_size: int
    context_tokens: int
    step_s: float
    remote_calls: int = 0


class Heartbeat(Msg):
    """Counters (free memory, batch, step time), the decode steps measured since the last beat,
    and only the placement entries that changed since then: O(what changed), whatever the blocks
    held. ``placement_full``: the entries are every request of the sender's (its last beat may
    have been lost); any other the gManager holds for it is gone. The prefix cache's anchors
    (infinite.kv.prefix: 64-bit keys of sampled block names, not block lists) added and removed
    since the last beat; ``prefix_everything``: the added ones are all there are."""

    stats: InstanceStats
    placement_changed: list[PlacementEntry] = []
    placement_removed: list[str] = []
    decode_steps: list[StepRecord] = []
    placement_full: bool = False
    prefix_added: list[int] = []
    prefix_removed: list[int] = []
    prefix_everything: bool = False


class ClusterView(Msg):
    """Rank 0's membership decision (infinite.cluster.membership): pushed to every member on
    each change and carried by every heartbeat reply; ``epoch`` orders views."""

    epoch: int
    serving: list[int]
    draining: list[int] = []
    lost: list[int] = []
    left: list[int] = []


class HeartbeatReply(Msg):
    borrowable: int  # blocks the rest of the cluster can still lend the sender
    loans_pay: bool = False  # whether a loan for a request that fits the sender's pool would pay now
    # whether the gManager lends for throughput at all (its cost model is trusted): when not, a loan
    # for a request that fits its home's pool is refused for sure, and asking is a wasted round trip
    lends_for_throughput: bool = False
    view: ClusterView | None = None
    evicted: bool = False  # the sender was declared dead or removed: it must exit


class Join(Msg):
    """A rank announces itself to rank 0: at start-up, or joining a running cluster."""

    rank: int
    stats: InstanceStats


class Leaving(Msg):
    """A rank tells rank 0 it is draining (SIGTERM, or told to by Drain)."""

    rank: int
    reason: str


class Left(Msg):
    """A draining rank tells rank 0 it holds nothing any more and is exiting."""

    rank: int


class Drain(Msg):
    """Rank 0 tells a rank to leave the cluster gracefully (the admin endpoint)."""

    reason: str


class Suspect(Msg):
    """A rank whose call to ``ranks`` failed asks rank 0 to check them; the reply is a ClusterView."""

    reporter: int
    ranks: list[int]
    error: str


class Borrow(Msg):
    """A debtor asks the gManager for ``num_blocks`` more blocks for one request (all or nothing).
    ``request_blocks`` (its blocks after the growth) and ``running`` (already in the batch, so a
    refusal preempts) let the gManager weigh the loan against its cost."""

    debtor: int
    request_id: str
    num_blocks: int
    request_blocks: int = 0
    running: bool = False


class Borrowed(Msg):
    blocks: list[tuple[int, int]]  # (creditor, block); [] = refused


class ClusterStop(Msg):
    """Any rank asks rank 0 to stop the cluster (a signal reached it)."""


# --------------------------------------------------------------------------- creditor side


class Reserve(Msg):
    """try_move_kvcache: reserve blocks for a debtor's request; first come, first served."""

    debtor: int
    request_id: str
    num_blocks: int


class Reserved(Msg):
    """The blocks reserved, and the creditor's pool counts read after reserving them: the
    gManager's view of that creditor until a newer reading (``pool_version``) comes."""

    blocks: list[int]  # [] = refused
    free_blocks: int = 0
    used_blocks: int = 0
    lent_blocks: int = 0
    pool_version: int = -1  # -1: no counts (older than any reading)


class Release(Msg):
    debtor: int
    request_id: str
    blocks: list[int] | None = None  # None: all of them


class Released(Msg):
    count: int


class LendPrefix(Msg):
    """A home asks the holder of a cached prefix to lend its blocks to one request by reference
    (never evicted while held; ``Release`` gives them back): the longest run of ``names`` (16-byte
    block names, infinite.kv.prefix) cached there."""

    debtor: int
    request_id: str
    names: list[bytes]


class PrefixLent(Msg):
    blocks: list[int]  # the holder's blocks of names[0..len(blocks)); [] = none


class WriteBlocks(Msg):
    """Migrated blocks' contents; tensors in BlockTensors."""

    blocks: list[int]


class ReadBlocks(Msg):
    """The contents of lent blocks, for their home to take them back; reply BlockTensors."""

    debtor: int
    request_id: str
    blocks: list[int]


class StepKey(Msg):
    """Names one micro-batch of one debtor step on a creditor (its metadata is kept under it)."""

    debtor: int
    step: int
    micro_batch: int


class AttentionMeta(Msg):
    """A step's requests on one creditor, as diffs against the rows it holds (cluster/lent_rows.py).

    Per request: a stable ``handle``, its blocks' ``epoch``, ``base`` (entries the creditor
    holds already; 0: replace them), its queries (``q_lens``, ``q_starts``) and ``counts`` new
    entries, concatenated in ``blocks`` (ids in the creditor's pool) and ``logical`` (their
    indices in the request). ``drop``: handles the creditor may forget."""

    handles: list[int]
    epochs: list[int]
    bases: list[int]
    q_lens: list[int]
    q_starts: list[int]
    counts: list[int]
    blocks: list[int]
    logical: list[int]
    drop: list[int] = []


class AttentionCall(Msg):
    """One layer of remote MicroAttention: the block metadata rides along on layer 0 only."""

    key: StepKey
    layer: int
    meta: AttentionMeta | None = None


class AttentionResult(Msg):
    pass


# --------------------------------------------------------------------------- LocalCluster's driver pipe
# The calling process (LLM(num_instances=N)) is not a rank: it talks to rank 0 over a socket.


class DriverReady(Msg):
    model_name: str
    max_model_len: int
    capacity_tokens: int


class DriverMake(Msg):
    """Validate a prompt on rank 0 (tokenize, check capacity); the reply is DriverMade or DriverError."""

    seq: int
    prompt: str | list[int]
    params: SamplingParams
    request_id: str


class DriverMade(Msg):
    seq: int
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    prompt: str | None


class DriverAdd(Msg):
    request_id: str
    data_parallel_rank: int = -1  # the instance to run it on (vLLM's name); -1: the router picks
    group: GroupLayout | None = None  # the prefill group to run its prompt on (Request.prefill_layout)


class DriverAbort(Msg):
    request_id: str


class DriverQuery(Msg):
    """What: "stats" (fresh per-instance stats) or "status" (the cluster view with debts)."""

    seq: int
    what: str


class DriverReply(Msg):
    seq: int
    value: list[dict] | dict


class DriverError(Msg):
    seq: int
    kind: str  # ValueError | TypeError | RuntimeError
    message: str


class DriverMove(Msg):
    request_id: str
    num_blocks: int
    dst: int


class DriverStop(Msg):
    pass


class DriverOutput(Msg):
    output: RequestOutput


# --------------------------------------------------------------------------- prefill groups


class GroupStart(Msg):
    """The home tells a member of a request's prefill group what to compute: its blocks (lent to
    the request, in its segment's order) and the tokens of its stripes. Acknowledged at once, or
    refused (the member is in another group: one group per instance at a time, docs/distributed.md)."""

    home: int
    request_id: str
    layout: GroupLayout
    blocks: list[int]
    tokens: list[int]  # the member's segment, in its order
    prompt_logprobs: int | None = None  # top-k of prompt logprobs to compute over the segment


class GroupRun(Msg):
    """Every member took its ``GroupStart``: compute. The reply, ``GroupDone``, comes once the
    member's last round is computed."""

    home: int
    request_id: str


class GroupDone(Msg):
    """A member's segment is computed: its prompt logprobs (``logprobs[i]`` is for prompt token
    ``positions[i] + 1``) and its time split."""

    member: int
    positions: list[int]
    logprobs: list[dict[int, float]]
    compute_s: float
    wait_s: float


class GroupAsk(Msg):
    """A member's rows of one layer (one per stripe, at ``q_starts`` of ``q_lens`` positions) and the
    holder's earlier positions. Pass-Q (``mode`` "q"): the queries go in ``AttentionTensors.q``, the
    reply is ``AttentionResultTensors`` (out, LSE) over the holder's blocks; pass-KV ("kv"): no
    tensors go, the reply is ``BlockTensors`` (k, v ``[n, B, nkv, d]``, this layer only) of the
    holder's blocks the rows can see, in its segment's order."""

    home: int
    request_id: str
    layer: int
    q_starts: list[int]
    q_lens: list[int]
    mode: str = "q"


class GroupClose(Msg):
    """The group's prefill ended (handed to the home's scheduler, failed or aborted): members
    forget it. The blocks stay lent to the request until the home releases them."""

    home: int
    request_id: str


# --------------------------------------------------------------------------- tensors beside messages


@dataclass
class AttentionTensors:
    q: torch.Tensor  # [Tc, nh, d] queries of the rows the creditor serves
    k: torch.Tensor | None = None  # [Wc, nkv, d] new tokens whose K/V land in the creditor's blocks
    v: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # [Wc] int64 their slots in the creditor's pool


@dataclass
class AttentionResultTensors:
    out: torch.Tensor  # [Tc, nh, d]
    lse: torch.Tensor  # [Tc, nh] float32


@dataclass
class BlockTensors:
    k: torch.Tensor  # [L, n, B, nkv, d]
    v: torch.Tensor


Message = (
    Ack | Failed | AddRequest | AbortRequest | MoveKV | Stop | StatsQuery | Ping | RequestFailure | Outputs
    | PlacementEntry | InstanceStats | Heartbeat | HeartbeatReply | Borrow | Borrowed | ClusterStop | Reserve
    | Reserved | Release | Released | LendPrefix | PrefixLent | WriteBlocks | ReadBlocks | StepKey | AttentionMeta | AttentionCall | AttentionResult
    | DriverReady | DriverMake | DriverMade | DriverAdd | DriverAbort | DriverQuery | DriverReply | DriverError
    | DriverMove | DriverStop | DriverOutput | ClusterView | Join | Leaving | Left | Drain | Suspect
    | GroupStat | GroupLayout | GroupStart | GroupRun | GroupDone | GroupAsk | GroupClose
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Msg:
    return _decoder.decode(data)
