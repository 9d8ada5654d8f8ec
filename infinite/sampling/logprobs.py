"""Logprob entries as vLLM reports them: the token's own logprob, then the top k alternatives.

One function for sampled tokens and prompt tokens alike, so that both come out of the
same log-softmax of the raw logits and have the same shape: ``{token: logprob}`` with
the token itself first (vLLM's order), then the top ``k`` best first.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows are log-softmaxed this many at a time: a long prompt's [P, V] float32 block is
# never held twice.
_CHUNK_ROWS = 1024


def logprob_entries(logits: Tensor, token_ids: list[int], ks: list[int]) -> list[dict[int, float]]:
    """logits [M, V] (raw), token_ids [M], ks [M] (top alternatives per row) -> M dicts."""
    out: list[dict[int, float]] = []
    for lo in range(0, logits.shape[0], _CHUNK_ROWS):
        hi = min(lo + _CHUNK_ROWS, logits.shape[0])
        out.extend(_entries(logits[lo:hi], token_ids[lo:hi], ks[lo:hi]))
    return out


def _entries(logits: Tensor, token_ids: list[int], ks: list[int]) -> list[dict[int, float]]:
    lp = logits.float().log_softmax(dim=-1)  # [m, V]
    chosen = torch.tensor(token_ids, dtype=torch.int64, device=lp.device)
    chosen_lp = lp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()  # [m]
    k = max(ks, default=0)
    top_vals: list[list[float]] = []
    top_ids: list[list[int]] = []
    if k > 0:
        vals, ids = lp.topk(min(k, lp.shape[1]), dim=-1)  # [m, k]
        top_vals, top_ids = vals.tolist(), ids.tolist()
    out = []
    for j, (tid, n_top) in enumerate(zip(token_ids, ks)):
        entry = {tid: chosen_lp[j]}
        if n_top:
            for t, val in zip(top_ids[j][:n_top], top_vals[j][:n_top]):
                entry.setdefault(t, val)
        out.append(entry)
    return out


def prompt_logprobs(logits: Tensor, prompt_ids: list[int], first: int, k: int) -> list[dict[int, float]]:
    """Rows of ``logits`` [n, V] are prompt positions first..first+n-1; each scores the next
    prompt token."""
    n = logits.shape[0]
    return logprob_entries(logits, prompt_ids[first + 1 : first + 1 + n], [k] * n)
