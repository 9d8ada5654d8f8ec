"""Where one request's KV blocks are: runs of (instance, count) from its oldest block to its newest.

The counts-only twin of the runtime's rBlock table: the simulator needs to
know which token positions sit on which instance (attention runs where the
KV lives; a prefill chunk ships K/V to remote blocks) but not block ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Layout"]


@dataclass
class Layout:
    home: int
    runs: list[list[int]] = field(default_factory=list)
    held: dict[int, int] = field(default_factory=dict)
    epoch: int = 0  # bumped when the request gives back all its blocks (a move in flight is then void)
    remote_n: int = 0  # blocks on other instances

    @property
    def total(self) -> int:
        return sum(self.held.values())

    def _count(self, inst: int, n: int) -> None:
        self.held[inst] = self.held.get(inst, 0) + n
        if inst != self.home:
            self.remote_n += n

    def append(self, inst: int, n: int) -> None:
        self.insert(None, inst, n)

    def insert(self, at: int | None, inst: int, n: int) -> None:
        """``n`` blocks on ``inst`` at block position ``at`` (None: after the newest)."""
        if n <= 0:
            return
        if at is None or at >= self.total:
            if self.runs and self.runs[-1][0] == inst:
                self.runs[-1][1] += n
            else:
                self.runs.append([inst, n])
        else:
            out: list[list[int]] = []
            pos = 0
            for run in self.runs:
                if pos <= at < pos + run[1]:
                    head = at - pos
                    if head:
                        out.append([run[0], head])
                    out.append([inst, n])
                    out.append([run[0], run[1] - head])
                else:
                    out.append(list(run))
                pos += run[1]
            self.runs = _merged(out)
        self._count(inst, n)

    def remote(self) -> dict[int, int]:
        return {i: n for i, n in self.held.items() if i != self.home and n > 0}

    def full_on(self, inst: int, full_blocks: int) -> int:
        """Blocks on ``inst`` among the request's first ``full_blocks`` (those whose tokens are final)."""
        out = pos = 0
        for where, cnt in self.runs:
            if pos >= full_blocks:
                break
            if where == inst:
                out += min(cnt, full_blocks - pos)
            pos += cnt
        return out

    def move_oldest(self, n: int, src: int, dst: int) -> None:
        """The request's ``n`` oldest blocks on ``src`` now live on ``dst`` (a migration finished)."""
        if self.held.get(src, 0) < n:
            raise ValueError(f"cannot move {n} blocks from {src}, the request has {self.held.get(src, 0)} there")
        out: list[list[int]] = []
        left = n
        for inst, cnt in self.runs:
            if inst == src and left > 0:
                take = min(cnt, left)
                left -= take
                out.append([dst, take])
                if cnt > take:
                    out.append([inst, cnt - take])
            else:
                out.append([inst, cnt])
        self.runs = _merged(out)
        self.held[src] -= n
        if src != self.home:
            self.remote_n -= n
        self._count(dst, n)

    def tokens_at(self, start: int, end: int, block_size: int) -> dict[int, int]:
        """How many of the token positions [start, end) fall in blocks on each instance."""
        out: dict[int, int] = {}
        pos = 0
        for inst, cnt in self.runs:
            lo, hi = pos, pos + cnt * block_size
            a, b = max(lo, start), min(hi, end)
            if b > a:
                out[inst] = out.get(inst, 0) + b - a
            pos = hi
            if pos >= end:
                break
        return out


def _merged(runs: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for inst, cnt in runs:
        if cnt <= 0:
            continue
        if out and out[-1][0] == inst:
            out[-1][1] += cnt
        else:
            out.append([inst, cnt])
    return out
