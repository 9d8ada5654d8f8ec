"""What a rank's death (or departure) costs, decided without I/O.

A request's prompt and the tokens generated so far are always known at rank 0
(the home sends cumulative outputs), so a lost rank costs recomputation, not
requests:

* a request whose *home* was on the rank is sent to a survivor with its prompt
  and generated tokens (``resume_message``); the survivor prefills both and
  generates on, so the stream continues with no text repeated or missing, and
  greedy output is the same as in an undisturbed run;
* a request whose home survives but some of whose *KV blocks* were on the rank
  is preempted at home and recomputed there (the scheduler's own preemption:
  blocks freed, the request back at the front of the queue);
* a request that no survivor can ever hold (its prompt plus max_tokens is over
  the shrunken cluster's capacity) ends with a ``rank_lost`` error instead of
  waiting forever.

The runtime (front door, instance) calls these and does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from infinite.cluster import messages as M
from infinite.cluster.policy import LendingPolicy
from infinite.kv.rmanager import blocks_for
from infinite.outputs import OutputAccumulator
from infinite.runtime.request import Request
from infinite.sampling.structured import advance


def homed_on(homes: Mapping[str, int], rank: int) -> list[str]:
    """Requests whose home is ``rank``: rank 0 moves them to survivors."""
    return sorted(rid for rid, h in homes.items() if h == rank)


def capacity_blocks(policy: LendingPolicy, pool_blocks: int, num_serving_peers: int) -> int:
    """The most blocks one request can hold on a home of ``pool_blocks`` with that many serving
    peers (every rank runs the same config, hence the same pool size)."""
    return policy.request_capacity(pool_blocks, [pool_blocks] * max(0, num_serving_peers))


def blocks_needed(num_prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """What a request may come to hold: its prompt plus every token it may generate."""
    return blocks_for(num_prompt_tokens + max_tokens, block_size)


def fits(capacity: int, num_prompt_tokens: int, max_tokens: int, block_size: int) -> bool:
    return blocks_needed(num_prompt_tokens, max_tokens, block_size) <= capacity


def no_room_message(rid: str, need: int, capacity: int, gone: Iterable[int]) -> str:
    ranks = ", ".join(str(r) for r in sorted(gone)) or "?"
    return (f"request {rid} was running on instance(s) that left the cluster ({ranks}); it needs {need} KV blocks "
            f"and the instances left can hold at most {capacity} for one request, so it cannot be recomputed")


def resume_message(req: Request, sofar: OutputAccumulator | None) -> M.AddRequest:
    """The request for its new home: the prompt and everything generated so far (``sofar``: what
    rank 0 assembled from the old home's outputs; None when that home had produced nothing yet)."""
    if sofar is None or sofar.last is None:
        return M.AddRequest(req.request_id, req.prompt_token_ids, req.params, req.max_tokens, req.prompt)
    c = sofar.last.outputs[0]
    return M.AddRequest(
        req.request_id, req.prompt_token_ids, req.params, req.max_tokens, req.prompt,
        output_token_ids=list(sofar.token_ids),
        logprobs=list(sofar.logprobs) if sofar.logprobs is not None else None,
        cumulative_logprob=c.cumulative_logprob or 0.0,
        text_len=len(sofar.text),
        prompt_logprobs_sent=sofar.prompt_logprobs is not None,
    )


def restore_progress(req: Request, msg: M.AddRequest) -> None:
    """Give a request built on its new home the tokens it had generated elsewhere: output ids,
    the detokenizer state and text (rebuilt by feeding the same ids), logprobs, a structured
    output's grammar state (its matcher advanced over the same ids, so the grammar goes on from
    where the output is rather than starting again mid-output), and how much of it rank 0 has (its
    delta outputs go on from there). Its KV is recomputed by the first prefill, which now covers
    prompt + those tokens."""
    req.emitted_chars = msg.text_len
    req.prompt_logprobs_sent = msg.prompt_logprobs_sent
    if not msg.output_token_ids:
        return
    if req.matcher is not None:
        for t in msg.output_token_ids:
            advance(req.matcher, t)
    req.output_token_ids = list(msg.output_token_ids)
    req.emitted_tokens = len(req.output_token_ids)
    if req.detokenizer is not None:
        req.text = "".join(req.detokenizer.add_token(t) for t in msg.output_token_ids)
        req.detok_pos = len(req.output_token_ids)
    if req.logprobs is not None and msg.logprobs is not None:
        req.logprobs = [dict(d) for d in msg.logprobs]
        req.cumulative_logprob = msg.cumulative_logprob
        req.emitted_logprobs = len(req.logprobs)
