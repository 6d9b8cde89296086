"""The device a training process runs on: ``--device`` resolved once, for every engine (``ppml train``,
``ppml detect train`` / ``eval``).

A CUDA device is always returned with an index: ``torch.cuda.set_device`` (and NCCL, DDP, autocast's device, the
memory statistics) need one, and ``torch.cuda.set_device(torch.device("cuda"))`` fails with "Expected a torch.device
with a specified index or an integer, but got:cuda".
"""

from __future__ import annotations

import torch

DEVICE_HELP = (
    "auto (CUDA when available, else CPU), cpu, cuda (the current CUDA device), cuda:N. Under torchrun with several "
    "processes each process uses cuda:LOCAL_RANK: pass cuda or auto (an index other than LOCAL_RANK is an error; "
    "choose the GPUs with CUDA_VISIBLE_DEVICES)"
)


def resolve_device(device: str | torch.device, local_rank: int | None = None, *, op: str = "ppml") -> torch.device:
    """The ``torch.device`` a process trains on; a CUDA device always carries an index.

    Args:
        device: ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            (or any other device string torch accepts, returned as is when it is not CUDA).
        local_rank: this process's ``LOCAL_RANK`` when it is one of several torchrun processes (``WORLD_SIZE`` > 1),
            else None.
        op: the command named in error messages.

    Returns:
        One process (``local_rank`` None): ``cuda`` → ``cuda:{torch.cuda.current_device()}``, ``cuda:N`` as given.
        Several processes: ``cuda`` → ``cuda:{local_rank}`` (one GPU per process), ``cuda:N`` only when N equals
        ``local_rank``.

    Raises:
        ValueError: a device string torch does not parse; CUDA asked for but not available; an index (or
            ``local_rank``) beyond ``torch.cuda.device_count()``; under torchrun, an index other than ``local_rank``
            (every process would otherwise pick the same GPU, or a GPU another process uses).
    """
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{op}: --device must be auto, cpu, cuda or cuda:N, got {device!r} ({exc})") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"{op}: --device {device} requested but torch.cuda.is_available() is False")
    count = torch.cuda.device_count()
    if local_rank is None:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    else:
        if dev.index is not None and dev.index != local_rank:
            raise ValueError(
                f"{op}: --device {device} under torchrun: process LOCAL_RANK={local_rank} uses cuda:{local_rank} "
                f"(one GPU per process); pass --device cuda (choose the GPUs with CUDA_VISIBLE_DEVICES)"
            )
        index = local_rank
    if not 0 <= index < count:
        where = f"LOCAL_RANK={local_rank}" if local_rank is not None else f"--device {device}"
        raise ValueError(f"{op}: {where} needs cuda:{index}, but torch.cuda.device_count() is {count}")
    return torch.device("cuda", index)


def distributed_backend(device: torch.device) -> str:
    """The ``init_process_group`` backend for a process on ``device``: gloo on CPU; on CUDA, NCCL for CUDA tensors
    and gloo for CPU ones (the trainers all-reduce small CPU tensors of loss and accuracy sums, which an NCCL-only
    group refuses: "No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
