"""ClusterAllocator: a cluster instance's blocks come from its own pool first; what the pool
lacks is borrowed from creditors through the gManager (all or nothing), local-first.

Local-first: the blocks being written (a request's tail) stay home, so the steady decode
path ships no K/V. When a running request needs a block and the pool is full, its oldest
full local blocks move to borrowed blocks (their contents are final) and the freed local
blocks take the tail; a new request's borrowed blocks take its oldest positions. Borrowing
moves a chunk at a time (``chunk_blocks``) so that the copy happens once per chunk of
tokens, not once per block. What to ask for is decided by ``infinite.cluster.decisions``
(``growth_loan``, ``loan_asks``, ``LoanBackoff``), the functions the simulator's allocator calls.
"""

from __future__ import annotations

import logging
import time

from infinite.cluster import messages as M
from infinite.cluster.decisions import LoanAsk, LoanBackoff, growth_loan, loan_asks
from infinite.cluster.migration import Migrator
from infinite.cluster.policy import LendingPolicy
from infinite.cluster.prefix_routing import copy_pays
from infinite.cluster.transport import Transport, wait_all
from infinite.kv.rmanager import RBlock, RManager, blocks_for
from infinite.runtime.allocator import LocalAllocator, PrefixHit
from infinite.runtime.request import Request, Status

log = logging.getLogger(__name__)


class ClusterAllocator(LocalAllocator):
    def __init__(self, rm: RManager, transport: Transport, policy: LendingPolicy, capacity_blocks: int,
                 other_pools: list[int], timeout_s: float = 30.0, chunk_blocks: int = 4) -> None:
        super().__init__(rm)
        self.transport = transport
        self.policy = policy
        self.capacity = capacity_blocks
        self.other_pools = other_pools
        self.timeout_s = timeout_s
        self.chunk_blocks = chunk_blocks
        self.borrowable = 0  # blocks the rest of the cluster can still lend us (the gManager's last word)
        self.loans_pay = False  # the gManager's last word on whether a loan for a request that fits would pay
        self.lends_for_throughput = False  # ... and whether it lends for anything but capacity at all
        self.lost: set[int] = set()  # ranks that died: their blocks went with them, nothing to release there
        self.migrator: Migrator | None = None  # set by the Instance once its KV cache exists
        self.backoff = LoanBackoff()  # no loan requests for a moment after a refusal
        self.prefix_loans = 0  # requests started over a prefix cached on another instance
        self.prefix_loan_tokens = 0  # ... and the prompt tokens those prefixes held
        self.prefix_copies = 0  # ... of which the prefix was copied home (copy_pays)

    def capacity_blocks(self) -> int:
        return self.capacity

    def capacity_reason(self) -> str:
        lend = [self.policy.lend_cap(t) for t in self.other_pools]
        if not self.policy.enabled:
            return (f"its instance's pool of {self.rm.num_blocks} blocks; lending is off "
                    "(enable_lending / --no-lending)")
        return (f"its home's pool of {self.rm.num_blocks} blocks plus {sum(lend)} that the {len(lend)} other "
                f"instances may lend (max_lend_fraction={self.policy.max_lend_fraction} of each pool; raise it, "
                "or num_kv_blocks / --num-kv-blocks, or add instances)")

    def free_blocks(self) -> int:
        return self.rm.num_free + (self.borrowable if self.policy.enabled else 0)

    def grow(self, req: Request, num_tokens: int) -> bool:
        rid = req.request_id
        need = self.rm.num_needed(rid, num_tokens)
        if need == 0:
            return True
        free = self.rm.num_free
        held = self.rm.num_held(rid)
        running = req.status is Status.RUNNING
        rest = growth_loan(need, free, held, self.rm.num_blocks, running=running, lending=self.policy.enabled,
                           lends_for_throughput=self.lends_for_throughput, loans_pay=self.loans_pay)
        if rest is None:
            return False
        if rest == 0:
            return self._allocate(rid, need)
        movable = self.migrator.oldest_full(rid, req.num_computed_tokens, self.rm.rank, rest + self.chunk_blocks)
        push_out, asks = loan_asks(rest, len(movable))
        if push_out:
            # local-first: the oldest full local blocks go to borrowed ones, the tail stays home
            refs = self._ask(rid, asks, held + need, running)
            if refs and self.migrator.push_now(rid, movable[:len(refs)], refs):
                return self._allocate(rid, need)
            self.borrowable = 0
            return False
        # the borrowed blocks take the oldest of the new positions; the free local ones the tail
        if not self._allocate(rid, free):
            return False
        refs = self._ask(rid, asks, held + need, running)
        if not refs:
            self.rm.free_tail(rid, free)
            self.borrowable = 0
            return False
        self.rm.append_remote(rid, refs, at=held)
        return True

    def start(self, req: Request, hit: PrefixHit) -> int | None:
        """A waiting request whose prompt's prefix is cached deeper on another instance (the
        router's hint) starts with that instance's blocks in place, lent by reference and served
        by remote MicroAttention: after its local hits, before its new blocks."""
        remote = self._prefix_loan(req, hit)
        if not remote:
            return super().start(req, hit)
        bs = self.rm.block_size
        try:
            got = self.rm.start(req.request_id, hit.names[:hit.local], hit.local + len(remote), remote)
        except MemoryError:  # a local hit was evicted meanwhile: the loan would not follow it
            self.give_back(req.request_id, remote)
            return None
        if not self.grow(req, req.num_tokens):
            self.release(req)
            return None
        self.prefix_loans += 1
        self.prefix_loan_tokens += len(remote) * bs
        c = self.migrator.counters
        if copy_pays(len(remote), req.max_tokens, self.migrator.num_layers, c.recent_wait_per_call_s,
                     c.copy_s_per_block) and self.rm.num_free >= len(remote):
            self.migrator.pull(req.request_id, remote)  # copied home while it runs; then cached here too
            self.prefix_copies += 1
        return got * bs

    def _prefix_loan(self, req: Request, hit: PrefixHit) -> list[RBlock]:
        """The holder's blocks of the prompt's prefix past this pool's hits ([] when there is no
        hint, nothing more there, roles forbid it, or the pool cannot hold the rest anyway).
        One round trip; a hint that fails is dropped, so it is asked once."""
        if hit.remote is None or not self.policy.enabled:
            return []
        holder, depth = hit.remote
        rid = req.request_id
        if depth <= hit.local or holder == self.rm.rank or holder in self.lost \
                or not self.policy.may_borrow(self.rm.num_lent):
            return []
        total = blocks_for(req.num_tokens, self.rm.block_size)
        if total - min(depth, len(hit.names)) + (hit.local - hit.shared) > self.rm.num_free:
            return []  # no room for the rest even with the loan: ask when there is
        names = hit.names[hit.local:]
        try:
            got = self.transport.lend_prefix(holder, M.LendPrefix(self.rm.rank, rid, names),
                                             timeout=self.timeout_s).wait().blocks
        except Exception:  # noqa: BLE001 - the holder is gone or refused: compute the prefix here
            log.warning("rank %d: borrowing the cached prefix of %s from rank %d failed", self.rm.rank, rid, holder,
                        exc_info=True)
            got = []
        if not got:
            req.prefix_hint = None
        return [RBlock(holder, b) for b in got]

    def _allocate(self, request_id: str, n: int) -> bool:
        if n <= 0:
            return True
        try:
            self.rm.allocate(request_id, n)
        except MemoryError:  # a concurrent loan took them
            return False
        return True

    def _ask(self, request_id: str, asks: tuple[LoanAsk, ...], request_blocks: int, running: bool) -> list[RBlock]:
        """Ask the gManager for each loan in turn (a blocking round trip each) until one is granted."""
        for ask in asks:
            refs = self._borrow(request_id, ask, request_blocks, running)
            if refs:
                return refs
        return []

    def _borrow(self, request_id: str, ask: LoanAsk, request_blocks: int, running: bool) -> list[RBlock]:
        now = time.monotonic()
        if not self.backoff.allows(now, ask):
            return []
        try:
            got = self.transport.borrow(M.Borrow(self.rm.rank, request_id, ask.blocks, request_blocks, running),
                                        timeout=self.timeout_s).wait()
        except Exception:  # noqa: BLE001 - rank 0 unreachable: behave as a lone instance
            log.warning("rank %d: borrowing %d blocks for %s failed", self.rm.rank, ask.blocks, request_id,
                        exc_info=True)
            got = M.Borrowed([])
        self.backoff.answered(now, bool(got.blocks))
        self.borrowable = max(0, self.borrowable - len(got.blocks))
        return [RBlock(c, b) for c, b in got.blocks]

    def release(self, req: Request) -> None:
        self.give_back(req.request_id, self.rm.free_request(req.request_id))

    def give_back(self, request_id: str, refs: list[RBlock]) -> None:
        """Release remote blocks on their creditors, in parallel, and wait: a request's end is
        reported only once its blocks are free everywhere."""
        by_creditor: dict[int, list[int]] = {}
        for ref in refs:
            if ref.instance not in self.lost:
                by_creditor.setdefault(ref.instance, []).append(ref.block)
        ranks = list(by_creditor)
        futs = [self.transport.release(c, M.Release(self.rm.rank, request_id, by_creditor[c]), timeout=self.timeout_s)
                for c in ranks]

        def lost(i: int, err: BaseException) -> None:  # that creditor is gone; its blocks went with it
            log.warning("release of %d blocks on rank %d failed: %s", len(by_creditor[ranks[i]]), ranks[i], err)

        wait_all(futs, on_error=lost)
