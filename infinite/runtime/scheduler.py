"""Continuous batching with a per-step token budget (vLLM v1 style), admission by
free blocks, and preemption by recompute.

Pure bookkeeping over a BlockAllocator: no tensors, no I/O. Running requests are
served oldest first; when blocks run out the newest running request is
preempted (its blocks freed, pushed to the front of the queue). A waiting
request is admitted only when its whole prompt fits in the free blocks and no
preemption happened in the same step, and it takes all of its prompt's blocks
at once, so the scheduler does not thrash and two long requests never hold
half each. A request admitted over a cached prefix (the allocator's prefix
cache) starts with those tokens computed: its prefill skips them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from infinite.kv.rmanager import blocks_for
from infinite.runtime.allocator import BlockAllocator
from infinite.runtime.request import Request, Status


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # prefix cache, in tokens over admissions (vLLM's prefix_cache_queries / prefix_cache_hits)
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queue operations --------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.release(req)
        req.status = Status.FINISHED

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.release(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def recompute(self, req: Request) -> bool:
        """Free a running request's blocks and queue it first, to be recomputed from its prompt and
        generated tokens (some of its KV was on an instance that is gone). False if not running."""
        if req not in self.running:
            return False
        self._preempt(req)
        return True

    # ---- one step ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        running, grow = self.running, self.allocator.grow  # this loop runs for every request every step
        reqs, counts = out.requests, out.num_new_tokens
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            done = req.num_computed_tokens
            n = min(len(req.prompt_token_ids) + len(req.output_token_ids) - done, budget)
            while not grow(req, done + n):
                victim = running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                reqs.append(req)
                counts.append(n)
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: it was the newest, nothing left to serve
        if out.preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hit = self.allocator.lookup(req)
            # Admit only when the whole prompt (and its first output token) fits; cached blocks that
            # other requests hold already cost no free block.
            if blocks_for(req.num_tokens + 1, self.allocator.block_size) - hit.shared > self.allocator.free_blocks():
                break
            # All of the prompt's blocks at once (all or nothing): two long requests can then
            # never each hold half of what they need and wait on each other.
            cached = self.allocator.start(req, hit)
            if cached is None:
                break
            if req.metrics.first_scheduled_time is None:  # its first admission (not after a preemption)
                req.num_cached_tokens = cached
                req.metrics.first_scheduled_time = time.time()
            req.num_computed_tokens = cached
            self.prefix_queries += req.num_tokens
            self.prefix_hits += cached
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out
