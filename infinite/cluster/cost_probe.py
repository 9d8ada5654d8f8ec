"""The cost model's starting point, measured on this rank's own model and device.

Why: the gManager must not lend on a guess. Before the heartbeats' step times have been
fitted, a prior whose per-request cost comes from a datacenter GPU would make every loan
look cheap on a CPU (and the other way round). A few forward passes at start-up give the
non-attention time at two batch sizes and the attention time per context token on the
hardware that will run them; the runtime's own step times refine it from there. A prompt
chunk's forward and its causal MicroAttention give the prefill rates the prefill groups'
policy prices a prompt with (``sp_policy.choose_group``); the heartbeats carry decode steps
only, so these stay as probed.
"""

from __future__ import annotations

import torch

from infinite.attention import MAMetadata, micro_attention
from infinite.cluster.cost_model import CostModel
from infinite.cluster.device_timer import DeviceTimer, device_timer


def _best_of(fn, timer: DeviceTimer, repeats: int = 5) -> float:
    fn()  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        timer.start()
        fn()
        best = min(best, timer.elapsed())  # the device's time: on a GPU it waits for the kernels
    return best


@torch.inference_mode()
def measure_cost(model, block_size: int, dtype: torch.dtype, device: torch.device, batch: int = 16,
                 context_blocks: int = 64, timer: DeviceTimer | None = None, chunk_blocks: int = 16) -> CostModel:
    """A CostModel from timing ``model`` here: a + b·β from the non-attention layers at batch 1
    and ``batch``, c from one decode MicroAttention over ``context_blocks`` blocks per layer; the
    prefill rates from a prompt chunk of ``chunk_blocks`` blocks (its non-attention layers, and
    its causal MicroAttention per (query, key) pair). ``timer``: the device's (``device_timer``)
    unless a test hands in another."""
    timer = timer or device_timer(device)
    c = model.config
    layers = c.num_layers

    def non_attention(t: int) -> None:
        ids = torch.zeros(t, dtype=torch.int64, device=device)
        pos = torch.arange(t, dtype=torch.int64, device=device)
        h, res = model.embed(ids), None
        rot = model.rotary(pos, t - 1)
        for i in range(layers):
            q, _, _, res = model.pre_attention(i, h, res, rot)
            h, res = model.post_attention(i, q, res)
        model.compute_logits(h[-1:], res[-1:])

    t1, tb = _best_of(lambda: non_attention(1), timer), _best_of(lambda: non_attention(batch), timer)
    per_request = max(0.0, (tb - t1) / (batch - 1))
    base = max(1e-6, t1 - per_request)
    k = torch.randn(context_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
    q = torch.randn(1, c.num_heads, c.head_dim, dtype=dtype, device=device)
    tokens = context_blocks * block_size
    meta = MAMetadata.build([1], [tokens - 1], [list(range(context_blocks))], device=device)
    ta = _best_of(lambda: micro_attention(q, k, k, meta, c.head_dim ** -0.5), timer)
    chunk = chunk_blocks * block_size
    tc = _best_of(lambda: non_attention(chunk), timer)
    kc = torch.randn(chunk_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
    qc = torch.randn(chunk, c.num_heads, c.head_dim, dtype=dtype, device=device)  # [chunk, nh, d]
    cmeta = MAMetadata.build([chunk], [0], [list(range(chunk_blocks))], device=device)
    tca = _best_of(lambda: micro_attention(qc, kc, kc, cmeta, c.head_dim ** -0.5), timer)
    return CostModel(base_s=base, per_request_s=per_request, per_context_token_s=layers * ta / tokens,
                     num_layers=layers, prefill_token_s=max(0.0, tc - t1) / (chunk - 1),
                     prefill_pair_s=layers * tca / (chunk * (chunk + 1) / 2))
