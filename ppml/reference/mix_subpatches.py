"""Plain PyTorch MI encryption (mixing sub-patches): the test oracle, the fallback kernel and a benchmark baseline."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (uint8, float16, bfloat16, float32) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """uint8 images mix to float32 (a mean of integers is not an integer); float dtypes keep their dtype."""
    return torch.float32 if dtype == torch.uint8 else dtype


def mix_subpatches(
    images: torch.Tensor, patch_size: int, grid: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Each p×p patch is cut into a g×g grid of q×q sub-patches (q = p/g); the output holds, at the patch's place, the
    weighted sum of its g² sub-patches (the plain mean when ``weights`` is None).

    The sum runs over sub-patches in row-major order (i, j), one add at a time, in float32 (float64 for float64
    images); the mean multiplies the sum by the float 1/g² — the order and rounding every backend follows.

    Args:
        images (Tensor[B, C, H, W]): uint8, float16, bfloat16, float32 or float64; p divides H and W, g divides p.
        patch_size: p.
        grid: g.
        weights (Tensor[B, N, g*g], optional): per-patch weights (N = (H/p)·(W/p)), row-major over the sub-patch grid.

    Returns:
        Tensor[B, C, H/g, W/g] of ``output_dtype(images.dtype)``; differentiable in images and weights.
    """
    B, C, H, W = images.shape
    p, g = patch_size, grid
    q = p // g
    th, tw = H // p, W // p
    acc_t = accumulation_dtype(images.dtype)
    # [B, C, ty, i, u, tx, j, v]: row ty*p + i*q + u, column tx*p + j*q + v
    x = images.reshape(B, C, th, g, q, tw, g, q).to(acc_t)
    w = None if weights is None else weights.to(acc_t).reshape(B, 1, th, 1, tw, 1, g * g)
    acc = None
    for i in range(g):
        for j in range(g):
            s = x[:, :, :, i, :, :, j, :]  # [B, C, th, q, tw, q]
            term = s if w is None else w[..., i * g + j] * s
            acc = term if acc is None else acc + term
    if weights is None:
        acc = acc * (1.0 / (g * g))
    return acc.reshape(B, C, H // g, W // g).to(output_dtype(images.dtype))
