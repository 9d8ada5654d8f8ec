"""The ``cpu`` device: constants fitted to steps the real runtime took on this machine.

Why fitted, not a datasheet: a CPU rank of the tiny model spends most of a
step in host work (Python per step and per request), not in bytes or FLOPs,
so the constants that matter can only be measured. ``infinite.sim.validate``
times *probes* on a LocalCluster — groups of identical requests whose
decode time per token (TPOT) and time to first token (TTFT) pin down the
step cost at known batch sizes and context lengths — and ``fit_cpu`` finds
the ``GpuSpec`` whose roofline step cost (``infinite.sim.costs``, the same
function the GPU runs use) best reproduces them. The validation trace is a
different workload, so predicting it is a test, not a refit.

Pure: probes and measurements in, a GpuSpec out; loading and saving are
the only I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from infinite.cluster.cost_model import _gauss
from infinite.sim.costs import InstanceHW, RemotePart, step_cost
from infinite.sim.gpus import GpuSpec
from infinite.sim.models import ModelSpec

__all__ = ["Probe", "CPU_BASE", "predict", "front_door_s", "fit_cpu", "cpu_spec", "save_cpu_spec", "CPU_SPEC_PATHS"]

CPU_SPEC_PATHS = (Path("bench-results/sim-cpu.json"), Path(__file__).resolve().parents[2] / "docs" / "sim-cpu.json")

# Fields the fit does not touch: memory is set per run (--kv-blocks), there is one "node" (the host),
# links are loopback; the remote-path latency is fitted separately (the split probe).
CPU_BASE = GpuSpec(
    "cpu", hbm_bytes=16 * 1024**3, hbm_bw=10e9, peak_flops=50e9, bw_eff=1.0, flops_eff=1.0, gpus_per_node=1024,
    intra_bw=1e9, intra_latency_s=500e-6, inter_bw=1e9, inter_latency_s=500e-6, ring_hop_intra_s=0.0,
    ring_hop_inter_s=0.0, allreduce_base_s=0.0, layer_overhead_s=0.0, step_overhead_s=5e-3,
    request_overhead_s=0.0, control_rtt_s=1e-3, mem_utilization=1.0, workspace_bytes=0.0, decode_pads=True,
    sources={"all": "fitted by `python -m infinite.sim validate` to LocalCluster probes on this machine",
             "decode_pads": "the torch path gathers a decode batch's blocks padded to its longest row "
                            "(infinite/attention/torch_ops.py, _decode_plan): measured, batch 30: 14 ms at "
                            "contexts of 64, 33 ms with one of 700 among 29 of 32"},
)


@dataclass(frozen=True)
class Probe:
    """``batch`` identical requests (``prompt`` tokens, ``output`` generated) on one instance at once.

    ``kind`` "tpot": the decode time per token is measured; "ttft": the time to the first token of a
    lone request; "split" / "ttft-split": TPOT / TTFT of a lone request whose KV spans two
    instances (``remote`` of its tokens on the other)."""

    kind: str
    batch: int
    prompt: int
    output: int
    remote: int = 0


def front_door_s(spec: GpuSpec) -> float:
    """The front door's share of a measured TTFT that ``fit_cpu`` found (0 if it was not fitted)."""
    return float(spec.sources.get("front door latency in TTFT (s)", 0.0))


def predict(spec: GpuSpec, model: ModelSpec, probe: Probe, budget: int = 2048, tp: int = 1) -> float:
    """What the simulator's step cost says the probe measures, in seconds, on an instance of ``tp`` ranks.

    ``ttft``: a lone prompt's chunked prefill (its last ``remote`` tokens in a creditor's blocks, as
    a prompt borrowed at admission has its tail there); ``tpot``: a decode step at the mean context;
    ``split``: a decode step of a lone request with ``remote`` of its tokens on the creditor."""
    hw = InstanceHW(spec, model, tp, (0,))
    B = probe.batch
    if probe.kind in ("ttft", "ttft-split"):
        t, done, edge = 0.0, 0, probe.prompt - probe.remote  # positions >= edge are remote
        while done < probe.prompt:  # chunked prefill, then the first token is sampled at the end
            n = min(budget, probe.prompt - done)
            rb, ri = max(0, min(done, probe.prompt) - edge), max(0, done + n - max(done, edge))
            hb, hi = done - rb, n - ri
            parts = (RemotePart(hw, True, n, ri, rb + ri, n * rb + ri * (n + 1) / 2),) if rb + ri else ()
            t += step_cost(hw, n, int(done + n == probe.prompt), hb + hi, n * hb + hi * (n + 1) / 2, parts).seconds
            done += n
        return t
    ctx = probe.prompt + probe.output / 2  # the mean context over the decode
    if probe.kind == "split":
        local = ctx - probe.remote
        part = RemotePart(hw, True, 1, 0, probe.remote, probe.remote)
        return step_cost(hw, 1, 1, local + 1, local + 1, (part,), requests=1).seconds
    return step_cost(hw, B, B, B * (ctx + 1), B * (ctx + 1), requests=B).seconds


def fit_cpu(model: ModelSpec, probes: list[Probe], measured: list[float], base: GpuSpec = CPU_BASE,
            remote: Callable[[GpuSpec, Probe], float] | None = None, tp: int = 1) -> GpuSpec:
    """Least relative squared error over the local probes: a grid over FLOP/s, bandwidth and the
    attention kernels' share of the FLOP/s, and for each point the best non-negative per-step and
    per-request overheads and the front door's share of a TTFT (they enter linearly);
    then the remote latency from the split probes (what the local fit leaves unexplained, per layer).
    ``tp``: the probes ran on instances of that many ranks (the simulator's tensor-parallel instance:
    work split ``tp`` ways, all-reduces per layer; their fixed latency folds into the per-step overhead)."""
    local = [(p, m) for p, m in zip(probes, measured) if p.kind in ("tpot", "ttft")]
    if len(local) < 3:
        raise ValueError("fit_cpu: need at least 3 local probes")
    best: tuple[float, GpuSpec, float] | None = None
    for fexp, bexp, aeff in _points():
        core = replace(base, peak_flops=10**fexp, hbm_bw=10**bexp, attn_flops_eff=aeff, step_overhead_s=0.0,
                       request_overhead_s=0.0)
        rows, ys = [], []
        for p, m in local:
            steps, sampled = _step_counts(p)
            # relative error: each equation divided by its measurement; a TTFT also carries the front
            # door's latency (submit, route, first output back), a constant of the measurement
            rows.append((steps / m, sampled / m, (p.kind == "ttft") / m))
            ys.append((m - predict(core, model, p, tp=tp)) / m)
        o, r, door = _nnls(rows, ys)
        spec = replace(core, step_overhead_s=o, request_overhead_s=r)
        err = sum(((predict(spec, model, p, tp=tp) + door * (p.kind == "ttft") - m) / m) ** 2 for p, m in local)
        if best is None or err < best[0]:
            best = (err, spec, door)
    spec = replace(best[1], sources={**best[1].sources, "front door latency in TTFT (s)": f"{best[2]:.4g}"})
    split = [(p, m) for p, m in zip(probes, measured) if p.kind in ("split", "ttft-split")]
    if split:
        # The remote path: message latency (decode ships a few hundred bytes per layer) and link
        # bandwidth (a prefill chunk ships MBs of queries and K/V), on a grid, judged by ``remote``
        # (the simulator itself on the probe, with its placement) or the closed form.
        ask = remote or (lambda sp, p: predict(sp, model, p, tp=tp))

        def err(lat: float, bw: float) -> float:
            sp = replace(spec, intra_latency_s=lat, inter_latency_s=lat, intra_bw=bw, inter_bw=bw)
            return sum(((ask(sp, p) + best[2] * (p.kind == "ttft-split")) / m - 1) ** 2 for p, m in split)

        lat, bw = min(((10**a, 10**b) for a in _grid(-5.0, -2.0, 13) for b in _grid(7.0, 10.0, 7)),
                      key=lambda x: err(*x))
        spec = replace(spec, intra_latency_s=lat, inter_latency_s=lat, intra_bw=bw, inter_bw=bw)
    return spec


def _step_counts(p: Probe, budget: int = 2048) -> tuple[int, int]:
    """(steps, sampling requests summed over steps) behind one probe's measurement."""
    if p.kind == "ttft":
        return math.ceil(p.prompt / budget), 1
    return 1, p.batch


def _grid(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _points() -> list[tuple[float, float, float]]:
    """(log10 FLOP/s, log10 bytes/s, attention's share of the FLOP/s) to try."""
    return [(f, b, a) for f in _grid(9.5, 11.5, 17) for b in _grid(9.0, 12.0, 25) for a in (1.0, 0.7, 0.5, 0.35, 0.25)]


def _nnls(rows: list[tuple[float, ...]], ys: list[float]) -> tuple[float, ...]:
    """min ||A x - y|| with x >= 0 for a few columns: every active set, its normal equations solved."""
    k = len(rows[0])

    def err(x: tuple[float, ...]) -> float:
        return sum((sum(a * b for a, b in zip(r, x)) - y) ** 2 for r, y in zip(rows, ys))

    best = tuple([0.0] * k)
    for mask in range(1, 1 << k):
        act = [j for j in range(k) if mask >> j & 1]
        A = [[sum(r[i] * r[j] for r in rows) for j in act] for i in act]
        b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in act]
        sol = _gauss(A, b)  # the cost model's elimination with partial pivoting
        if sol is None or min(sol) < 0:
            continue
        x = [0.0] * k
        for j, v in zip(act, sol):
            x[j] = v
        if err(tuple(x)) < err(best):
            best = tuple(x)
    return best


def save_cpu_spec(spec: GpuSpec, path: str | Path, extra: dict | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"spec": spec.to_dict(), **(extra or {})}, indent=2) + "\n", encoding="utf-8")
    return p


def cpu_spec(path: str | Path | None = None) -> GpuSpec:
    """The last measured cpu constants: ``path``, else bench-results/sim-cpu.json, else docs/sim-cpu.json."""
    paths = [Path(path)] if path is not None else list(CPU_SPEC_PATHS)
    for p in paths:
        if p.is_file():
            return GpuSpec.from_dict(json.loads(p.read_text(encoding="utf-8"))["spec"])
    raise ValueError("no measured cpu constants: run `python -m infinite.sim validate` first "
                     f"(looked in {', '.join(map(str, paths))})")
