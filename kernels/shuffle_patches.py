"""Triton kernel of ppml::shuffle_patches: one program per (plane, output tile) copies a p × (p·K) block.

The layout is the C++ kernels' (csrc/common/shuffle_patches.h): `planes` planes of H rows of W·K elements, K = 1 for
NCHW and K = C for channels_last, so one patch row is a contiguous run of p·K elements. Values are moved as integers
of the same width, so every dtype (and every NaN payload) is copied bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program moves per inner step: bounds registers for big patches (p = 224, channels_last...).
_MAX_BLOCK = 4096
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _shuffle_patches_kernel(
    src,
    dst,
    perm,
    planes_per_perm,
    height,
    row_len,
    run_len,
    patch,
    tiles_x,
    num_tiles,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // num_tiles
    t = pid - plane * num_tiles
    src_tile = tl.load(perm + (plane // planes_per_perm) * num_tiles + t)
    # perm is validated before launch; the clamp keeps even a corrupted key inside the image.
    src_tile = tl.minimum(tl.maximum(src_tile, 0), num_tiles - 1)
    ty = t // tiles_x
    tx = t - ty * tiles_x
    sy = src_tile // tiles_x
    sx = src_tile - sy * tiles_x
    rows = tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_X)[None, :]
    for r0 in range(0, patch, BLOCK_R):
        r = r0 + rows
        src_row = (plane * height + sy * patch + r) * row_len + sx * run_len
        dst_row = (plane * height + ty * patch + r) * row_len + tx * run_len
        for x0 in range(0, run_len, BLOCK_X):
            x = x0 + cols
            mask = (r < patch) & (x < run_len)
            v = tl.load(src + src_row + x, mask=mask)
            tl.store(dst + dst_row + x, v, mask=mask)


def block_sizes(patch: int, run_len: int) -> tuple[int, int]:
    block_x = min(triton.next_power_of_2(run_len), _MAX_BLOCK)
    block_r = max(1, min(triton.next_power_of_2(patch), _MAX_BLOCK // block_x))
    return block_r, block_x


def shuffle_patches_triton(images: torch.Tensor, perm: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Launches the kernel; arguments are already checked by ppml.ops.shuffle_patches (this is its kernel)."""
    B, C, H, W = images.shape
    channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    src = images.contiguous(memory_format=fmt)
    out = torch.empty_like(src, memory_format=fmt)
    if out.numel() == 0:
        return out
    k = C if channels_last else 1
    planes, planes_per_perm = (B, 1) if channels_last else (B * C, C)
    as_int = _INT_OF_SIZE[src.element_size()]
    # The raw buffers in memory order: [planes, H, W*K] either way.
    src_flat = src.permute(0, 2, 3, 1).view(as_int) if channels_last else src.view(as_int)
    dst_flat = out.permute(0, 2, 3, 1).view(as_int) if channels_last else out.view(as_int)
    tiles_x = W // patch_size
    num_tiles = (H // patch_size) * tiles_x
    run_len = patch_size * k
    block_r, block_x = block_sizes(patch_size, run_len)
    grid = (planes * num_tiles,)
    _shuffle_patches_kernel[grid](
        src_flat,
        dst_flat,
        perm.contiguous(),
        planes_per_perm,
        H,
        W * k,
        run_len,
        patch_size,
        tiles_x,
        num_tiles,
        BLOCK_R=block_r,
        BLOCK_X=block_x,
    )
    return out
