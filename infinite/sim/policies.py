"""How N GPUs become instances under each policy the paper compares.

* ``vllm-multi``: N/k instances of the smallest tensor-parallel degree k that
  holds the model, each on its own (no lending) behind a round-robin load
  balancer, as independent vLLM servers are deployed.
* ``vllm-multi-paper``: the vllm-multi instances as the vLLM the paper
  measured ran them: no chunked prefill (a step prefills whole prompts or
  decodes), admission only when one instance has a whole prompt's memory
  (``infinite.sim.v0_scheduler``).
* ``vllm-multi-routed``: the same instances, routed by the gManager's
  memory-aware ``route`` but never lending: what routing alone buys.
* ``vllm-single``: one instance over all N GPUs: tensor parallel inside a
  node and one pipeline stage per node, as vLLM advises for multi-node serving.
* ``vllm-single-tp``: one instance, tensor parallel over all N GPUs (the
  only multi-GPU mode of the vLLM releases the paper compared against; its
  all-reduces cross InfiniBand).
* ``best-static``: the mix of instance sizes that serves the trace best
  (``candidates`` lists the mixes; the CLI simulates each and keeps the
  best), requests routed to the smallest instance that can hold them.
* ``infinite``: the vllm-multi instances with lending on demand, the
  periodic debtor/creditor placement, and prefill groups for long prompts
  (``sp_policy``: a long prompt's prefill spread over idle instances).

Pure: no simulation here, only layouts and why one is impossible.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinite.sim.costs import weights_fit
from infinite.sim.gpus import GpuSpec
from infinite.sim.models import ModelSpec

__all__ = ["POLICIES", "Deployment", "valid_tp", "min_tp", "tp_pp", "deployment", "best_static_candidates",
           "node_groups"]

POLICIES = ("infinite", "vllm-multi", "vllm-single", "best-static", "vllm-multi-routed", "vllm-single-tp",
            "vllm-multi-paper")


@dataclass(frozen=True)
class Deployment:
    policy: str
    sizes: tuple[int, ...]  # GPUs of each instance
    lending: bool
    route_by_size: bool = False
    gpus_per_node: int = 8
    round_robin: bool = False
    pipeline: bool = True  # instances beyond a node: pipeline stages across nodes (else one TP group)
    groups: bool = False  # long prompts may be prefilled by a group of instances (infinite)
    v0: bool = False  # vLLM before chunked prefill (vllm-multi-paper)

    @property
    def gpus(self) -> int:
        return sum(self.sizes)

    def describe(self) -> str:
        counts: dict[int, int] = {}
        for t in self.sizes:
            counts[t] = counts.get(t, 0) + 1
        def name(size: int) -> str:
            tp, pp = tp_pp(size, self.gpus_per_node) if self.pipeline else (size, 1)
            return f"TP{tp}" + (f"xPP{pp}" if pp > 1 else "")

        return " + ".join(f"{n}x{name(t)}" for t, n in sorted(counts.items(), reverse=True))


def tp_pp(size: int, gpus_per_node: int) -> tuple[int, int]:
    """How an instance of ``size`` GPUs is parallel: tensor parallel inside a node, one pipeline
    stage per node beyond that (vLLM's advice for multi-node serving)."""
    if size <= gpus_per_node:
        return size, 1
    if size % gpus_per_node:
        raise ValueError(f"an instance of {size} GPUs does not split into nodes of {gpus_per_node}")
    return gpus_per_node, size // gpus_per_node


def valid_tp(model: ModelSpec, tp: int) -> bool:
    """vLLM's rule: the query heads split evenly, and KV heads split evenly or are replicated."""
    return tp >= 1 and model.num_heads % tp == 0 and (model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0)


def min_tp(gpu: GpuSpec, model: ModelSpec, gpus: int) -> int:
    """The smallest power-of-two TP degree that holds the model and keeps half the memory for KV."""
    tp = 1
    while tp <= gpus:
        if valid_tp(model, tp) and weights_fit(gpu, model, tp):
            return tp
        tp *= 2
    raise ValueError(f"{model.name} does not fit {gpus} x {gpu.name} with half of the memory left for KV cache")


def deployment(policy: str, gpu: GpuSpec, model: ModelSpec, gpus: int) -> Deployment:
    """The instances of ``policy`` (best-static: its smallest-instance candidate; see candidates)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
    k = min_tp(gpu, model, gpus)
    gpn = gpu.gpus_per_node
    if policy in ("infinite", "vllm-multi", "vllm-multi-routed", "vllm-multi-paper"):
        if gpus % k:
            raise ValueError(f"{gpus} GPUs do not split into TP{k} instances")
        return Deployment(policy, (k,) * (gpus // k), lending=policy == "infinite", gpus_per_node=gpn,
                          round_robin=policy in ("vllm-multi", "vllm-multi-paper"), groups=policy == "infinite",
                          v0=policy == "vllm-multi-paper")
    if policy in ("vllm-single", "vllm-single-tp"):
        pipeline = policy == "vllm-single"
        tp = tp_pp(gpus, gpn)[0] if pipeline else gpus
        if not valid_tp(model, tp):
            raise ValueError(f"{policy}: {tp}-way tensor parallelism does not split {model.name}'s "
                             f"{model.num_heads} heads ({model.num_kv_heads} KV heads)")
        return Deployment(policy, (gpus,), lending=False, gpus_per_node=gpn, pipeline=pipeline)
    return best_static_candidates(gpu, model, gpus)[0]


def best_static_candidates(gpu: GpuSpec, model: ModelSpec, gpus: int) -> list[Deployment]:
    """Static mixes: every uniform size, and m big instances (m a power of two) beside the smallest.

    The first is the uniform smallest size (vllm-multi's layout, routed by size)."""
    k = min_tp(gpu, model, gpus)
    gpn = gpu.gpus_per_node

    def ok(size: int) -> bool:
        try:
            return valid_tp(model, tp_pp(size, gpn)[0])
        except ValueError:
            return False

    sizes = [t for t in (k * 2**i for i in range(16)) if t <= gpus and ok(t) and gpus % t == 0]
    out = [Deployment("best-static", (t,) * (gpus // t), False, True, gpn) for t in sizes]
    for big in sizes[1:]:
        m = 1
        while m * big < gpus:
            rest = gpus - m * big
            if rest % k == 0:
                out.append(Deployment("best-static", (big,) * m + (k,) * (rest // k), False, True, gpn))
            m *= 2
    return out


def node_groups(sizes: tuple[int, ...], gpus_per_node: int) -> list[tuple[int, ...]]:
    """The nodes each instance's GPUs sit on: GPUs handed out in order, largest instances first,
    so an instance of at most a node's GPUs never straddles two nodes."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    nodes: list[tuple[int, ...]] = [()] * len(sizes)
    nxt = 0
    for i in order:
        gs = range(nxt, nxt + sizes[i])
        nodes[i] = tuple(sorted({g // gpus_per_node for g in gs}))
        nxt += sizes[i]
    return nodes
