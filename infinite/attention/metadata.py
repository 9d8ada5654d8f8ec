"""Metadata of one MicroAttention call: which blocks of one pool a batch of queries reads.

A request's KV may be split across instances; each instance sees only the blocks
it holds, described by their *logical* index in the request (``block_idx``), so
that the causal rule `key_pos <= q_pos` is the same on every part and the
AggregationAttention merge of the parts is exact.

Contract: within a row, ``block_idx`` is strictly ascending over the real
entries (list order is position order). The prefill kernel relies on it to stop
its key loop at the last block its queries can see; ``build`` checks it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass
class MAMetadata:
    cu_q: torch.Tensor  # [R+1] int32: query offsets of each request in q
    q_pos: torch.Tensor  # [T] int64: absolute position of each query token
    block_tables: torch.Tensor  # [R, M] int32: physical block ids in this pool (padding 0)
    block_idx: torch.Tensor  # [R, M] int32: logical index of each block in its request
    num_blocks: torch.Tensor  # [R] int32: real entries per row
    max_q_len: int  # 1 => pure decode batch
    # Mixed batches (max_q_len > 1): which rows run on the split-KV decode kernel (q_len == 1) and
    # which on the prefill kernel (q_len > 1), chosen on the host where q_lens are known, so the
    # kernels read their rows through this indirection (no gather of the block tables, no sync).
    # None (the default, and always for a pure decode batch): one kernel runs every row.
    decode_rows: torch.Tensor | None = None  # [Rd] int32 row ids with one query
    prefill_rows: torch.Tensor | None = None  # [Rp] int32 row ids with more than one query
    max_prefill_q_len: int = 0  # the longest q_len among prefill_rows
    # Split-KV count of the decode kernel; None: a heuristic from host-known shapes. A CUDA-graph
    # runner fixes it per captured bucket so that replays launch what was captured.
    num_splits: int | None = None

    def __getstate__(self) -> dict:
        # Attention backends cache per-step derived tensors on the object under "_" keys
        # (torch_ops: gather buffers of several MB); they are not part of the value.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    @property
    def num_requests(self) -> int:
        return int(self.num_blocks.shape[0])

    @staticmethod
    def mixed_rows(q_lens: list[int], device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """(decode_rows, prefill_rows, max_prefill_q_len) for a batch with these q_lens.

        None, None, 0 unless some row has more than one query (a pure decode batch
        runs every row on the decode kernel). Both row lists are views of one
        int32 tensor: one host-to-device copy. Rows with no query are in neither.
        For callers that build MAMetadata from tensors (the runtime's persistent
        batch); ``build`` uses it too.
        """
        max_q_len = max(q_lens, default=0)
        if max_q_len <= 1:
            return None, None, 0
        dec = [i for i, n in enumerate(q_lens) if n == 1]
        pre = [i for i, n in enumerate(q_lens) if n > 1]
        both = torch.tensor(dec + pre, dtype=torch.int32, device=device)
        return both[:len(dec)], both[len(dec):], max_q_len

    @staticmethod
    def build(
        q_lens: list[int],
        q_starts: list[int],
        blocks: list[list[int]],
        logical: list[list[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> "MAMetadata":
        """Build from Python lists.

        ``q_starts[r]`` is the position of request r's first query token; its
        queries sit at ``q_starts[r] .. q_starts[r] + q_lens[r] - 1``.
        ``blocks[r]`` are the physical ids in this pool, ``logical[r]`` their
        logical index in the request (default ``0..len-1``: the whole request
        is here).
        """
        r = len(q_lens)
        if not (len(q_starts) == len(blocks) == r):
            raise ValueError("q_lens, q_starts and blocks must have one entry per request")
        if logical is not None and len(logical) != r:
            raise ValueError("logical must have one entry per request")
        m = max((len(b) for b in blocks), default=0) or 1
        # Flat padded Python lists and one tensor per field: this runs every step, and two
        # small tensor writes per row cost more than building the lists.
        bt: list[int] = []
        bi: list[int] = []
        for i, b in enumerate(blocks):
            pad = [0] * (m - len(b))
            bt.extend(b)
            bt.extend(pad)
            bi.extend(logical[i] if logical is not None else range(len(b)))
            bi.extend(pad)
        if len(bi) != r * m:
            raise ValueError("each logical[r] must have as many entries as blocks[r]")
        if logical is not None:
            for i, li in enumerate(logical):
                # C-level pairwise check: build already walks every block, this adds no Python loop.
                if not all(map(operator.lt, li, li[1:])):
                    raise ValueError(f"logical[{i}] must be strictly ascending (list order = position order)")
        cu = [0]
        pos: list[int] = []
        for n, s in zip(q_lens, q_starts):
            cu.append(cu[-1] + n)
            pos.extend(range(s, s + n))
        decode_rows, prefill_rows, max_prefill = MAMetadata.mixed_rows(q_lens, device)
        return MAMetadata(
            cu_q=torch.tensor(cu, dtype=torch.int32, device=device),
            q_pos=torch.tensor(pos, dtype=torch.int64, device=device),
            block_tables=torch.tensor(bt, dtype=torch.int32, device=device).view(r, m),
            block_idx=torch.tensor(bi, dtype=torch.int32, device=device).view(r, m),
            num_blocks=torch.tensor([len(b) for b in blocks], dtype=torch.int32, device=device),
            max_q_len=max(q_lens, default=0),
            decode_rows=decode_rows,
            prefill_rows=prefill_rows,
            max_prefill_q_len=max_prefill,
        )
