"""Triton kernel of ppml::shuffle_patches: one program per band of whole tile rows (p image rows of one plane, every
tile of them), moving them as a [rows, tiles, p·K] block whose last axis is one contiguous patch row.

The layout is the C++ kernels' (kernels/_common.py::PlaneGeometry, csrc/common/shuffle_patches.h): `planes` planes of
H rows of W·K elements, K = 1 for NCHW and K = C for channels_last, so one patch row is a contiguous run of p·K
elements. The destination band is contiguous (p rows × W·K), the source is p·K-element runs gathered from the tiles
the key names. Values are moved as integers of the same width, so every dtype (and every NaN payload) is copied bit
for bit.

Why a band and not one tile per program: a 16 × 16 tile is 256 to 2,048 bytes, too little per program to cover the
launch and index cost, and split over 128 threads it leaves 2 elements (8 bytes) per thread, so loads cannot be
16-byte vectors. A band of 14 tiles is 14 times that; the patch row (p·K, a constexpr) is the vectorised axis, its
start a known multiple of 16 elements whenever W·K is.
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
    row_align,
)

# Elements one program holds per step (the [BLOCK_R, BLOCK_T, BLOCK_X] block, padding included): 16 KB of float32,
# 32 elements (two to eight 16-byte vectors) per thread at 4 warps; bounds registers for big patches.
_MAX_BLOCK = 4096
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Bytes one program should move at least before it is worth splitting the work further: below it, bands are grouped
# (uint8 NCHW bands are 3.5 KB at p = 16, W = 224), as long as the grid keeps _MIN_PROGRAMS programs.
_MIN_PROGRAM_BYTES = 16384
_MIN_PROGRAMS = 132 * 8  # a few waves of the 132 SMs of an H100/H200, several programs resident per SM
# Keys of up to this many tiles are checked inside the kernel (histograms of the row, _KEY_BINS values a pass: a
# 4,096-count histogram in one pass took 118 registers on triton 3.8 and spilled on 3.6). p = 16 at 224 px is
# N = 196, one pass; p = 4 at 224 px 3,136, 13 passes over the 25 KB row (L2-resident), in one program per image.
# Longer keys are checked by the op before the launch (ppml.ops._common.check_perm_rows), as the CUDA
# kernel does past its kMaxFusedTiles.
MAX_CHECKED_TILES = 4096
_KEY_CHUNK = 256  # key entries histogrammed per step
_KEY_BINS = 256  # values counted per pass over the key (N = 196 at p = 16, 224 px: one pass)
KEY_MESSAGE = "ppml.shuffle_patches_triton: every row of perm must be a permutation of 0..N-1 (N=(H/p)*(W/p))"
_KEY_MESSAGE = tl.constexpr(KEY_MESSAGE)  # what a jit function may read of a global


@triton.jit
def _uncounted(row, num_tiles, b0, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """How many of the values b0 .. b0+BINS-1 (those below num_tiles) the key row at `row` holds other than once."""
    counts = tl.zeros([BINS], dtype=tl.int32)
    for c0 in range(0, num_tiles, CHUNK):
        i = c0 + tl.arange(0, CHUNK)
        v = tl.load(row + i, mask=i < num_tiles, other=-1)
        ok = (v >= b0) & (v < b0 + BINS) & (v < num_tiles)
        counts += tl.histogram(tl.where(ok, v - b0, 0).to(tl.int32), BINS, mask=ok)
    j = b0 + tl.arange(0, BINS)
    return tl.sum(((counts != 1) & (j < num_tiles)).to(tl.int32), 0)


@triton.jit
def _check_key_row(row, num_tiles, BINS: tl.constexpr, CHUNK: tl.constexpr, PASSES: tl.constexpr):
    """Device-side assert that the key row at `row` is a permutation of 0..num_tiles-1: a histogram of its entries
    must count every value exactly once (N entries, so an out-of-range or repeated entry leaves some value uncounted).
    Values are counted BINS at a time, which bounds the registers the counts take whatever N: one pass when
    BINS >= N (PASSES = 1, known to the compiler), else one pass over the row per BINS values."""
    if PASSES == 1:
        wrong = _uncounted(row, num_tiles, 0, BINS, CHUNK)
    else:
        wrong = 0
        for b0 in range(0, num_tiles, BINS):
            wrong += _uncounted(row, num_tiles, b0, BINS, CHUNK)
    tl.device_assert(wrong == 0, _KEY_MESSAGE)


@triton.jit
def _shuffle_patches_kernel(
    src,
    dst,
    perm,
    num_bands,
    bands_per_program,
    tiles_y,
    planes_per_perm,
    height,
    row_units_aligned,
    tiles_x,
    num_tiles,
    ROW_ALIGN: tl.constexpr,
    PATCH: tl.constexpr,
    RUN_UNITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_X: tl.constexpr,
    INT64: tl.constexpr,
    CHECK_KEY: tl.constexpr,
    KEY_BINS: tl.constexpr,
    KEY_CHUNK: tl.constexpr,
    KEY_PASSES: tl.constexpr,
):
    idx_t = tl.int64 if INT64 else tl.int32
    if CHECK_KEY:
        # One program per image checks its whole key: the one holding its first band. A loop of its own, before the
        # copy, so that the check's registers are not live beside the copy's. Every program clamps the tiles it
        # reads, so no key reads or writes out of bounds before the assert stops the stream.
        for k in range(0, bands_per_program):
            live, plane, ty = band_coords(k, bands_per_program, num_bands, tiles_y, INT64)
            if live & (ty == 0) & (plane % planes_per_perm == 0):
                _check_key_row(
                    perm + (plane // planes_per_perm) * num_tiles, num_tiles, KEY_BINS, KEY_CHUNK, KEY_PASSES
                )
    row_units = row_units_aligned * ROW_ALIGN  # W·K, a known multiple of ROW_ALIGN (see _common.row_align)
    rows = tl.arange(0, BLOCK_R)[:, None, None]
    tiles = tl.arange(0, BLOCK_T)[None, :, None]
    cols = tl.arange(0, BLOCK_X)[None, None, :]
    for k in range(0, bands_per_program):
        live, plane, ty = band_coords(k, bands_per_program, num_bands, tiles_y, INT64)
        perm_row = perm + (plane // planes_per_perm) * num_tiles + ty * tiles_x
        row0 = plane * height  # first row of the plane
        for t0 in range(0, tiles_x, BLOCK_T):
            t = t0 + tiles
            t_ok = live & (t < tiles_x)
            src_tile = tl.load(perm_row + t, mask=t_ok, other=0).to(idx_t)
            # The clamp keeps even a bad key inside the image (the check above, or the op's, reports it).
            src_tile = tl.minimum(tl.maximum(src_tile, 0), num_tiles - 1)
            sy = src_tile // tiles_x
            sx = src_tile - sy * tiles_x
            src_col = sx * RUN_UNITS
            dst_col = t * RUN_UNITS
            for r0 in range(0, PATCH, BLOCK_R):
                r = r0 + rows
                src_row = (row0 + sy * PATCH + r) * row_units + src_col
                dst_row = (row0 + ty * PATCH + r) * row_units + dst_col
                for x0 in range(0, RUN_UNITS, BLOCK_X):
                    x = x0 + cols
                    mask = t_ok & (r < PATCH) & (x < RUN_UNITS)
                    v = tl.load(src + src_row + x, mask=mask)
                    tl.store(dst + dst_row + x, v, mask=mask)


def block_sizes(patch: int, run_units: int, tiles_x: int = 1) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_X): rows × tiles × elements of one step, a whole patch row per tile first."""
    return block_3d(patch, tiles_x, run_units, _MAX_BLOCK)


def launch_config(geo, element_size: int) -> dict:
    """Block sizes, bands per program, grid and warps, for a plane geometry and element width (bytes)."""
    blocks = block_sizes(geo.patch, geo.run_units, geo.tiles_x)
    return band_launch_config(geo, blocks, element_size, element_size, _MIN_PROGRAM_BYTES, _MIN_PROGRAMS)


def key_check_config(num_tiles: int) -> dict:
    """The kernel's key-check constexprs: on (with a histogram of ``KEY_BINS`` counts) for keys of at most
    MAX_CHECKED_TILES tiles."""
    if num_tiles > MAX_CHECKED_TILES:
        return dict(CHECK_KEY=False, KEY_BINS=1, KEY_CHUNK=1, KEY_PASSES=0)
    bins = min(triton.next_power_of_2(num_tiles), _KEY_BINS)
    # PASSES only tells one pass (1) from several (2): the count itself is the loop's, so N stays a runtime value
    return dict(
        CHECK_KEY=True, KEY_BINS=bins, KEY_CHUNK=min(bins, _KEY_CHUNK), KEY_PASSES=1 if bins >= num_tiles else 2
    )


# (shape, layout, p, element size, tunables) -> (grid, int arguments, constexprs and options) of a launch: everything
# the launcher derives from the shape, once per shape. At B = 1 a launch's host cost is the call (the kernel takes a
# few µs), and deriving it (geometry, blocks, grid; triton.cdiv and next_power_of_2 are constexpr_function objects
# on triton 3.8, several µs each) cost more than the kernel. The tunables are in the key so that monkeypatching them
# (the tests do) takes effect.
_PLANS: dict = {}


def _plan(shape, channels_last: bool, patch_size: int, element_size: int):
    key = (shape, channels_last, patch_size, element_size, _MIN_PROGRAMS, _MIN_PROGRAM_BYTES, _KEY_CHUNK, _KEY_BINS)
    plan = _PLANS.get(key)
    if plan is None:
        geo = plane_geometry(shape, channels_last, patch_size)
        cfg = launch_config(geo, element_size)
        align = row_align(geo.row_units)
        ints = (
            cfg["num_bands"],
            cfg["bands_per_program"],
            geo.tiles_y,
            geo.planes_per_perm,
            geo.height,
            geo.row_units // align,
            geo.tiles_x,
            geo.num_tiles,
        )
        consts = dict(
            ROW_ALIGN=align,
            PATCH=geo.patch,
            RUN_UNITS=geo.run_units,
            BLOCK_R=cfg["BLOCK_R"],
            BLOCK_T=cfg["BLOCK_T"],
            BLOCK_X=cfg["BLOCK_X"],
            **key_check_config(geo.num_tiles),
            num_warps=cfg["num_warps"],
            # Triton compiles device asserts only with debug on; debug also guards every int32 add, sub and mul with
            # an overflow assert (sanitize_overflow), which the kernel's index arithmetic does not need (needs_int64).
            debug=True,
            sanitize_overflow=False,
        )
        if len(_PLANS) >= 1024:  # a caller sweeping shapes: start over rather than grow without bound
            _PLANS.clear()
        plan = _PLANS[key] = (cfg["grid"], ints, consts)
    return plan


def shuffle_patches_triton(images: torch.Tensor, perm: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Launches the kernel (one launch, no host round trip); shapes, dtypes and devices are already checked by
    ppml.ops.shuffle_patches (this is its kernel). Keys of at most MAX_CHECKED_TILES tiles are checked in the kernel:
    a row that is not a permutation stops the stream with a device-side assert (KEY_MESSAGE) on a GPU. The
    interpreter drops device asserts, so on CPU tensors, and for longer keys, the op checks them before the launch."""
    channels_last = output_is_channels_last(images)
    fmt = memory_format(channels_last)
    src = images.contiguous(memory_format=fmt)
    out = torch.empty_like(src, memory_format=fmt)
    if out.numel() == 0:
        return out
    as_int = _INT_OF_SIZE[src.element_size()]
    grid, ints, consts = _plan(src.shape, channels_last, patch_size, src.element_size())
    _shuffle_patches_kernel[grid](
        plane_view(src, channels_last).view(as_int),
        plane_view(out, channels_last).view(as_int),
        perm.contiguous(),
        *ints,
        INT64=needs_int64(src),
        **consts,
    )
    return out
