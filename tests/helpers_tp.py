"""Tensor-parallel model runs for the tests: one rank of a gloo group per process.

``python tests/helpers_tp.py CKPT TP RANK PORT OUT`` loads rank RANK's shard of CKPT, runs
``greedy`` with the group, and (rank 0) saves the tokens and logits to OUT; every rank saves
its weight bytes to OUT.rankR. ``run_group`` starts the TP processes, waits, and tears them down.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def greedy(model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor | None]:
    """Prefill ``prompt`` then decode ``steps`` tokens greedily through the runtime's forward (one
    request, a local pool): -> (tokens, logits [steps, V] float32; None on ranks other than the first)."""
    from infinite.attention import MAMetadata
    from infinite.kv.cache import KVCache
    from infinite.runtime.model_runner import LocalAttention, StepInputs, forward

    c, bs = model.config, 16
    nblocks = -(-(len(prompt) + steps) // bs)
    kv = KVCache(c.num_layers, nblocks, bs, c.num_kv_heads, c.head_dim, torch.float32)
    tokens, logits, ids = list(prompt), [], list(prompt)
    start = 0
    for _ in range(steps):
        n = len(ids)
        meta = MAMetadata.build([n], [start], [list(range(nblocks))])
        inputs = StepInputs(torch.tensor(ids), meta.q_pos, torch.arange(start, start + n), meta,
                            torch.tensor([n - 1]), [], [n], [start], max_position=start + n - 1)
        out = forward(model, inputs, LocalAttention(kv, inputs, c.head_dim ** -0.5))
        start += n
        if out is None:  # not the group's first rank: it follows the first rank's tokens
            nxt = torch.zeros(1, dtype=torch.int64)
        else:
            logits.append(out[0])
            nxt = out[0].argmax().reshape(1)
        if model.tp is not None:
            model.tp.broadcast(nxt)
        ids = [int(nxt)]
        tokens.append(ids[0])
    return tokens[len(prompt):], (torch.stack(logits) if logits else None)


def weight_bytes(model) -> int:
    """Bytes of the storages behind the parameters (a shard that viewed a whole tensor would show)."""
    seen = {}
    for p in model.parameters():
        st = p.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def run_group(ckpt: str, tp: int, out: Path, prompt: list[int], steps: int, timeout: float = 240.0) -> None:
    from infinite.cluster.rpc_transport import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    arg = ",".join(map(str, prompt))
    procs = [subprocess.Popen([sys.executable, __file__, ckpt, str(tp), str(r), str(port), str(out), arg, str(steps)],
                              env=env) for r in range(tp)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
        assert codes == [0] * tp, f"TP ranks exited with {codes}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    import torch.distributed as dist

    from infinite.model.loader import load_model
    from infinite.model.parallel import TPGroup

    ckpt, tp, rank, port, out, prompt, steps = sys.argv[1:8]
    tp, rank = int(tp), int(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    try:
        model = load_model(ckpt, dtype=torch.float32, tp=TPGroup(None, rank, tp, torch.device("cpu")))
        tokens, logits = greedy(model, [int(t) for t in prompt.split(",")], int(steps))
        torch.save({"bytes": weight_bytes(model), "tokens": tokens}, f"{out}.rank{rank}")
        if rank == 0:
            torch.save({"tokens": tokens, "logits": logits}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
