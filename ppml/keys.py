"""Keys of the encryptions: per-image patch permutations, from OS entropy unless the caller asks for a seed.

A predictable seed was part of how InstaHide fell, so the default never touches torch's Mersenne Twister: the sort
keys come from os.urandom. Pass a seeded torch.Generator only where reproducibility matters more than secrecy.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ._checks import check_int
from ._import_hooks import after_import


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Moves keys drawn on the host to `device` without making the host wait: a copy from pageable memory
    synchronises with the GPU, one from pinned memory is queued on the stream like any kernel."""
    if device is None:
        return t
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# Drawing keys is a graph break under torch.compile (os.urandom / numpy / a torch.Generator argument cannot be traced):
# compiled code calls the draws eagerly and traces the rest. With fullgraph=True there is nothing to break at, so
# callers pass their keys explicitly (perm=, weights=); see the README's torch.compile note. The public functions look
# the draw up in _DRAW, which holds the torch.compiler.disable'd versions once torch._dynamo is imported (importing it
# here would double `import ppml`'s time; nothing can be compiling before it is imported).
_COMPILE_NOTE = (
    "ppml draws keys outside the graph; with torch.compile(fullgraph=True) pass them explicitly (perm= / weights=)"
)
_DRAW: dict = {}


def _mark_for_dynamo() -> None:
    for name, fn in list(_DRAW.items()):
        _DRAW[name] = torch.compiler.disable(fn, reason=_COMPILE_NOTE)


def random_permutations(
    batch: int,
    num_patches: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draws one uniformly random permutation of ``0..num_patches-1`` per image.

    Args:
        batch: number of permutations B (>= 0).
        num_patches: N, the length of each permutation (>= 1).
        device: where the result lives (default: the generator's device, else CPU).
        generator: a seeded ``torch.Generator`` for reproducible keys; ``None`` (default) uses OS entropy.

    Returns:
        Tensor[B, N] int64, each row a permutation (row i is the key of image i).
    """
    check_int(batch, "ppml.random_permutations", "batch", 0)
    check_int(num_patches, "ppml.random_permutations", "num_patches", 1)
    return _DRAW["random_permutations"](batch, num_patches, device, generator)


def _draw_permutations(batch: int, num_patches: int, device, generator) -> torch.Tensor:
    if generator is None:
        # 63-bit keys from the OS CSPRNG; ties (probability ~N^2/2^64) only fall back to index order.
        raw = np.frombuffer(os.urandom(8 * batch * num_patches), dtype=np.int64).reshape(batch, num_patches)
        keys = torch.from_numpy(raw & np.int64(0x7FFFFFFFFFFFFFFF))
        return to_device(torch.argsort(keys, dim=1, stable=True), device)
    gen_device = generator.device
    keys = torch.randint(0, 2**62, (batch, num_patches), generator=generator, device=gen_device, dtype=torch.int64)
    return to_device(torch.argsort(keys, dim=1, stable=True), device)


def invert_permutations(perm: torch.Tensor) -> torch.Tensor:
    """Inverse of each row of a valid permutation batch: ``inv[b, perm[b, i]] = i``. Differentiable-free, O(B·N)."""
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    return inv.scatter_(-1, perm, ar)


def random_simplex(
    batch: int,
    rows: int,
    k: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[batch, rows, k]`` points uniform on the probability simplex (non-negative, each row summing to 1): normalised
    Exp(1) draws. OS entropy unless a seeded generator is given."""
    if not isinstance(batch, int) or batch < 0 or not isinstance(rows, int) or rows < 0:
        raise ValueError(
            f"ppml.random_mixing_weights: batch and num_patches must be ints >= 0, got {batch!r}, {rows!r}"
        )
    return _DRAW["random_simplex"](batch, rows, k, device, dtype, generator)


def _draw_simplex(batch: int, rows: int, k: int, device, dtype, generator) -> torch.Tensor:
    if generator is None:
        # 53-bit uniforms in (0, 1] from the OS CSPRNG.
        raw = np.frombuffer(os.urandom(8 * batch * rows * k), dtype=np.uint64).reshape(batch, rows, k)
        u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(2**53)
        e = torch.from_numpy(-np.log(u))
    else:
        u = torch.rand((batch, rows, k), generator=generator, device=generator.device, dtype=torch.float64)
        e = -torch.log1p(-u)  # u in [0, 1): 1 - u in (0, 1]
    return to_device((e / e.sum(-1, keepdim=True)).to(dtype), device)


_DRAW.update(random_permutations=_draw_permutations, random_simplex=_draw_simplex)
after_import("torch._dynamo", _mark_for_dynamo)
