"""RS ciphertext with the defences the papers ablate, made for measuring attacks on it.

Two knobs on top of plain RS (``ppml.shuffle_patches``), both applied by the data owner before anything leaves:

- **patch drop** (``drop = r``): a share r of each image's tiles is blanked (zeros) in the ciphertext; the model
  trains on the rest (ppml.augment's patch drop does the same as augmentation). The attacker sees which tiles are
  blank but not where they were.
- **gap** (``gap = g``): the image is cut into cells of (p + g)×(p + g) pixels and only the top-left p×p patch of each
  cell is kept, so the g pixel rows and columns between neighbouring patches never leave the owner. Neighbouring
  pieces then no longer share a border, which is what edge-compatibility attacks rely on. The plaintext the attack is
  scored against is those patches in their true cells (a (rows·p)×(cols·p) image), with
  rows = (H − p) // (p + g) + 1 (the last cell needs no gap after it) and cols likewise.

:func:`encrypt_rs_defended` returns everything an experiment needs: the plaintext it corresponds to, the ciphertext,
the key and which tiles are present.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import random_permutations, shuffle_patches
from .._checks import check_int, describe

_OP = "ppml.attacks.encrypt_rs_defended"


@dataclass
class DefendedRS:
    """One batch of defended RS ciphertext.

    Attributes:
        plain (Tensor[B, C, rows·p, cols·p]): the kept patches in their true cells (the input itself when gap = 0).
        encrypted (Tensor[B, C, rows·p, cols·p]): ``shuffle_patches(plain, p, perm)`` with dropped tiles zeroed.
        perm (Tensor[B, N] int64): the key, ``encrypted tile i = plain tile perm[b, i]``.
        present (Tensor[B, N] bool): ciphertext tile i carries content (False: dropped).
        patch_size, drop, gap: the settings.
    """

    plain: Tensor
    encrypted: Tensor
    perm: Tensor
    present: Tensor
    patch_size: int
    drop: float
    gap: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.plain.shape[-2] // self.patch_size, self.plain.shape[-1] // self.patch_size


def gapped_grid(height: int, width: int, patch_size: int, gap: int) -> tuple[int, int]:
    """``(rows, cols)`` of p×p patches cut from an H×W image with ``gap`` pixels between neighbours."""
    return (height - patch_size) // (patch_size + gap) + 1, (width - patch_size) // (patch_size + gap) + 1


def keep_gapped_patches(images: Tensor, patch_size: int, gap: int) -> Tensor:
    """The top-left p×p patch of every (p + gap)-pixel cell, assembled into ``[B, C, rows·p, cols·p]``."""
    p, step = patch_size, patch_size + gap
    rows, cols = gapped_grid(images.shape[-2], images.shape[-1], p, gap)
    span_h, span_w = (rows - 1) * step + p, (cols - 1) * step + p
    x = images[..., :span_h, :span_w]
    if gap:
        # Pad to whole cells so one reshape splits them, then drop each cell's trailing gap.
        x = torch.nn.functional.pad(x, (0, gap, 0, gap))
        b, c = x.shape[:2]
        x = x.reshape(b, c, rows, step, cols, step)[:, :, :, :p, :, :p].reshape(b, c, rows * p, cols * p)
    return x.contiguous()


def encrypt_rs_defended(
    images: Tensor,
    patch_size: int,
    *,
    drop: float = 0.0,
    gap: int = 0,
    generator: torch.Generator | None = None,
) -> DefendedRS:
    """RS-encrypts ``images`` with patch drop and a gap between patches.

    Args:
        images (Tensor[B, C, H, W]): uint8 or floating point.
        patch_size: p >= 1; at least one whole patch must fit (p <= H, W).
        drop: share of each image's tiles blanked, in [0, 1); ``round(drop·N)`` tiles per image, chosen at random.
        gap: pixels discarded between neighbouring patches (>= 0).
        generator: for the keys and the dropped tiles (default: OS entropy, like ``ppml.random_permutations``).

    Returns:
        :class:`DefendedRS`.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"{_OP}: images must be [B, C, H, W], got {describe(images)}")
    check_int(patch_size, _OP, "patch_size", 1)
    check_int(gap, _OP, "gap", 0)
    if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0.0 <= float(drop) < 1.0:
        raise ValueError(f"{_OP}: drop must be a share in [0, 1), got {drop!r}")
    h, w = images.shape[-2:]
    if patch_size > h or patch_size > w:
        raise ValueError(f"{_OP}: patch_size {patch_size} must fit in the image, got {describe(images)}")
    if gap == 0 and (h % patch_size or w % patch_size):
        raise ValueError(f"{_OP}: patch_size {patch_size} must divide H and W (or use a gap), got {describe(images)}")
    plain = keep_gapped_patches(images, patch_size, gap)
    b = plain.shape[0]
    rows, cols = plain.shape[-2] // patch_size, plain.shape[-1] // patch_size
    n = rows * cols
    perm = random_permutations(b, n, generator=generator)
    encrypted, _ = shuffle_patches(plain, patch_size, perm.to(plain.device))
    present = torch.ones(b, n, dtype=torch.bool)
    dropped = round(float(drop) * n)
    if dropped:
        # The first `dropped` entries of a fresh random order per image are the tiles to blank.
        order = torch.argsort(torch.rand(b, n, generator=generator), dim=1)
        present.scatter_(1, order[:, :dropped], False)
        tiles = encrypted.reshape(b, -1, rows, patch_size, cols, patch_size)
        mask = present.reshape(b, 1, rows, 1, cols, 1).to(encrypted.device)
        encrypted = torch.where(mask, tiles, torch.zeros((), dtype=tiles.dtype, device=tiles.device))
        encrypted = encrypted.reshape(b, -1, rows * patch_size, cols * patch_size)
    return DefendedRS(plain, encrypted, perm, present, patch_size, float(drop), gap)
