"""Plain PyTorch patch tokens (uint8/float images → normalised, RS-shuffled ``[B, N, C·p·p]`` tokens): the test
oracle, the fallback kernel and a benchmark baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accumulate_dtype(images_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the normalisation is computed in, by every backend: float64 when the images or the tokens are
    float64, float32 otherwise (then rounded once to ``dtype``)."""
    return torch.float64 if torch.float64 in (images_dtype, dtype) else torch.float32


def patch_tokens(
    images: torch.Tensor,
    patch_size: int,
    perm: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out[b, i, c·p·p + y·p + x] = norm(images[b, c, tile perm[b, i] row y, column x])``, tiles row-major.

    ``norm`` is ``((v / 255) − mean[c]) / std[c]`` for uint8 images and ``(v − mean[c]) / std[c]`` for float ones,
    each step one IEEE-rounded operation in the accumulate dtype (:func:`accumulate_dtype`), then one rounding to
    ``dtype``. The divisors are tensors on the images' device, never Python scalars: CUDA turns division by a scalar
    into a multiplication by its reciprocal, which rounds differently.

    Args:
        images (Tensor[B, C, H, W]): uint8 or float, any strides; ``patch_size`` divides H and W.
        patch_size: p.
        perm (Tensor[B, N] int64, optional): a permutation of ``0..N-1`` per image, N = (H/p)·(W/p); None keeps the
            tiles in order.
        mean, std: C (or 1) values each, or None (0 and 1: no shift, no scaling).
        dtype: the tokens' floating dtype.

    Returns:
        Tensor[B, N, C·p·p] of ``dtype``. Differentiable in float ``images``.
    """
    B, C, H, W = images.shape
    p = patch_size
    th, tw = H // p, W // p
    n = th * tw
    acc = accumulate_dtype(images.dtype, dtype)
    x = images.to(acc)
    if images.dtype == torch.uint8:
        x = x / torch.full((1, 1, 1, 1), 255.0, dtype=acc, device=images.device)
    if mean is not None:
        x = x - torch.tensor(list(mean), dtype=acc, device=images.device).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(list(std), dtype=acc, device=images.device).view(1, -1, 1, 1)
    tiles = x.reshape(B, C, th, p, tw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n, C * p * p)
    if perm is not None:
        tiles = torch.gather(tiles, 1, perm.reshape(B, n, 1).expand(B, n, C * p * p))
    return tiles.to(dtype)


def untoken(tokens: torch.Tensor, patch_size: int, height: int, width: int, perm: torch.Tensor | None = None):
    """The images' layout back from tokens ``[B, N, C·p·p]`` (no normalisation undone): the inverse of the tile
    gather, ``out[b, :, tile perm[b, i]] = tokens[b, i]``. The adjoint of :func:`patch_tokens`'s data movement."""
    B, n, k = tokens.shape
    p = patch_size
    C = k // (p * p)
    th, tw = height // p, width // p
    if perm is not None:
        tokens = torch.empty_like(tokens).scatter_(1, perm.reshape(B, n, 1).expand(B, n, k), tokens)
    return tokens.reshape(B, th, tw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, height, width)
