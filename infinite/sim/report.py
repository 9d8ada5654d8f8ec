"""What a simulation run reports: the issue's metrics as one flat dict, tables, plots.

Throughput is the work done while requests arrive: tokens computed for the
first time (prompt tokens prefilled, output tokens generated; recomputation
after a preemption does not count) in steps that end between the first and
the last arrival, over that window. The traces offer more than the cluster
can do, so this is the rate the deployment sustains on that mix; the tail
after the last arrival (stragglers, not capacity) does not dilute it.
``completed_tokens_per_s`` is the other common measure: tokens of completed
requests over the makespan (first arrival to last completion).
TPOT is (last token − first token) / (output − 1) per request; TTFT runs
from arrival to the first token, queueing included.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infinite.bench.workload import percentile
from infinite.sim.engine import SimResult

__all__ = ["summarize", "table_rows", "plot", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["policy", "instances", "throughput_tokens_per_s", "requests_completed", "requests_rejected",
                   "max_context_served", "capacity_tokens", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99",
                   "preemptions", "blocks_moved", "blocks_borrowed"]


def summarize(res: SimResult) -> dict[str, Any]:
    done = res.completed
    first = min((c.arrival_s for c in done), default=0.0)
    last = max((c.finish_s for c in done), default=0.0)
    makespan = max(0.0, last - first)
    tokens = sum(c.prompt_len + c.output_len for c in done)
    out_tokens = sum(c.output_len for c in done)
    ttft = [c.first_token_s - c.arrival_s for c in done]
    tpot = [(c.finish_s - c.first_token_s) / (c.output_len - 1) for c in done if c.output_len > 1]
    rejected = sum(len(v) for v in res.rejected.values())
    return {
        "throughput_tokens_per_s": res.window_tokens / res.window_s if res.window_s > 0 else 0.0,
        "completed_tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "output_tokens_per_s": out_tokens / makespan if makespan > 0 else 0.0,
        "requests_offered": res.offered,
        "requests_completed": len(done),
        "requests_rejected": rejected,
        "rejected_reasons": {k: len(v) for k, v in sorted(res.rejected.items())},
        "max_context_served": max((c.prompt_len + c.output_len for c in done), default=0),
        "capacity_tokens": res.capacity_tokens,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50),
        "tpot_p99": percentile(tpot, 99),
        "preemptions": res.preemptions,
        "moves": res.moves,
        "blocks_moved": res.blocks_moved,
        "moves_cancelled": res.moves_cancelled,
        "borrows": res.borrows,
        "blocks_borrowed": res.blocks_borrowed,
        "requests_with_remote_blocks": sum(c.remote_blocks > 0 for c in done),
        "prefill_groups": res.groups,
        "mean_group_size": res.group_members / res.groups if res.groups else 0.0,
        "group_blocks": res.group_blocks,
        "groups_after_waiting": res.groups_waited,
        "makespan_s": makespan,
        "busy_fraction": res.busy_s / (res.instances * makespan) if makespan > 0 else 0.0,
        "instances": res.instances,
        "steps": res.steps,
        "events": res.events,
    }


def table_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> list[list[Any]]:
    return [[r.get(c) for c in columns] for r in rows]


def plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str, path: str | Path,
         logy: bool = False) -> str | None:
    """A line per series; None (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        pts = sorted(p for p in pts if p[1] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
