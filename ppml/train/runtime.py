"""The training runtime: what every ppml training loop shares.

Used by ``ppml train`` (:mod:`ppml.train.trainer`), ``ppml detect train`` (:mod:`ppml.detection.engine`) and the
learned attackers (:mod:`ppml.attacks.kit`), so that they set up torchrun the same way, write checkpoints the same
way, stop on the same signals and check DDP the same way:

- :func:`init_distributed` and :class:`Dist`: this process's rank, its device (CUDA with an index), the process group
  joined under torchrun (gloo on CPU; nccl with gloo for CPU tensors on CUDA).
- :func:`make_run_dir`, :func:`open_checkpoint`, :func:`atomic_save`, :func:`keep_completed_epochs`,
  :func:`write_summary`, :func:`print_result`: the run folder (``checkpoint.pt``, ``metrics.jsonl``,
  ``summary.json``), written by rank 0 only, a checkpoint never half-written.
- :class:`StopRequest`: SIGINT / SIGTERM finish the step, the caller writes a checkpoint and exits.
- :func:`warmup_cosine`: the learning-rate schedule (linear warm-up, cosine decay to ``min_lr``).
- :func:`epoch_order`: each rank's batches of an epoch (torch's DistributedSampler, seeded per epoch).
- :func:`param_digest`, :func:`gather_in_sync`: every rank's state gathered at a checkpoint, with the check that all
  ranks hold the same parameters.
- :func:`any_rank`, :func:`autocast_forward`.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._device import distributed_backend, resolve_device

__all__ = [
    "Dist",
    "StopRequest",
    "any_rank",
    "atomic_save",
    "autocast_forward",
    "epoch_order",
    "gather_in_sync",
    "init_distributed",
    "keep_completed_epochs",
    "make_run_dir",
    "open_checkpoint",
    "param_digest",
    "print_result",
    "warmup_cosine",
    "write_summary",
]


@dataclass
class Dist:
    """This process's place in a torchrun job; the defaults are the one-process case."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints results."""
        return self.rank == 0


def init_distributed(device_arg: str, op: str) -> tuple[Dist, torch.device]:
    """This process's rank and device, the CUDA device made current, the process group joined under torchrun.

    Args:
        device_arg: the ``--device`` value (auto, cpu, cuda, cuda:N).
        op: the command named in error messages.

    Returns:
        ``(Dist, device)``. The device comes from :func:`ppml._device.resolve_device`: CUDA always with an index (a
        bare ``cuda`` is the current CUDA device, or ``cuda:LOCAL_RANK`` when torchrun starts several processes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_arg, d.local_rank if world > 1 else None, op=op)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=distributed_backend(device))
    return d, device


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (a stop request seen by one rank stops all of them at the same step)."""
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def make_run_dir(out: str, d: Dist) -> None:
    """Rank 0 makes the run folder ``out``; every rank waits until it exists."""
    if d.main:
        os.makedirs(out, exist_ok=True)
    if d.world > 1:
        dist.barrier()


def open_checkpoint(path: str, out: str, resume: bool, op: str) -> dict | None:
    """The checkpoint to resume from, or None for a new run.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint at ``path``.
        FileExistsError: a new run in a folder ``out`` that already holds one (it would be overwritten).
    """
    if not resume:
        if os.path.exists(path):
            raise FileExistsError(f"{op}: {out} already holds a run (checkpoint.pt); pass --resume to continue it or "
                                  f"choose another --out")
        return None
    if not os.path.exists(path):
        raise FileNotFoundError(f"{op}: --resume given but there is no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: a crash mid-write never leaves a torn checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def keep_completed_epochs(metrics_path: str, epochs_done: int) -> None:
    """On resume: drops the ``metrics.jsonl`` lines of epochs that will run again (their ``"epoch"`` is
    1-based, so the lines kept are those with ``epoch <= epochs_done``)."""
    kept = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            kept = [ln for ln in fh if ln.strip() and json.loads(ln)["epoch"] <= epochs_done]
    with open(metrics_path, "w") as fh:
        fh.writelines(kept)


def print_result(result: dict, d: Dist) -> None:
    """The run's result as one JSON line on stdout, from rank 0 only (what scripts and the tests parse)."""
    if d.main:
        print(json.dumps(result), flush=True)


def write_summary(out: str, final: dict, d: Dist) -> None:
    """Rank 0 writes ``out/summary.json`` and prints it as the run's last JSON line."""
    if d.main:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(final, fh)
    print_result(final, d)


class StopRequest:
    """SIGINT / SIGTERM: finish the step, write a checkpoint, exit (a second signal exits at once).

    A context manager: inside it, ``signum`` is the first signal received (None until one comes); the loop checks it
    after every step. The previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def warmup_cosine(epochs: int, steps_per_epoch: int, *, lr: float, min_lr: float,
                  warmup_epochs: float) -> Callable[[int], float]:
    """The factor of ``torch.optim.lr_scheduler.LambdaLR`` per step: linear warm-up over ``warmup_epochs``, then
    cosine decay from ``lr`` to ``min_lr`` at the last step (held there after it)."""
    total = epochs * steps_per_epoch
    warm = int(round(warmup_epochs * steps_per_epoch))
    floor = min_lr / lr

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> list[Tensor]:
    """This rank's batches of the epoch, from torch's DistributedSampler (a permutation seeded by seed + epoch, padded
    by wrapping so every rank takes the same number of steps, strided by rank); one process is the world-size-1 case.
    Returns index tensors, so in-memory data are batched directly and a Dataset of batches can take them."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(torch.tensor(list(sampler), dtype=torch.int64).split(batch_size))


def param_digest(model: nn.Module) -> float:
    """Σ (p + p²) over every parameter element, in float64: equal on all ranks exactly when DDP kept them in sync
    (in practice; it is a check, not a hash)."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() + p.detach().double().square().sum().item()
                         for p in model.parameters()))


def gather_in_sync(state: Any, model: nn.Module, d: Dist, op: str) -> tuple[list, list[float]]:
    """Every rank's ``state`` (picklable) and parameter digest, all-gathered under DDP.

    Returns:
        ``(states, digests)``, one entry per rank (one each in a single process).

    Raises:
        RuntimeError: the ranks' parameters differ (DDP is out of sync).
    """
    both = [(state, param_digest(model))]
    if d.world > 1:
        mine = both[0]
        both = [None] * d.world
        dist.all_gather_object(both, mine)
    digests = [dg for _, dg in both]
    if len(set(digests)) != 1:
        raise RuntimeError(f"{op}: ranks hold different parameters (digests {digests}): DDP is out of sync")
    return [s for s, _ in both], digests


def autocast_forward(model: nn.Module, x: Tensor, amp: bool):
    """``model(x)``, under bf16 CUDA autocast when ``amp``."""
    if amp:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)
    return model(x)
