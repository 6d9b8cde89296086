"""What the Triton kernels share: numerics helpers and the plane geometry (twin of the C++ headers in csrc/common/);
the memory-layout rule itself is ppml._layout.output_is_channels_last, the one every backend follows."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest even, NaN kept NaN (torch's c10::BFloat16 rounding).

    Done on the bits because the interpreter's own float32 -> bfloat16 cast truncates, so the numerics tested on CPU
    would not be the ones that run on the GPU (where this is a handful of integer ops in a memory-bound kernel).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def div_rn(x, y):
    """IEEE-rounded x / y: float32 `/` compiles to the approximate div.full.f32, and div_rn takes float32 only."""
    if x.dtype == tl.float32:
        r = tl.div_rn(x, y)
    else:
        r = x / y
    return r


@triton.jit
def band_coords(k, bands_per_program, num_bands, tiles_y, INT64: tl.constexpr):
    """(live, plane, ty) of the program's ``k``-th band of the band kernels: whether the band exists (past the last
    band, as the grid rounds up, the masks are empty, so nothing is read or written), its plane and its tile row; the
    indices are int64 where ``INT64``."""
    idx_t = tl.int64 if INT64 else tl.int32
    band = tl.program_id(0).to(idx_t) * bands_per_program + k
    live = band < num_bands
    plane = band // tiles_y
    ty = band - plane * tiles_y
    return live, plane, ty


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def plane_view(dense: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The raw buffer of a dense [B, C, H, W] tensor in memory order, [B, H, W, C] for channels_last and [B, C, H, W]
    otherwise: either way `planes` planes of H rows of W·K elements, which is all the kernels index."""
    return dense.permute(0, 2, 3, 1) if channels_last else dense


class PlaneGeometry(NamedTuple):
    """The images as the kernels see them: `planes` planes of `height` rows of `row_units` elements, a pixel being
    `interleave` consecutive elements. Field names are the C++ ones (csrc/common/shuffle_patches.h ShuffleGeometry;
    MixGeometry calls planes_per_perm ``planes_per_image`` and interleave ``K``); a unit is one element here, as the
    Triton kernels move elements (their loads vectorise to 16 bytes by themselves where alignment allows).

    NCHW: planes = B·C, K = 1, planes_per_perm = C (one plane per channel).
    NHWC: planes = B,   K = C, planes_per_perm = 1 (channels interleaved: a patch row is p·C contiguous elements).
    """

    channels_last: bool
    planes: int  # number of planes
    planes_per_perm: int  # consecutive planes sharing one image's key row (C for NCHW, 1 for NHWC)
    height: int  # H
    row_units: int  # one image row of a plane, W·K elements
    interleave: int  # K: elements per pixel in memory order (1 for NCHW, C for NHWC)
    patch: int  # p
    run_units: int  # one patch row, p·K elements
    tiles_x: int  # W / p
    tiles_y: int  # H / p
    num_tiles: int  # N = (H / p)·(W / p)


def plane_geometry(shape, channels_last: bool, patch: int) -> PlaneGeometry:
    """The geometry of [B, C, H, W] images with p×p patches (p divides H and W, checked by the op) in the layout the
    kernels work in (``ppml._layout.output_is_channels_last``)."""
    B, C, H, W = shape
    k = C if channels_last else 1
    return PlaneGeometry(
        channels_last=channels_last,
        planes=B if channels_last else B * C,
        planes_per_perm=1 if channels_last else C,
        height=H,
        row_units=W * k,
        interleave=k,
        patch=patch,
        run_units=patch * k,
        tiles_x=W // patch,
        tiles_y=H // patch,
        num_tiles=(H // patch) * (W // patch),
    )


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of `tensors` can pass int32: only then do the kernels index in int64 (which
    costs a register pair and slower multiplies on every offset)."""
    return any(t.numel() >= 2**31 for t in tensors)


def row_align(units: int, cap: int = 16) -> int:
    """The largest power of two (at most `cap`) dividing a row length. Kernels take the row length as
    ``units // align`` times a constexpr ``align``, so the compiler knows every row starts at a multiple of it: Triton
    itself only tells "divisible by 16" from "not", and a 56-element row (224 / 4) would lose its 16-byte vectors."""
    return units & -units if units & -units < cap else cap


def block_3d(rows: int, tiles: int, run: int, max_block: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_X), powers of two, for a band of `rows` rows × `tiles` tiles × `run` elements, at most
    `max_block` elements in all: the whole run first (the contiguous, vectorised axis), then as many tiles, then rows,
    so that one program moves whole tile rows side by side."""
    block_x = min(triton.next_power_of_2(run), max_block)
    block_t = max(1, min(triton.next_power_of_2(tiles), max_block // block_x))
    block_r = max(1, min(triton.next_power_of_2(rows), max_block // (block_x * block_t)))
    return block_r, block_t, block_x


def num_warps_for(block_elems: int, elem_bytes: int, max_warps: int = 4) -> int:
    """Warps for a block of `block_elems` elements of `elem_bytes`: as many as give every thread at least one 16-byte
    vector (at most `max_warps`). More threads than that would split a 16-byte run between threads, and the loads
    would narrow to 8 or 4 bytes (a [4, 16, 4] float32 block on 4 warps is 2 elements a thread)."""
    threads = max(1, block_elems * elem_bytes // 16)
    warps = 1
    while warps * 2 <= max_warps and warps * 2 * 32 <= threads:
        warps *= 2
    return warps


def band_launch_config(
    geo: PlaneGeometry,
    blocks: tuple[int, int, int],
    element_size: int,
    warp_element_size: int,
    min_program_bytes: int,
    min_programs: int,
) -> dict:
    """Bands per program, grid and warps of a band kernel (one band = ``geo.patch`` rows of a plane), for its
    (BLOCK_R, BLOCK_T, BLOCK_X) ``blocks``: a program takes bands up to ``min_program_bytes`` of input (``element_size``
    bytes an element) as long as the grid keeps ``min_programs`` programs; the warps follow the block and
    ``warp_element_size``."""
    block_r, block_t, block_x = blocks
    num_bands = geo.planes * geo.tiles_y
    band_bytes = geo.patch * geo.row_units * element_size
    per_program = max(1, min(min_program_bytes // max(band_bytes, 1), num_bands // min_programs))
    return dict(
        num_bands=num_bands,
        bands_per_program=per_program,
        grid=(triton.cdiv(num_bands, per_program),),
        BLOCK_R=block_r,
        BLOCK_T=block_t,
        BLOCK_X=block_x,
        num_warps=num_warps_for(block_r * block_t * block_x, warp_element_size),
    )
