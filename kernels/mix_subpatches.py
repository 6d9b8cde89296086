"""Triton kernel of ppml::mix_subpatches: one program per band of whole patches (p input rows of one plane, every tile
of them), summing the g² sub-patches of each into q output rows held as a [rows, tiles, q·K] block whose last axis is
one contiguous sub-patch row (q = p/g).

The layout is the shuffle kernel's (kernels/_common.py::PlaneGeometry): `planes` planes of H rows of W·K elements,
K = 1 for NCHW (planes = B·C) and K = C for channels_last (planes = B). One sub-patch row is then a contiguous run of
q·K elements: input column offset (tx·p + j·q)·K, output column offset tx·q·K, in output rows of (W/g)·K elements.
The output band (q rows × (W/g)·K) is contiguous. g, q and q·K are constexprs: the g² loads unroll, and every run
starts at a known multiple of q·K elements, so the loads and stores vectorise up to 16 bytes (NCHW, p = 16, g = 2:
q·K = 8 elements, 32 bytes of float32).

Numerics follow ppml.reference.mix_subpatches exactly: values widen to float32 (float64 for float64 images), the sum
starts from the (0, 0) term and adds one sub-patch at a time in row-major (i, j) order, the mean multiplies by the
float 1/g², and the result is rounded once to the output dtype. The launch turns off mul+add fusion so the weighted
sum rounds each product like the reference does instead of contracting it into an FMA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppml._layout import output_is_channels_last

from ._common import (
    band_coords,
    band_launch_config,
    block_3d,
    memory_format,
    needs_int64,
    plane_geometry,
    plane_view,
    round_to_bfloat16,
    row_align,
)

# Output elements one program holds per step (the [BLOCK_R, BLOCK_T, BLOCK_X] block, padding included). Each of the
# g² loaded blocks is as big, and the unrolled loads are all in flight at once: 2,048 keeps float32 at g = 2 within
# ~100 registers a thread at 4 warps.
_MAX_BLOCK = 2048
# As in the shuffle launcher: bands are grouped until a program moves this many input bytes, while the grid keeps a
# few waves of programs for the 132 SMs of an H100/H200.
_MIN_PROGRAM_BYTES = 16384
_MIN_PROGRAMS = 132 * 8


@triton.jit
def _mix_subpatches_kernel(
    src,
    dst,
    weights,
    num_bands,
    bands_per_program,
    tiles_y,
    planes_per_image,
    height,
    in_row_aligned,
    out_row_aligned,
    tiles_x,
    num_tiles,
    IN_ALIGN: tl.constexpr,
    OUT_ALIGN: tl.constexpr,
    GRID: tl.constexpr,
    SUB: tl.constexpr,
    RUN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_X: tl.constexpr,
    INT64: tl.constexpr,
):
    # W·K and (W/g)·K, known multiples of IN_ALIGN and OUT_ALIGN (see _common.row_align)
    in_row = in_row_aligned * IN_ALIGN
    out_row = out_row_aligned * OUT_ALIGN
    rows = tl.arange(0, BLOCK_R)[:, None, None]
    tiles = tl.arange(0, BLOCK_T)[None, :, None]
    cols = tl.arange(0, BLOCK_X)[None, None, :]
    for k in range(0, bands_per_program):
        live, plane, ty = band_coords(k, bands_per_program, num_bands, tiles_y, INT64)
        in_row0 = plane * height + ty * (GRID * SUB)  # first input row of the band
        out_row0 = plane * (height // GRID) + ty * SUB
        # The g² weights of each (image, patch) of the band; NCHW planes of one image share them.
        w_band = weights + ((plane // planes_per_image) * num_tiles + ty * tiles_x) * (GRID * GRID)
        for t0 in range(0, tiles_x, BLOCK_T):
            t = t0 + tiles
            t_ok = live & (t < tiles_x)
            w_t = w_band + t * (GRID * GRID)
            in_col = t * (GRID * RUN)
            out_col = t * RUN
            for r0 in range(0, SUB, BLOCK_R):
                r = r0 + rows
                in_base = (in_row0 + r) * in_row + in_col
                out_off = (out_row0 + r) * out_row + out_col
                for x0 in range(0, RUN, BLOCK_X):
                    x = x0 + cols
                    mask = t_ok & (r < SUB) & (x < RUN)
                    # The reference's order: start from the (0, 0) term (not from zero: 0 + (-0.0) would lose the
                    # sign of a zero), then add one sub-patch at a time, i outer, j inner, each product rounded
                    # before its add.
                    acc = tl.load(src + in_base + x, mask=mask, other=0).to(ACC)
                    if HAS_WEIGHTS:
                        acc = tl.load(w_t, mask=t_ok, other=0) * acc
                    for ij in tl.static_range(1, GRID * GRID):
                        i = ij // GRID
                        j = ij % GRID
                        v = tl.load(src + in_base + (i * SUB) * in_row + (j * RUN + x), mask=mask, other=0).to(ACC)
                        if HAS_WEIGHTS:
                            v = tl.load(w_t + ij, mask=t_ok, other=0) * v
                        acc = acc + v
                    if not HAS_WEIGHTS:
                        # SCALE is the host's double 1/g², rounded to ACC here exactly as torch rounds a Python scalar.
                        acc = acc * tl.full([], SCALE, ACC)
                    if dst.dtype.element_ty == tl.bfloat16:
                        out = round_to_bfloat16(acc)
                    else:
                        out = acc.to(dst.dtype.element_ty)
                    tl.store(dst + out_off + x, out, mask=mask)


def block_sizes(sub: int, run: int, tiles_x: int = 1) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_X) for q = ``sub`` output rows × ``tiles_x`` tiles × ``run`` = q·K elements, at most
    _MAX_BLOCK in all."""
    return block_3d(sub, tiles_x, run, _MAX_BLOCK)


def launch_config(geo, sub: int, element_size: int, out_element_size: int) -> dict:
    """Block sizes, bands per program, grid and warps for a plane geometry (p×p patches), q = ``sub`` and the input and
    output widths (bytes)."""
    run = sub * geo.interleave
    blocks = block_sizes(sub, run, geo.tiles_x)
    warp_size = max(element_size, out_element_size)
    return band_launch_config(geo, blocks, element_size, warp_size, _MIN_PROGRAM_BYTES, _MIN_PROGRAMS)


# (shape, layout, p, g, widths, accumulation dtype, keyed, tunables) -> (grid, int arguments, constexprs and options)
# of a launch, derived once per shape: at B = 1 deriving them (geometry, blocks, grid; triton.cdiv and next_power_of_2
# are constexpr_function objects on triton 3.8, several µs each) cost more than the kernel. The tunables are in the key
# so that monkeypatching them (the tests do) takes effect.
_PLANS: dict = {}


def _plan(shape, channels_last, p, g, element_size, out_element_size, acc_t, has_weights):
    key = (shape, channels_last, p, g, element_size, out_element_size, acc_t, has_weights)
    key += (_MIN_PROGRAMS, _MIN_PROGRAM_BYTES)
    plan = _PLANS.get(key)
    if plan is None:
        q = p // g
        geo = plane_geometry(shape, channels_last, p)
        cfg = launch_config(geo, q, element_size, out_element_size)
        out_row = (shape[3] // g) * geo.interleave
        ints = (
            cfg["num_bands"],
            cfg["bands_per_program"],
            geo.tiles_y,
            geo.planes_per_perm,
            geo.height,
            geo.row_units // row_align(geo.row_units),
            out_row // row_align(out_row),
            geo.tiles_x,
            geo.num_tiles,
        )
        consts = dict(
            IN_ALIGN=row_align(geo.row_units),
            OUT_ALIGN=row_align(out_row),
            GRID=g,
            SUB=q,
            RUN=q * geo.interleave,
            HAS_WEIGHTS=has_weights,
            # The reference's expression, in double; the kernel rounds it to the accumulation dtype.
            SCALE=1.0 if has_weights else 1.0 / (g * g),
            ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_X=cfg["BLOCK_X"],
            num_warps=cfg["num_warps"],
            # No FMA contraction: the reference rounds w·x before adding it, and so must we to match it bit for bit.
            enable_fp_fusion=False,
        )
        if len(_PLANS) >= 1024:  # a caller sweeping shapes: start over rather than grow without bound
            _PLANS.clear()
        plan = _PLANS[key] = (cfg["grid"], ints, consts)
    return plan


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
    acc_t = torch.float64 if images.dtype == torch.float64 else torch.float32
    out_t = torch.float32 if images.dtype == torch.uint8 else images.dtype
    channels_last = output_is_channels_last(images)
    fmt = memory_format(channels_last)
    src = images.contiguous(memory_format=fmt)
    out = torch.empty((B, C, H // g, W // g), dtype=out_t, device=images.device, memory_format=fmt)
    if out.numel() == 0:
        return out
    if weights is None:
        # Never read (HAS_WEIGHTS=False), but the pointer argument needs a tensor of the accumulation dtype.
        w = torch.empty(1, dtype=acc_t, device=images.device)
    else:
        w = weights.to(device=images.device, dtype=acc_t).contiguous()
    key = (src.shape, channels_last, p, g, src.element_size(), out.element_size(), acc_t, weights is not None)
    grid_, ints, consts = _plan(*key)
    _mix_subpatches_kernel[grid_](
        plane_view(src, channels_last), plane_view(out, channels_last), w, *ints, INT64=needs_int64(src, out), **consts
    )
    return out
