"""Hardware constants of the simulated devices and links, each with where it comes from.

A ``GpuSpec`` is everything the roofline costs need about one device and the
links around it. The datacenter GPUs carry vendor datasheet numbers plus a
few stated assumptions (achieved fractions, latencies); ``cpu`` is not a
table entry: it is measured on the machine that runs the validation
(``infinite.sim.validate``), so that a prediction can be checked against the
real runtime. docs/sim.md lists every constant with its source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["GpuSpec", "GPUS", "gpu_spec", "GIB"]

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes: float  # device memory
    hbm_bw: float  # bytes/s, peak
    peak_flops: float  # dense bf16 FLOP/s (float32 for cpu)
    bw_eff: float  # achieved share of hbm_bw in memory-bound kernels
    flops_eff: float  # achieved share of peak_flops in compute-bound GEMMs
    gpus_per_node: int
    intra_bw: float  # bytes/s one way between two devices of a node (NVLink)
    intra_latency_s: float  # one message between two devices of a node
    inter_bw: float  # bytes/s one way between devices of different nodes (InfiniBand)
    inter_latency_s: float  # one message across nodes
    ring_hop_intra_s: float  # latency of one hop of a ring all-reduce inside a node
    ring_hop_inter_s: float  # latency of one hop of a ring all-reduce that crosses nodes
    allreduce_base_s: float  # fixed latency of one all-reduce call (kernel launch, protocol setup)
    layer_overhead_s: float  # per layer and step: kernel launches, norms, rotary, activation
    step_overhead_s: float  # per step: scheduling, sampling, host work
    request_overhead_s: float  # per step and request that samples a token: sampling, detokenizing, bookkeeping
    control_rtt_s: float  # one control-plane round trip (a borrow's reservation on a creditor)
    attn_flops_eff: float | None = None  # achieved share in attention kernels (None: as flops_eff)
    decode_pads: bool = False  # decode attention gathers every row's KV padded to the batch's longest (torch path)
    mem_utilization: float = 0.9  # share of hbm the engine may use (vLLM's gpu_memory_utilization default)
    workspace_bytes: float = 2 * GIB  # activations and workspace per device, kept out of the KV pool
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for f in ("hbm_bytes", "hbm_bw", "peak_flops", "intra_bw", "inter_bw"):
            if not getattr(self, f) > 0:
                raise ValueError(f"GpuSpec.{f} must be > 0, got {getattr(self, f)!r}")
        if self.attn_flops_eff is not None and not 0 < self.attn_flops_eff <= 1:
            raise ValueError(f"GpuSpec.attn_flops_eff must be in (0, 1], got {self.attn_flops_eff!r}")
        for f in ("bw_eff", "flops_eff", "mem_utilization"):
            if not 0 < getattr(self, f) <= 1:
                raise ValueError(f"GpuSpec.{f} must be in (0, 1], got {getattr(self, f)!r}")
        for f in ("intra_latency_s", "inter_latency_s", "ring_hop_intra_s", "ring_hop_inter_s", "allreduce_base_s",
                  "layer_overhead_s", "request_overhead_s",
                  "step_overhead_s", "control_rtt_s", "workspace_bytes"):
            if getattr(self, f) < 0:
                raise ValueError(f"GpuSpec.{f} must be >= 0, got {getattr(self, f)!r}")
        if self.gpus_per_node < 1:
            raise ValueError(f"GpuSpec.gpus_per_node must be >= 1, got {self.gpus_per_node}")

    @property
    def bw(self) -> float:
        """Achieved memory bandwidth (bytes/s)."""
        return self.hbm_bw * self.bw_eff

    @property
    def flops(self) -> float:
        """Achieved FLOP/s in GEMMs."""
        return self.peak_flops * self.flops_eff

    @property
    def attn_flops(self) -> float:
        """Achieved FLOP/s in attention."""
        return self.peak_flops * (self.flops_eff if self.attn_flops_eff is None else self.attn_flops_eff)

    def link(self, same_node: bool) -> tuple[float, float]:
        """(latency s, bandwidth bytes/s) of one message between two devices."""
        return (self.intra_latency_s, self.intra_bw) if same_node else (self.inter_latency_s, self.inter_bw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


_IB_200G = 200e9 / 8  # 200 Gb/s InfiniBand HDR, per device (one HCA per GPU, as in DGX A100)

# Stated assumptions shared by the datacenter GPUs (no datasheet gives them).
_ASSUMED = dict(
    bw_eff=0.8,
    flops_eff=0.6,
    intra_latency_s=8e-6,
    inter_latency_s=12e-6,
    ring_hop_intra_s=0.6e-6,
    ring_hop_inter_s=5e-6,
    allreduce_base_s=8e-6,
    layer_overhead_s=20e-6,
    step_overhead_s=1e-3,
    request_overhead_s=10e-6,
    control_rtt_s=200e-6,
)
_SOURCES = {
    "hbm_bytes, hbm_bw, peak_flops, intra_bw": "NVIDIA datasheet of the part (dense BF16 tensor-core FLOP/s; NVLink "
                                               "bandwidth per direction = half the bidirectional figure)",
    "inter_bw": "200 Gb/s InfiniBand HDR per GPU (issue 10; the paper's cluster; DGX A100 has one HCA per GPU)",
    "bw_eff": "assumption: memory-bound decode attention and GEMV kernels reach ~80% of peak HBM bandwidth",
    "flops_eff": "assumption: large prefill GEMMs reach ~60% of peak tensor-core FLOP/s; attention_flops_eff "
                 "unset = the same for FlashAttention",
    "intra_latency_s, inter_latency_s": "assumption: one NCCL send/recv of a small message, ~8 us over NVLink, "
                                        "~12 us across InfiniBand",
    "ring_hop_intra_s": "NCCL tuning model (src/graph/tuning.cc): ring LL hop over NVLink ~0.5 us",
    "ring_hop_inter_s": "assumption: ring hop across InfiniBand incl. the NCCL proxy, ~5 us",
    "allreduce_base_s": "NCCL tuning model ring LL base latency (3.6 us) plus a kernel launch (~4 us); with the "
                        "hops this gives ~16 us for 8 GPUs, the order nccl-tests report for small all-reduces",
    "layer_overhead_s": "assumption: ~10 small kernels per layer (norms, rotary, activation, launches), ~20 us",
    "step_overhead_s": "assumption: host work of one engine step (schedule, prepare inputs), ~1 ms",
    "request_overhead_s": "assumption: host work per request per step (sampling, detokenizing, output), ~10 us",
    "control_rtt_s": "assumption: one RPC round trip to rank 0 and a creditor for a borrow, ~200 us",
    "mem_utilization": "vLLM's default gpu_memory_utilization (0.9)",
    "workspace_bytes": "assumption: activations of a 2048-token step plus CUDA/NCCL workspace, ~2 GiB per device",
    "decode_pads": "paged decode kernels (Triton, FlashAttention) read each row's own KV: no padding",
}

GPUS: dict[str, GpuSpec] = {
    "a100": GpuSpec("a100", 80 * GIB, 2.039e12, 312e12, gpus_per_node=8, intra_bw=300e9, inter_bw=_IB_200G,
                    sources={**_SOURCES, "part": "A100 SXM4 80GB: 2039 GB/s HBM2e, 312 TFLOP/s BF16, NVLink3 600 GB/s"},
                    **_ASSUMED),
    "h100": GpuSpec("h100", 80 * GIB, 3.35e12, 989e12, gpus_per_node=8, intra_bw=450e9, inter_bw=_IB_200G,
                    sources={**_SOURCES, "part": "H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s BF16, NVLink4 900 GB/s"},
                    **_ASSUMED),
    "h200": GpuSpec("h200", 141e9, 4.8e12, 989e12, gpus_per_node=8, intra_bw=450e9, inter_bw=_IB_200G,
                    sources={**_SOURCES, "part": "H200 SXM 141GB: 4.8 TB/s HBM3e, 989 TFLOP/s BF16, NVLink4 900 GB/s"},
                    **_ASSUMED),
}


def gpu_spec(name: str, **overrides: Any) -> GpuSpec:
    """A datacenter GPU by name (``cpu`` comes from ``infinite.sim.validate.cpu_spec``)."""
    if name not in GPUS:
        raise ValueError(f"unknown gpu {name!r}: expected one of {', '.join(GPUS)} (or cpu, measured)")
    return replace(GPUS[name], **overrides) if overrides else GPUS[name]
