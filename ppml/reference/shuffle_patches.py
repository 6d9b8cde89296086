"""Plain PyTorch RS patch shuffling: the test oracle, the fallback kernel and a benchmark baseline."""

from __future__ import annotations

import torch


def shuffle_patches(images: torch.Tensor, perm: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``out[b, :, tile i] = images[b, :, tile perm[b, i]]`` with tiles numbered row-major.

    Args:
        images (Tensor[B, C, H, W]): any dtype, any strides; ``patch_size`` divides H and W.
        perm (Tensor[B, N] int64): a permutation of ``0..N-1`` per image, N = (H/p)·(W/p).
        patch_size: p.

    Returns:
        Tensor[B, C, H, W]. Differentiable in ``images`` (a gather).
    """
    B, C, H, W = images.shape
    p = patch_size
    th, tw = H // p, W // p
    n = th * tw
    tiles = images.reshape(B, C, th, p, tw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n, C, p, p)
    picked = torch.gather(tiles, 1, perm.reshape(B, n, 1, 1, 1).expand(B, n, C, p, p))
    return picked.reshape(B, th, tw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
