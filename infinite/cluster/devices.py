"""Which device each rank process of this host runs on.

Why: every rank process (an instance, or a rank of a tensor-parallel group) needs a GPU of
its own; ranks that share cuda:0 each size their pool from the same free memory and the
second dies out of memory, and NCCL between two ranks on one GPU fails. So rank process i of
a host runs on cuda:i, and a host with fewer GPUs than rank processes is refused up front
with the numbers. ``--device cpu`` runs any number of ranks.
"""

from __future__ import annotations


def rank_device(requested: str | None, local_rank: int, local_ranks: int, gpus: int) -> str:
    """The device of rank process ``local_rank`` of the ``local_ranks`` on a host with ``gpus`` GPUs.

    ``requested``: the configured device (None: a GPU when there is one). ValueError, naming the
    settings to change, when the host cannot give every rank process a GPU of its own."""
    kind = None if requested is None else requested.split(":")[0]
    if kind == "cpu" or (requested is None and gpus == 0):
        return "cpu"
    if requested not in (None, "cuda"):
        if local_ranks > 1:
            raise ValueError(f"device {requested!r} names one GPU for {local_ranks} rank processes on this host: "
                             "give --device cuda (rank process i runs on cuda:i) or --device cpu")
        return requested
    check_gpus(local_ranks, gpus)
    return f"cuda:{local_rank}"


def check_gpus(local_ranks: int, gpus: int) -> None:
    """ValueError unless the host has a GPU for each of its rank processes."""
    if gpus < local_ranks:
        have = "no GPU" if gpus == 0 else f"{gpus} GPU{'s' * (gpus > 1)}"
        raise ValueError(f"{local_ranks} rank processes on this host need a GPU each, but it has {have}: lower "
                         "--num-instances or --tensor-parallel-size (instances x tensor-parallel size rank "
                         "processes per host), or run on CPU with --device cpu")


def host_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
