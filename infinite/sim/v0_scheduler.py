"""The scheduler of vLLM before chunked prefill, as the Infinite-LLM paper measured it (``vllm-multi-paper``).

vLLM 0.2-0.3 (early 2024) schedules a step as *either* a prefill or a decode:

* a prefill step takes whole prompts from the queue, first come first served,
  while their tokens fit the step budget (``max_num_batched_tokens``, at least
  the longest prompt an instance accepts) and their blocks fit the free
  memory beside a 1% watermark (``BlockSpaceManager.can_allocate``); a
  prompt's blocks are all taken at admission, so a long prompt waits until one
  instance has its whole memory free;
* otherwise every running request decodes one token, the newest preempted
  (recomputed later) when a block runs out.

Prefill steps come first whenever a prompt can be admitted, so a long
prompt's prefill stalls every decode of its instance for its whole length.
The project's ``Scheduler`` (chunked prefill, one token budget for both) is
the baseline everything else runs; this one exists only to show what the
paper's baseline cost. Pure bookkeeping over the same ``BlockAllocator``.
"""

from __future__ import annotations

from infinite.kv.rmanager import blocks_for
from infinite.runtime.allocator import BlockAllocator
from infinite.runtime.request import Request, Status
from infinite.runtime.scheduler import ScheduledBatch, Scheduler

__all__ = ["V0Scheduler", "WATERMARK"]

WATERMARK = 0.01  # vLLM's default share of the blocks admission keeps free


class V0Scheduler(Scheduler):
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark: float = WATERMARK) -> None:
        super().__init__(allocator, max_num_seqs, max_num_batched_tokens)
        self.watermark_blocks = int(watermark * allocator.capacity_blocks())

    def admission_blocks(self, req: Request) -> int:
        """Free blocks a queued request needs to be admitted: its prompt's, plus the watermark."""
        return blocks_for(req.num_tokens, self.allocator.block_size) + self.watermark_blocks

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = req.num_tokens - req.num_computed_tokens
            if n > budget or self.admission_blocks(req) > self.allocator.free_blocks():
                break
            if not self.allocator.grow(req, req.num_tokens):
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        if out.requests:
            return out
        i = 0
        while i < len(self.running):  # decode: one token each, oldest first; the newest yields its blocks
            req = self.running[i]
            n = req.num_tokens - req.num_computed_tokens
            while not self.allocator.grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.requests.append(req)
                out.num_new_tokens.append(n)
                i += 1
                continue
            break
        return out
