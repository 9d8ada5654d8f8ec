"""Debtor/creditor placement of KV blocks: a pure function of a cluster snapshot.

The gManager, the cluster simulator and the tests all call ``plan`` on a
``ClusterSnapshot`` and get back ``Move``s; nothing here does I/O, so the
algorithm can be driven with made-up states. See docs/placement.md.

A move ``Move(r, src, dst, n)`` migrates ``n`` of request ``r``'s blocks from
``src`` to ``dst``. When ``src`` is ``r``'s home those are its *oldest* local
blocks (local-first: the newest blocks, where decoding appends, stay home).
The only other legal source is an instance that leaves the cluster
(``alive=False``); it sends all the blocks it holds for ``r``. A creditor
never passes lent blocks on (no borrowing chains).

Objective (no regret): the *estimated decode throughput* ``Σ_i β_i / step_i``
from the calibrated cost model, where β_i counts the waiting requests that the
free memory admits and ``step_i`` pays the remote MicroAttention calls the
move adds. A move is made only when it raises that estimate by ``min_gain``:
memory for queued demand is worth exactly the batch it admits, weighed
against the remote path's cost (demand that no home can hold at all is served
by on-demand borrowing, not here).

Each greedy step takes the first debtor (ascending batch), its longest
movable request, and creditors in preference order (already holding the
request, then most free), and evaluates several block counts ``k``; when no
debtor gains, blocks come home: a request's blocks on one creditor return to
its home when the home has room and the cluster gains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from infinite.cluster.cost_model import CostModel
from infinite.cluster.policy import LendingPolicy, Peer
from infinite.cluster.snapshot import ClusterSnapshot, InstanceState, Move, RequestState

__all__ = [
    "RequestState",
    "InstanceState",
    "ClusterSnapshot",
    "PlacementConfig",
    "PlanBudget",
    "Move",
    "plan",
    "apply_moves",
    "route",
    "route_key",
    "capacities",
    "loan_gain",
    "fits_cluster",
    "lost_requests",
    "cluster_throughput",
    "blocked_demand",
]


@dataclass(frozen=True)
class PlacementConfig:
    """Knobs of the greedy placement; who may lend how much is the ``policy``'s.

    ``creditor_usage_threshold`` both selects creditors (memory use below it)
    and bounds how far lending may fill them. ``candidate_ks`` is how many
    block counts are evaluated per (request, creditor) pair.
    """

    policy: LendingPolicy = field(default_factory=LendingPolicy)
    debtor_batch_threshold: int = 8
    creditor_usage_threshold: float = 0.9
    candidate_ks: int = 6
    min_gain: float = 1.0  # tokens/s every move must add (no regret)
    home_headroom: float = 0.1  # blocks come home only if the home keeps this share of its pool free
    max_moves: int = 10_000  # safety bound on greedy iterations

    def __post_init__(self) -> None:
        if not isinstance(self.policy, LendingPolicy):
            raise TypeError(f"PlacementConfig.policy must be a LendingPolicy, got {type(self.policy).__name__}")
        if self.debtor_batch_threshold < 0:
            raise ValueError(f"debtor_batch_threshold must be >= 0, got {self.debtor_batch_threshold}")
        if not 0.0 <= self.creditor_usage_threshold <= 1.0:
            raise ValueError(f"PlacementConfig.creditor_usage_threshold must be in [0, 1], got {self.creditor_usage_threshold}")
        if self.candidate_ks < 1:
            raise ValueError(f"candidate_ks must be >= 1, got {self.candidate_ks}")
        if self.min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain}")
        if self.max_moves < 1:
            raise ValueError(f"max_moves must be >= 1, got {self.max_moves}")


# --------------------------------------------------------------------------- working state


@dataclass
class _Inst:
    rank: int
    total: int
    free: int
    lent: int
    batch: int
    waiting: int
    waiting_reqs: int
    alive: bool
    borrowed: int = 0  # blocks of requests homed here that sit elsewhere
    remote_calls: int = 0  # (request homed here, other instance) pairs: remote MA calls per layer

    @property
    def used(self) -> int:
        return self.total - self.free


@dataclass
class _Req:
    rid: str
    home: int
    blocks: dict[int, int]

    @property
    def total(self) -> int:
        return sum(self.blocks.values())


class _Work:
    """Mutable copy of a snapshot that moves are applied to while planning."""

    def __init__(self, snap: ClusterSnapshot) -> None:
        self.block_size = snap.block_size
        self.inst = {
            i.rank: _Inst(
                i.rank, i.total_blocks, i.free_blocks, i.lent_blocks, i.batch_size,
                i.waiting_blocks, i.waiting_requests, i.alive,
            )
            for i in snap.instances
        }
        self.reqs = {r.request_id: _Req(r.request_id, r.home, {k: v for k, v in r.blocks.items() if v > 0})
                     for r in snap.requests}
        self.by_home: dict[int, list[_Req]] = {}
        for r in self.reqs.values():
            self.by_home.setdefault(r.home, []).append(r)
            home = self.inst[r.home]
            home.remote_calls += sum(1 for k in r.blocks if k != r.home)
            home.borrowed += sum(n for k, n in r.blocks.items() if k != r.home)
        for i in snap.instances:  # debts of requests the snapshot does not list still count
            self.inst[i.rank].borrowed = max(self.inst[i.rank].borrowed, i.borrowed_blocks)

    def apply(self, mv: Move) -> None:
        r = self.reqs.get(mv.request_id)
        if r is None:
            raise ValueError(f"move {mv}: unknown request")
        src, dst = self.inst.get(mv.src), self.inst.get(mv.dst)
        if src is None or dst is None:
            raise ValueError(f"move {mv}: unknown instance")
        if not dst.alive:
            raise ValueError(f"move {mv}: destination {mv.dst} is not alive")
        if mv.src != r.home and src.alive and mv.dst != r.home:
            raise ValueError(f"move {mv}: a live creditor may not pass lent blocks on (no borrowing chains)")
        have = r.blocks.get(mv.src, 0)
        if have < mv.num_blocks:
            raise ValueError(f"move {mv}: instance {mv.src} holds only {have} blocks of the request")
        if dst.free < mv.num_blocks:
            raise ValueError(f"move {mv}: destination {mv.dst} has only {dst.free} free blocks")
        home = self.inst[r.home]
        r.blocks[mv.src] = have - mv.num_blocks
        if r.blocks[mv.src] == 0:
            del r.blocks[mv.src]
            if mv.src != r.home:
                home.remote_calls -= 1
        if mv.dst != r.home and mv.dst not in r.blocks:
            home.remote_calls += 1
        r.blocks[mv.dst] = r.blocks.get(mv.dst, 0) + mv.num_blocks
        src.free += mv.num_blocks
        dst.free -= mv.num_blocks
        if mv.src != r.home:
            src.lent -= mv.num_blocks
            home.borrowed -= mv.num_blocks
        if mv.dst != r.home:
            dst.lent += mv.num_blocks
            home.borrowed += mv.num_blocks

    def lendable(self, c: _Inst, cfg: PlacementConfig, *, evacuating: bool = False) -> int:
        """Blocks ``c`` may still lend: the policy's answer (free memory its own queue does not
        need, its lend cap, never while it is a debtor) and, unless evacuating a leaver, its
        usage bound."""
        room = cfg.policy.lendable(Peer(c.rank, c.total, c.free, c.lent, c.borrowed, reserved=c.waiting))
        if not evacuating:
            room = min(room, math.floor(cfg.creditor_usage_threshold * c.total) - c.used)
        return max(0, room)


def _value(i: _Inst, cost: CostModel, block_size: int, d_free: int = 0, d_calls: int = 0) -> float:
    """Estimated decode tokens/s of an instance whose free memory changes by ``d_free``.

    Free memory admits waiting demand; a fraction of the demand admitted
    counts as that fraction of its requests (chunked prefill makes progress
    on a partly admitted request).
    """
    if not i.alive:
        return 0.0
    free = i.free + d_free
    admitted = min(i.waiting, free)
    wreq = i.waiting_reqs if i.waiting_reqs > 0 else (1 if i.waiting > 0 else 0)
    beta = i.batch + (wreq * admitted / i.waiting if i.waiting > 0 else 0.0)
    if beta <= 0:
        return 0.0
    ctx = (i.total - free + admitted) * block_size
    return cost.throughput(beta, ctx, i.remote_calls + d_calls)


def _blocked(i: _Inst, d_free: int = 0) -> int:
    return max(0, i.waiting - (i.free + d_free)) if i.alive else 0


# --------------------------------------------------------------------------- planning


@dataclass
class PlanBudget:
    """A bound on one planning round's time, for a caller that plans on a clock (the gManager).

    ``expired`` (the caller's clock against its deadline) is asked between the (debtor, request)
    pairs of the greedy search and after each greedy step; once it says so, ``plan`` returns the
    moves found so far. Each was chosen on the state after the ones before it, so the prefix is
    a plan of its own. A search cut midway leaves ``cut`` (debtor rank, request id): hand it
    to the next round as ``resume`` and that round's first search starts there, going round to
    the pairs before it last, so rounds progress through a search longer than one round (each
    round evaluates at least one pair). Without a budget ``plan`` runs to its fixed point.
    """

    expired: Callable[[], bool]
    resume: tuple[int, str] | None = None
    cut: tuple[int, str] | None = None  # where this round's search stopped (None: not midway)
    stopped: bool = False  # the budget ended the round before the plan reached its fixed point
    _evaluated: int = 0

    def _ask(self) -> bool:
        """Before evaluating a pair: True when the round must stop (never before the first pair)."""
        if self._evaluated and self.expired():
            self.stopped = True
            return True
        self._evaluated += 1
        return False


def plan(snapshot: ClusterSnapshot, cost: CostModel, cfg: PlacementConfig,
         budget: PlanBudget | None = None) -> list[Move]:
    """Moves that lower blocked demand and raise estimated throughput; [] when balanced.

    Blocks that leaving instances (``alive=False``) hold for live requests
    are moved off first. Requests homed on a leaving instance are not
    planned for; ``lost_requests`` names them. ``budget``: stop early (PlanBudget).
    """
    _check_types(snapshot, cost, cfg)
    work = _Work(snapshot)
    moves: list[Move] = []
    resume = budget.resume if budget is not None else None
    while len(moves) < cfg.max_moves:
        step = _evacuate(work, cfg)
        mv = _best_move(work, cost, cfg, budget, resume)
        resume = None  # only the round's first search resumes where the last round stopped
        if mv is None and not (budget is not None and budget.stopped):
            mv = _best_return(work, cost, cfg)
        if mv is not None:
            work.apply(mv)
            step.append(mv)
        moves.extend(step)
        if not step or budget is not None and (budget.stopped or budget.expired()):
            if budget is not None and step:
                budget.stopped = True
            break
    return _merge(moves)


def _check_types(snapshot: object, cost: object, cfg: object) -> None:
    if not isinstance(snapshot, ClusterSnapshot):
        raise TypeError(f"snapshot must be a ClusterSnapshot, got {type(snapshot).__name__}")
    if not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel, got {type(cost).__name__}")
    if not isinstance(cfg, PlacementConfig):
        raise TypeError(f"cfg must be a PlacementConfig, got {type(cfg).__name__}")


def _evacuate(work: _Work, cfg: PlacementConfig) -> list[Move]:
    """Move blocks off leaving instances: home first, then a creditor already
    holding the request, then the most free live instances."""
    out: list[Move] = []
    for x in sorted(r for r, i in work.inst.items() if not i.alive):
        for r in sorted(work.reqs.values(), key=lambda q: (-q.blocks.get(x, 0), q.rid)):
            left = r.blocks.get(x, 0)
            if left == 0 or x == r.home or not work.inst[r.home].alive:
                continue
            home = work.inst[r.home]
            targets: list[tuple[int, int]] = [(home.rank, max(0, home.free - home.waiting))]
            others = [i for i in work.inst.values() if i.alive and i.rank != r.home]
            others.sort(key=lambda i: (r.blocks.get(i.rank, 0) == 0, -i.free, i.rank))
            targets += [(i.rank, work.lendable(i, cfg, evacuating=True)) for i in others]
            targets.append((home.rank, home.free))  # last resort: eat into the home's queue
            for dst, room in targets:
                n = min(left, room, work.inst[dst].free)
                if n <= 0:
                    continue
                mv = Move(r.rid, x, dst, n)
                work.apply(mv)
                out.append(mv)
                left -= n
                if left == 0:
                    break
    return out


def _search_order(work: _Work, cfg: PlacementConfig, debtors: list[_Inst],
                  resume: tuple[int, str] | None) -> Iterator[tuple[_Inst, _Req]]:
    """The (debtor, request) pairs of a greedy search, in its order: debtors by ascending batch,
    each one's movable requests longest first. From ``resume`` on when a round resumes a search
    (the pairs before it come last); requests are sorted only when the search reaches them."""
    start, skip = 0, None
    if resume is not None:
        for i, d in enumerate(debtors):
            if d.rank == resume[0]:
                start, skip = i, resume[1]
                break
    order = debtors[start:] + debtors[:start]
    tail: list[_Req] = []
    for j, d in enumerate(order):
        reqs = [r for r in work.by_home.get(d.rank, ()) if _movable(r, cfg) > 0]
        reqs.sort(key=lambda r: (-r.blocks.get(r.home, 0), r.rid))
        if j == 0 and skip is not None:
            at = next((i for i, r in enumerate(reqs) if r.rid == skip), 0)
            reqs, tail = reqs[at:], reqs[:at]
        for r in reqs:
            yield d, r
    for r in tail:
        yield order[0], r


def _best_move(work: _Work, cost: CostModel, cfg: PlacementConfig, budget: PlanBudget | None = None,
               resume: tuple[int, str] | None = None) -> Move | None:
    live = [i for i in work.inst.values() if i.alive]
    debtors = [i for i in live if (i.batch < cfg.debtor_batch_threshold or i.waiting > i.free)
               and cfg.policy.may_borrow(i.lent)]
    debtors.sort(key=lambda i: (i.batch, i.rank))
    creditors: list[_Inst] | None = None  # found once a request could gain (a scan of every instance)
    for d, r in _search_order(work, cfg, debtors, resume):
        if budget is not None and budget._ask():
            budget.cut = (d.rank, r.rid)
            return None
        if not _may_gain(work, cost, cfg, d, r):
            continue
        if creditors is None:
            creditors = [i for i in live
                         if i.used < cfg.creditor_usage_threshold * i.total and work.lendable(i, cfg) > 0]
            creditors.sort(key=lambda c: (-c.free, c.rank))  # nothing changes until a move is returned
        if not creditors:
            return None
        # fewest creditors per request: one that already holds it first, then most free
        cands = [c for c in creditors if c.rank != d.rank and r.blocks.get(c.rank, 0) > 0]
        cands += [c for c in creditors if c.rank != d.rank and r.blocks.get(c.rank, 0) == 0]
        movable = _movable(r, cfg)
        failed = set()  # creditors in the same state give the same answer: ask one of them
        # Exact bound per creditor: a move of k blocks gains at most the debtor's change at
        # k (the creditor's is never positive), which grows with k; so a creditor that can
        # take at most k_max cannot beat min_gain if the debtor's change at k_max does not,
        # nor can any creditor with a smaller k_max and the same new-call count.
        hopeless = {0: 0, 1: 0}  # new calls -> the largest k_max known not to pay
        base = _value(d, cost, work.block_size)
        for c in cands:
            new_call = 0 if r.blocks.get(c.rank, 0) > 0 else 1
            sig = (c.total, c.free, c.lent, c.borrowed, c.batch, c.waiting, c.waiting_reqs, c.remote_calls,
                   c.alive, new_call)
            if sig in failed:
                continue
            if new_call and hopeless[1] >= movable:
                break  # the rest hold none of r and can take at most `movable`: none pays
            k_max = min(movable, work.lendable(c, cfg))
            if k_max <= hopeless[new_call]:
                failed.add(sig)
                continue
            if _value(d, cost, work.block_size, k_max, new_call) - base <= cfg.min_gain:
                hopeless[new_call] = k_max
                failed.add(sig)
                continue
            mv = _best_k(work, cost, cfg, d, c, r)
            if mv is not None:
                return mv
            failed.add(sig)
    return None


def _may_gain(work: _Work, cost: CostModel, cfg: PlacementConfig, d: _Inst, r: _Req) -> bool:
    """Whether any creditor could take some of ``r``'s blocks with a gain; False skips the creditor loop.

    Exact, not a heuristic: a move's gain is the debtor's change (nondecreasing in k: more free
    memory admits more, less context reads faster; largest without a new remote call) plus the
    creditor's change, which is never positive (less free memory, more context). So when the
    debtor's change at the most blocks ``r`` may shed does not beat ``min_gain``, no creditor and
    no k does. (A 1024-instance cluster plans in milliseconds instead of seconds.)
    """
    bs = work.block_size
    return _value(d, cost, bs, _movable(r, cfg)) - _value(d, cost, bs) > cfg.min_gain


def _movable(r: _Req, cfg: PlacementConfig) -> int:
    return cfg.policy.movable(r.blocks.get(r.home, 0), r.total)


def _candidate_ks(k_max: int, deficit: int, n: int) -> list[int]:
    """``n`` block counts spread geometrically over [1, k_max], plus the
    exact deficit, which is where blocked-demand gains stop growing."""
    ks = {k_max}
    if 0 < deficit <= k_max:
        ks.add(deficit)
    if n > 1 and k_max > 1:
        for j in range(n):
            ks.add(max(1, min(k_max, round(k_max ** (j / (n - 1))))))
    return sorted(ks)


def _best_k(
    work: _Work, cost: CostModel, cfg: PlacementConfig, d: _Inst, c: _Inst, r: _Req
) -> Move | None:
    k_max = min(_movable(r, cfg), work.lendable(c, cfg))
    if k_max <= 0:
        return None
    bs = work.block_size
    new_call = 0 if r.blocks.get(c.rank, 0) > 0 else 1
    base_v = _value(d, cost, bs) + _value(c, cost, bs)
    base_b = _blocked(d) + _blocked(c)
    best: tuple[int, float, int] | None = None
    for k in _candidate_ks(k_max, d.waiting - d.free, cfg.candidate_ks):
        unblocked = base_b - (_blocked(d, k) + _blocked(c, -k))
        # creditor: k more blocks of attention work; debtor: k fewer, maybe one more remote call
        gain = _value(d, cost, bs, k, new_call) + _value(c, cost, bs, -k) - base_v
        if gain <= cfg.min_gain:
            continue  # no regret: a move must raise the estimated throughput (admitted demand counts)
        key = (gain, unblocked, -k)
        if best is None or key > best:
            best = key
    if best is None:
        return None
    return Move(r.rid, d.rank, c.rank, -best[2])


def _best_return(work: _Work, cost: CostModel, cfg: PlacementConfig) -> Move | None:
    """Blocks come home: all of a request's blocks on one creditor (one remote call per layer
    fewer) go back when its home has room for them beyond its own queue, keeps
    ``home_headroom`` of its pool free, and the cost model says the cluster gains."""
    bs = work.block_size
    best: tuple[float, Move] | None = None
    for r in work.reqs.values():
        home = work.inst[r.home]
        if not home.alive or home.waiting > 0:
            continue
        for c, k in r.blocks.items():
            cr = work.inst[c]
            if c == r.home or not cr.alive or home.free - k < cfg.home_headroom * home.total:
                continue
            gain = (_value(home, cost, bs, -k, -1) + _value(cr, cost, bs, k)
                    - _value(home, cost, bs) - _value(cr, cost, bs))
            if gain > cfg.min_gain and (best is None or gain > best[0]):
                best = (gain, Move(r.rid, c, r.home, k))
    return best[1] if best is not None else None


def _merge(moves: list[Move]) -> list[Move]:
    """Fold consecutive moves of the same (request, src, dst) into one; order is kept, since a
    later move may need the room an earlier one made."""
    out: list[Move] = []
    for mv in moves:
        last = out[-1] if out else None
        if last is not None and (last.request_id, last.src, last.dst) == (mv.request_id, mv.src, mv.dst):
            out[-1] = Move(mv.request_id, mv.src, mv.dst, last.num_blocks + mv.num_blocks)
        else:
            out.append(mv)
    return out


# --------------------------------------------------------------------------- helpers


def apply_moves(snapshot: ClusterSnapshot, moves: list[Move]) -> ClusterSnapshot:
    """The snapshot after ``moves``, in order; ValueError if one does not fit."""
    if not isinstance(snapshot, ClusterSnapshot):
        raise TypeError(f"snapshot must be a ClusterSnapshot, got {type(snapshot).__name__}")
    work = _Work(snapshot)
    for mv in moves:
        if not isinstance(mv, Move):
            raise TypeError(f"moves must be Move objects, got {type(mv).__name__}")
        work.apply(mv)
    insts = tuple(
        replace(i, free_blocks=work.inst[i.rank].free, lent_blocks=work.inst[i.rank].lent) for i in snapshot.instances
    )
    reqs = tuple(replace(r, blocks=dict(work.reqs[r.request_id].blocks)) for r in snapshot.requests)
    return ClusterSnapshot(insts, reqs, snapshot.block_size)


def lost_requests(snapshot: ClusterSnapshot, moves: list[Move] = ()) -> list[str]:
    """Requests that do not survive the leaving instances once ``moves`` ran:
    those homed on one, and those that still have blocks on one."""
    after = apply_moves(snapshot, list(moves))
    dead = {i.rank for i in after.instances if not i.alive}
    return sorted(
        r.request_id for r in after.requests if r.home in dead or any(r.blocks.get(x, 0) > 0 for x in dead)
    )


def blocked_demand(snapshot: ClusterSnapshot) -> int:
    """Σ over live instances of waiting blocks their free memory cannot admit."""
    return sum(max(0, i.waiting_blocks - i.free_blocks) for i in snapshot.instances if i.alive)


def cluster_throughput(snapshot: ClusterSnapshot, cost: CostModel) -> float:
    """The planner's estimate of the cluster's decode tokens/s (its objective)."""
    work = _Work(snapshot)
    return sum(_value(i, cost, snapshot.block_size) for i in work.inst.values())


def _capacities(snapshot: ClusterSnapshot, cfg: PlacementConfig) -> dict[int, int]:
    """Per live instance, the most blocks a request homed there can hold with empty pools: its own
    pool plus what the others may lend (the policy's request capacity). It depends only on the pool
    sizes, so it is asked once per distinct size (a 1024-instance cluster routes in O(N))."""
    live = [i.total_blocks for i in snapshot.instances if i.alive]
    by_total: dict[int, int] = {}
    out = {}
    for i in snapshot.instances:
        if not i.alive:
            continue
        if i.total_blocks not in by_total:
            others = list(live)
            others.remove(i.total_blocks)
            by_total[i.total_blocks] = cfg.policy.request_capacity(i.total_blocks, others)
        out[i.rank] = by_total[i.total_blocks]
    return out


def capacities(snapshot: ClusterSnapshot, cfg: PlacementConfig) -> dict[int, int]:
    """Per live instance, the most blocks one request homed there can ever hold (pool sizes only)."""
    return _capacities(snapshot, cfg)


def fits_cluster(snapshot: ClusterSnapshot, cfg: PlacementConfig, blocks: int) -> bool:
    """Whether some live instance can ever hold a request of ``blocks`` blocks.

    Judged on pool sizes, not current occupancy: a request that fits waits
    in a queue until memory frees up rather than being rejected.
    """
    if blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    return any(blocks == 0 or cap >= blocks for cap in _capacities(snapshot, cfg).values())


def route(snapshot: ClusterSnapshot, cfg: PlacementConfig, prompt_blocks: int) -> int | None:
    """Home for a new request: among instances that can hold it, the most
    free memory after queued demand, then the fewest running requests;
    None when no instance can, even borrowing."""
    if prompt_blocks < 0:
        raise ValueError(f"prompt_blocks must be >= 0, got {prompt_blocks}")
    caps = _capacities(snapshot, cfg)
    fit = [i for i in snapshot.instances if i.rank in caps and (prompt_blocks == 0 or caps[i.rank] >= prompt_blocks)]
    if not fit:
        return None
    return min(fit, key=route_key).rank


def route_key(i: InstanceState) -> tuple[int, int, int]:
    """``route``'s preference among instances that can hold a request, smallest first: the most free
    memory after queued demand, then the fewest running requests, then the lowest rank. Exported so
    that a caller routing many requests can keep instances sorted by it (the cluster simulator)."""
    return (-(i.free_blocks - i.waiting_blocks), i.batch_size, i.rank)


def loan_gain(snapshot: ClusterSnapshot, cost: CostModel, debtor: int, loans: list[tuple[int, int]], *,
              admits: bool, new_calls: int) -> float:
    """The cost model's estimate of what on-demand borrowing ``loans`` ((creditor, blocks)) adds
    to the cluster's decode tokens/s: the debtor runs one more request (a new one admitted,
    or a running one kept instead of preempting the newest) at the price of ``new_calls``
    more remote calls per layer; each creditor attends over its extra blocks."""
    work = _Work(snapshot)
    bs = work.block_size
    d = work.inst[debtor]
    ctx = d.used * bs
    beta = d.batch if admits else max(0, d.batch - 1)
    gain = cost.throughput(beta + 1, ctx, d.remote_calls + new_calls) - cost.throughput(beta, ctx, d.remote_calls)
    for rank, k in loans:
        c = work.inst[rank]
        gain += (cost.throughput(c.batch, (c.used + k) * bs, c.remote_calls)
                 - cost.throughput(c.batch, c.used * bs, c.remote_calls))
    return gain
