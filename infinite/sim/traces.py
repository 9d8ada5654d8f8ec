"""Request traces: the paper's nine workload shapes as seeded generators, and trace files.

The paper evaluates on three *short* traces (request lengths 1 to 60K tokens)
and six *long* ones (up to 200K ... 2000K tokens), with Poisson arrivals; it
does not publish the generators, so these are ours, with every parameter
stated here and in docs/sim.md. A request's *length* is prompt plus output.

* short traces draw every length from one distribution capped at 60K
  (log-normal, log-uniform, uniform);
* four long traces draw lengths log-uniformly from 2 tokens to their maximum
  (200K, 500K, 1M, 2M): as many requests of 1K-10K as of 100K-1M tokens;
* two "tail" traces are chat-like (the short log-normal) with 5% long
  documents, log-uniform between 60K and 1M or 2M: long requests are rare
  but carry most of the tokens.

Output lengths are log-normal (median 256, capped at 4096 and below the
length). Arrivals are Poisson at ``rate_per_gpu`` requests/s per GPU for
Llama2-7B on A100s, scaled by the device's memory bandwidth and the model's
size for other setups, so a trace loads any cluster about as much: about 1.5
times what the best of the simulated deployments sustains on 32 A100s, so
that throughput measures what a deployment can do, not what was offered.

A trace file is JSON lines: ``{"arrival_s": 0.5, "prompt_len": 1200,
"output_len": 300}`` (``request_id`` optional).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TraceRequest", "TraceSpec", "TRACES", "REPRESENTATIVE", "generate", "load_trace", "save_trace",
           "resolve_trace"]


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"TraceRequest {self.request_id}: arrival_s must be a finite number >= 0")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"TraceRequest {self.request_id}: prompt_len and output_len must be >= 1")

    @property
    def length(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class TraceSpec:
    """Parameters of one generated trace."""

    name: str
    family: str  # short | long
    max_len: int
    rate_per_gpu: float  # requests/s per A100 serving Llama2-7B
    shape: str  # "lognormal" | "loguniform" | "uniform": the distribution of ordinary requests' lengths
    median: float = 2048.0  # lognormal median length
    sigma: float = 1.5  # lognormal shape
    long_share: float = 0.0  # share of requests that are long documents (long family)
    long_min: int = 60_000
    output_median: float = 256.0
    output_sigma: float = 1.0
    output_max: int = 4096

    def describe(self) -> str:
        base = {"lognormal": f"log-normal length (median {self.median:g}, sigma {self.sigma:g})",
                "loguniform": "log-uniform length",
                "uniform": "uniform length"}[self.shape]
        cap = 60_000 if self.long_share else self.max_len
        text = f"{base} in [2, {cap}]"
        if self.long_share:
            text += f"; {self.long_share:.0%} long, log-uniform in [{self.long_min}, {self.max_len}]"
        return text + f"; Poisson, {self.rate_per_gpu:g} req/s per GPU"


TRACES: dict[str, TraceSpec] = {s.name: s for s in (
    TraceSpec("short-lognormal", "short", 60_000, 1.1, "lognormal", median=2048, sigma=1.5),
    TraceSpec("short-loguniform", "short", 60_000, 1.1, "loguniform"),
    TraceSpec("short-uniform", "short", 60_000, 0.22, "uniform"),
    TraceSpec("long-200k", "long", 200_000, 0.28, "loguniform"),
    TraceSpec("long-500k", "long", 500_000, 0.08, "loguniform"),
    TraceSpec("long-1m", "long", 1_000_000, 0.025, "loguniform"),
    TraceSpec("long-2m", "long", 2_000_000, 0.005, "loguniform"),
    TraceSpec("long-1m-tail", "long", 1_000_000, 0.1, "lognormal", long_share=0.05),
    TraceSpec("long-2m-tail", "long", 2_000_000, 0.065, "lognormal", long_share=0.05),
)}

# ``--trace short`` / ``--trace long`` / ``--trace mixed``
REPRESENTATIVE = {"short": "short-loguniform", "long": "long-2m", "mixed": "long-2m-tail"}


def _length(spec: TraceSpec, rng: random.Random) -> int:
    if spec.long_share and rng.random() < spec.long_share:
        return int(math.exp(rng.uniform(math.log(spec.long_min), math.log(spec.max_len))))
    cap = 60_000 if spec.long_share else spec.max_len
    if spec.shape == "lognormal":
        n = int(rng.lognormvariate(math.log(spec.median), spec.sigma))
    elif spec.shape == "loguniform":
        n = int(math.exp(rng.uniform(math.log(2), math.log(cap))))
    elif spec.shape == "uniform":
        n = rng.randint(2, cap)
    else:
        raise ValueError(f"trace {spec.name}: unknown shape {spec.shape!r}")
    return max(2, min(cap, n))


def generate(spec: TraceSpec, duration_s: float, rate: float, seed: int) -> list[TraceRequest]:
    """Poisson arrivals at ``rate`` requests/s for ``duration_s`` seconds; same seed, same trace."""
    if not duration_s > 0 or not rate > 0:
        raise ValueError(f"duration_s and rate must be > 0, got {duration_s}, {rate}")
    rng = random.Random(f"{spec.name}:{seed}")
    out: list[TraceRequest] = []
    t = rng.expovariate(rate)
    while t < duration_s:
        length = _length(spec, rng)
        out_len = int(rng.lognormvariate(math.log(spec.output_median), spec.output_sigma))
        out_len = max(1, min(spec.output_max, length - 1, out_len))
        out.append(TraceRequest(f"{spec.name}-{len(out)}", t, length - out_len, out_len))
        t += rng.expovariate(rate)
    return out


def load_trace(path: str | Path) -> list[TraceRequest]:
    """JSON lines of ``arrival_s``, ``prompt_len``, ``output_len`` (and optionally ``request_id``)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rid = str(d.get("request_id", f"r{i}"))
                out.append(TraceRequest(rid, float(d["arrival_s"]), int(d["prompt_len"]), int(d["output_len"])))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{i}: expected arrival_s, prompt_len, output_len: {err}") from None
    if len({r.request_id for r in out}) != len(out):
        raise ValueError(f"{path}: request ids must be unique")
    out.sort(key=lambda r: (r.arrival_s, r.request_id))
    return out


def save_trace(trace: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in trace:
            f.write(json.dumps({"request_id": r.request_id, "arrival_s": r.arrival_s, "prompt_len": r.prompt_len,
                                "output_len": r.output_len}) + "\n")


def resolve_trace(name: str, duration_s: float, seed: int, load_scale: float, gpus: int,
                  rate: float | None = None) -> tuple[list[TraceRequest], dict]:
    """A trace by name (``short``/``long``/``mixed``, one of TRACES) or file, and what it is.

    ``load_scale`` multiplies the per-GPU rate (1 for Llama2-7B on A100s); ``rate`` overrides it.
    """
    key = REPRESENTATIVE.get(name, name)
    if key in TRACES:
        spec = TRACES[key]
        r = rate if rate is not None else spec.rate_per_gpu * gpus * load_scale
        trace = generate(spec, duration_s, r, seed)
        return trace, {"name": key, "family": spec.family, "rate_per_s": r, "duration_s": duration_s,
                       "seed": seed, "description": spec.describe()}
    if Path(name).is_file():
        trace = load_trace(name)
        return trace, {"name": name, "family": "file", "requests": len(trace)}
    raise ValueError(f"unknown trace {name!r}: expected short, long, mixed, one of {', '.join(TRACES)}, or a file")
