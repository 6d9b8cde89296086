"""Triton kernel of ppml::mix_subpatches: one program per (plane, patch) sums the g² sub-patches of one p×p patch into
one q × (q·K) output block (q = p/g).

The layout is the shuffle kernel's: `planes` planes of H rows of W·K elements, K = 1 for NCHW (planes = B·C) and
K = C for channels_last (planes = B). One sub-patch row is then a contiguous run of q·K elements: input column
offset (tx·p + j·q)·K, output column offset tx·q·K, in output rows of (W/g)·K elements.

Numerics follow ppml.reference.mix_subpatches exactly: values widen to float32 (float64 for float64 images), the sum
starts from the (0, 0) term and adds one sub-patch at a time in row-major (i, j) order, the mean multiplies by the
float 1/g², and the result is rounded once to the output dtype. The launch turns off mul+add fusion so the weighted
sum rounds each product like the reference does instead of contracting it into an FMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _round_to_bfloat16

# Elements one program holds per inner step (the accumulator and one loaded block): bounds registers for big patches.
_MAX_BLOCK = 4096


@triton.jit
def _mix_subpatches_kernel(
    src,
    dst,
    weights,
    planes_per_batch,
    height,
    in_row_len,
    out_row_len,
    patch,
    sub,
    grid,
    k,
    tiles_x,
    num_tiles,
    HAS_WEIGHTS: tl.constexpr,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // num_tiles
    t = pid - plane * num_tiles
    ty = t // tiles_x
    tx = t - ty * tiles_x
    run_len = sub * k
    # The g² weights of this (image, patch); NCHW planes of one image share them.
    w_row = weights + ((plane // planes_per_batch) * num_tiles + t) * grid * grid
    # Row indices are int64 (from pid) before they meet the row lengths: a plane, or even the q-row band between two
    # sub-patch rows, may pass 2^31 elements while every argument still fits int32.
    in_row0 = plane * height + ty * patch
    out_row0 = plane * (height // grid) + ty * sub
    in_col0 = tx * patch * k
    out_col0 = tx * run_len
    sub_step = tl.cast(sub, tl.int64) * in_row_len  # from sub-patch row i to row i + 1
    rows = tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK_X)[None, :]
    for r0 in range(0, sub, BLOCK_R):
        r = r0 + rows
        for x0 in range(0, run_len, BLOCK_X):
            x = x0 + cols
            mask = (r < sub) & (x < run_len)
            ptrs = src + ((in_row0 + r) * in_row_len + in_col0 + x)
            # The reference's order: start from the (0, 0) term (not from zero: 0 + (-0.0) would lose the sign of a
            # zero), then add one sub-patch at a time, i outer, j inner, each product rounded before its add.
            acc = tl.load(ptrs, mask=mask, other=0).to(ACC)
            if HAS_WEIGHTS:
                acc = tl.load(w_row) * acc
            for j in range(1, grid):
                v = tl.load(ptrs + j * run_len, mask=mask, other=0).to(ACC)
                if HAS_WEIGHTS:
                    v = tl.load(w_row + j) * v
                acc = acc + v
            w_i = w_row
            for _ in range(1, grid):  # sub-patch rows i = 1 .. g-1
                ptrs += sub_step
                w_i += grid
                for j in range(0, grid):
                    v = tl.load(ptrs + j * run_len, mask=mask, other=0).to(ACC)
                    if HAS_WEIGHTS:
                        v = tl.load(w_i + j) * v
                    acc = acc + v
            if not HAS_WEIGHTS:
                # SCALE is the host's double 1/g², rounded to ACC here exactly as torch rounds a Python scalar.
                acc = acc * tl.full([], SCALE, ACC)
            if dst.dtype.element_ty == tl.bfloat16:
                out = _round_to_bfloat16(acc)
            else:
                out = acc.to(dst.dtype.element_ty)
            tl.store(dst + ((out_row0 + r) * out_row_len + out_col0 + x), out, mask=mask)


def block_sizes(sub: int, run_len: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_X) for q = ``sub`` output rows of ``run_len`` = q·K elements, at most _MAX_BLOCK in all."""
    block_x = min(triton.next_power_of_2(run_len), _MAX_BLOCK)
    block_r = max(1, min(triton.next_power_of_2(sub), _MAX_BLOCK // block_x))
    return block_r, block_x


def mix_subpatches_triton(
    images: torch.Tensor, patch_size: int, grid: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Launches the kernel; arguments are already checked by ppml.ops.mix_subpatches (this is its kernel).

    Args:
        images (Tensor[B, C, H, W]): uint8, float16, bfloat16, float32 or float64; p divides H and W, g divides p.
        patch_size: p.
        grid: g.
        weights (Tensor[B, N, g*g], optional): any float dtype, converted to the accumulation dtype.

    Returns:
        Tensor[B, C, H/g, W/g]: float32 for uint8 images, else the images' dtype; channels_last when the images are
        channels_last (and not contiguous), contiguous otherwise.
    """
    B, C, H, W = images.shape
    p, g = patch_size, grid
    q = p // g
    acc_t = torch.float64 if images.dtype == torch.float64 else torch.float32
    out_t = torch.float32 if images.dtype == torch.uint8 else images.dtype
    channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    src = images.contiguous(memory_format=fmt)
    out = torch.empty((B, C, H // g, W // g), dtype=out_t, device=images.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    k = C if channels_last else 1
    planes, planes_per_batch = (B, 1) if channels_last else (B * C, C)
    # The raw buffers in memory order: [planes, H, W*K] in, [planes, H/g, (W/g)*K] out, either way.
    src_flat = src.permute(0, 2, 3, 1) if channels_last else src
    dst_flat = out.permute(0, 2, 3, 1) if channels_last else out
    if weights is None:
        # Never read (HAS_WEIGHTS=False), but the pointer argument needs a tensor of the accumulation dtype.
        w = torch.empty(1, dtype=acc_t, device=images.device)
    else:
        w = weights.to(device=images.device, dtype=acc_t).contiguous()
    tiles_x = W // p
    num_tiles = (H // p) * tiles_x
    block_r, block_x = block_sizes(q, q * k)
    _mix_subpatches_kernel[(planes * num_tiles,)](
        src_flat,
        dst_flat,
        w,
        planes_per_batch,
        H,
        W * k,
        (W // g) * k,
        p,
        q,
        g,
        k,
        tiles_x,
        num_tiles,
        HAS_WEIGHTS=weights is not None,
        # The reference's expression, in double; the kernel rounds it to the accumulation dtype.
        SCALE=1.0 if weights is not None else 1.0 / (g * g),
        ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
        BLOCK_R=block_r,
        BLOCK_X=block_x,
        # No FMA contraction: the reference rounds w·x before adding it, and so must we to match it bit for bit.
        enable_fp_fusion=False,
    )
    return out
