"""Triton kernel of ppml::patch_tokens: one program per band of BLOCK_R token rows of one image, each row one source
tile row of p elements, loaded as one contiguous run and stored as one (the token rows of a tile row are contiguous
in the output, p elements each).

The source row offset is declared a multiple of ``ALIGN`` (the largest power of two up to 16 dividing both W and p),
so a uint8 row of p = 16 is one 16-byte load, and its 16 float32 results four 16-byte stores. Each step of the
normalisation is one correctly rounded operation in the accumulate dtype, in the order of csrc/common/patch_tokens.h
(``div_rn``: float32 ``/`` would compile to the approximate ``div.full.f32``), then one rounding to the token dtype as
torch rounds (float64 → float32 → 16-bit; bfloat16 by :func:`_common.round_to_bfloat16`, which the interpreter
does not otherwise reproduce), so the tokens match the reference bit for bit.

channels_last images (NHWC) with C = 3 or 4 take a vector path (``CL_CHANS``): each program row is one tile row of all
C channels, whose p·C source elements are one contiguous run (uint8 p = 16, C = 3: 48 bytes, three 16-byte loads); the
run is loaded as one block, de-interleaved in registers with ``tl.gather`` (column c·BLOCK_X + x takes element x·C + c)
and stored as C token-row segments. Other channels_last shapes load element by element, strided by C.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppml._layout import output_is_channels_last

from ._common import div_rn, needs_int64, round_to_bfloat16, row_align

# Elements one program holds: 2,048 (a [128, 16] block: one 16-element tile row per thread at 4 warps).
_BLOCK = 2048
# Per-channel statistics as device tensors, made once per (values, dtype, device): a host-to-device copy per call
# would make every call wait for the copy engine.
_STATS: dict[tuple, torch.Tensor] = {}


@triton.jit
def _as_token(a, dst, OUT_BF16: tl.constexpr):
    """The normalised values in the tokens' dtype, rounded once (bfloat16 by round_to_bfloat16: see kernels/_common)."""
    if dst.dtype.element_ty == tl.float64:
        o = a
    elif OUT_BF16:
        o = round_to_bfloat16(a.to(tl.float32))
    else:
        o = a.to(tl.float32).to(dst.dtype.element_ty)
    return o


@triton.jit
def _patch_tokens_kernel(
    src,
    dst,
    perm,
    stats,
    rows_per_image,
    programs_per_image,
    chans,
    height,
    width_aligned,
    tiles_x,
    num_tiles,
    HAS_PERM: tl.constexpr,
    FROM_BYTES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACC64: tl.constexpr,
    OUT_BF16: tl.constexpr,
    PATCH: tl.constexpr,
    ALIGN: tl.constexpr,
    OUT_ALIGN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr,
    INT64: tl.constexpr,
    CL_CHANS: tl.constexpr = 0,
    BLOCK_RUN: tl.constexpr = 1,
    BLOCK_C: tl.constexpr = 1,
):
    idx_t = tl.int64 if INT64 else tl.int32
    acc_t = tl.float64 if ACC64 else tl.float32
    pid = tl.program_id(0).to(idx_t)  # one axis (B may pass the 65,535 of the others): image-major
    b = pid // programs_per_image
    if CL_CHANS > 0:
        _tile_rows_nhwc(
            src, dst, perm, stats, b, pid - b * programs_per_image, rows_per_image, height, width_aligned, tiles_x,
            num_tiles, HAS_PERM, FROM_BYTES, acc_t, OUT_BF16, PATCH, CL_CHANS, ALIGN, OUT_ALIGN, BLOCK_R, BLOCK_X,
            BLOCK_RUN, BLOCK_C, idx_t,
        )  # fmt: skip
        return
    r = (pid - b * programs_per_image) * BLOCK_R + tl.arange(0, BLOCK_R).to(idx_t)  # token row: i·C·p + c·p + y
    live = r < rows_per_image
    cp = chans * PATCH
    i = r // cp
    rem = r - i * cp
    c = rem // PATCH
    y = rem - c * PATCH
    if HAS_PERM:
        t = tl.load(perm + b * num_tiles + i, mask=live, other=0).to(idx_t)
        # perm is validated by the op before launch; the clamp keeps even a corrupted key inside the image.
        t = tl.minimum(tl.maximum(t, 0), num_tiles - 1)
    else:
        t = i
    ty = t // tiles_x
    tx = t - ty * tiles_x
    width = width_aligned * ALIGN  # W, a known multiple of ALIGN
    x = tl.arange(0, BLOCK_X)
    mask = live[:, None] & (x < PATCH)[None, :]
    if CHANNELS_LAST:
        pix = (b * height + ty * PATCH + y) * width + tx * PATCH
        v = tl.load(src + (pix[:, None] + x[None, :]) * chans + c[:, None], mask=mask, other=0)
    else:
        row = tl.multiple_of(((b * chans + c) * height + ty * PATCH + y) * width + tx * PATCH, ALIGN)
        v = tl.load(src + row[:, None] + x[None, :], mask=mask, other=0)
    a = v.to(acc_t)
    if FROM_BYTES:
        a = div_rn(a, tl.full([1, 1], 255.0, acc_t))
    m = tl.load(stats + c, mask=live, other=0.0)
    s = tl.load(stats + chans + c, mask=live, other=1.0)
    a = div_rn(a - m[:, None], s[:, None])
    out_row = tl.multiple_of((b * rows_per_image + r) * PATCH, OUT_ALIGN)
    o = _as_token(a, dst, OUT_BF16)
    tl.store(dst + out_row[:, None] + x[None, :], o, mask=mask)


@triton.jit
def _tile_rows_nhwc(
    src, dst, perm, stats, b, program, rows_per_image, height, row_aligned, tiles_x, num_tiles,
    HAS_PERM: tl.constexpr, FROM_BYTES: tl.constexpr, acc_t: tl.constexpr, OUT_BF16: tl.constexpr,
    PATCH: tl.constexpr, CHANS: tl.constexpr, ALIGN: tl.constexpr, OUT_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_RUN: tl.constexpr, BLOCK_C: tl.constexpr, idx_t: tl.constexpr,
):  # fmt: skip
    """BLOCK_R tile rows (token i, row y) of one NHWC image, all CHANS channels: rows_per_image = N·p here, and the
    image rows are ``row_aligned · ALIGN`` = W·C elements long, ALIGN dividing both W·C and p·C, so every run of p·C
    elements starts on an ALIGN boundary and loads as whole vectors."""
    r = program * BLOCK_R + tl.arange(0, BLOCK_R).to(idx_t)  # i·p + y
    live = r < rows_per_image
    i = r // PATCH
    y = r - i * PATCH
    if HAS_PERM:
        t = tl.load(perm + b * num_tiles + i, mask=live, other=0).to(idx_t)
        t = tl.minimum(tl.maximum(t, 0), num_tiles - 1)  # validated before launch; keeps a bad key inside the image
    else:
        t = i
    ty = t // tiles_x
    tx = t - ty * tiles_x
    row_len = row_aligned * ALIGN  # W·C
    run = tl.multiple_of((b * height + ty * PATCH + y) * row_len + tx * (PATCH * CHANS), ALIGN)
    k = tl.arange(0, BLOCK_RUN)
    v = tl.load(src + run[:, None] + k[None, :], mask=live[:, None] & (k < PATCH * CHANS)[None, :], other=0)
    # Column q of the tokens' block is channel c = q // BLOCK_X, pixel x = q % BLOCK_X: run element x·C + c.
    q = tl.arange(0, BLOCK_C * BLOCK_X)
    c = q // BLOCK_X
    x = q - c * BLOCK_X
    col_ok = (x < PATCH) & (c < CHANS)
    take = tl.where(col_ok, x * CHANS + c, 0)
    a = tl.gather(v, tl.broadcast_to(take[None, :], (BLOCK_R, BLOCK_C * BLOCK_X)), 1).to(acc_t)
    if FROM_BYTES:
        a = div_rn(a, tl.full([1, 1], 255.0, acc_t))
    m = tl.load(stats + c, mask=col_ok, other=0.0)
    s = tl.load(stats + CHANS + c, mask=col_ok, other=1.0)
    a = div_rn(a - m[None, :], s[None, :])
    # Token (i, c, y) of image b starts at ((b·N·C + i·C + c)·p + y)·p; rows_per_image·C·p = N·C·p·p.
    out_row = tl.multiple_of((b * rows_per_image * CHANS * PATCH + i * (CHANS * PATCH * PATCH) + y * PATCH), OUT_ALIGN)
    o = _as_token(a, dst, OUT_BF16)
    col = c * (PATCH * PATCH) + x
    tl.store(dst + out_row[:, None] + col[None, :], o, mask=live[:, None] & col_ok[None, :])


def _stats(mean, std, channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    def full(values, absent):
        if values is None:
            return [absent] * channels
        return list(values) * channels if len(values) == 1 else list(values)

    key = (None if mean is None else tuple(mean), None if std is None else tuple(std), channels, dtype, device)
    t = _STATS.get(key)
    if t is None:
        if len(_STATS) > 64:
            _STATS.clear()
        t = torch.tensor(full(mean, 0.0) + full(std, 1.0), dtype=dtype).to(device)
        _STATS[key] = t
    return t


def launch_config(patch: int, width: int) -> dict:
    """Block sizes, alignments and warps for p×p patches of images W wide."""
    block_x = triton.next_power_of_2(patch)
    return {
        "BLOCK_X": block_x,
        "BLOCK_R": max(1, _BLOCK // block_x),
        "ALIGN": min(row_align(width), row_align(patch)),
        "OUT_ALIGN": row_align(patch),
        "num_warps": 4,
    }


def launch_config_nhwc(patch: int, width: int, channels: int, itemsize: int) -> dict | None:
    """The channels_last vector path's blocks for C = 3 or 4 when a tile row's p·C elements start on 16-byte
    boundaries (W·C and p·C multiples of 16 bytes' worth of elements), else None (the element-by-element path)."""
    per_vec = 16 // itemsize
    if channels not in (3, 4) or (width * channels) % per_vec or (patch * channels) % per_vec:
        return None
    block_x = triton.next_power_of_2(patch)
    block_run = triton.next_power_of_2(patch * channels)
    return {
        "BLOCK_X": block_x,
        "BLOCK_RUN": block_run,
        "BLOCK_C": triton.next_power_of_2(channels),
        "BLOCK_R": max(1, _BLOCK // block_run),
        "CL_CHANS": channels,
        "ALIGN": min(row_align(width * channels), row_align(patch * channels)),
        "OUT_ALIGN": row_align(patch),
        "num_warps": 4,
    }


def patch_tokens_triton(images, perm, patch_size, mean, std, dtype, acc_dtype) -> torch.Tensor:
    """Launches the kernel; arguments are already checked by ppml.ops.patch_tokens (this is its kernel)."""
    B, C, H, W = images.shape
    p = patch_size
    n = (H // p) * (W // p)
    out = torch.empty((B, n, C * p * p), dtype=dtype, device=images.device)
    if out.numel() == 0:
        return out
    channels_last = output_is_channels_last(images)
    src = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    cfg = launch_config_nhwc(p, W, C, src.element_size()) if channels_last else None
    if cfg is not None and src.data_ptr() % 16 == 0:
        rows_per_image = n * p  # one program row: a tile row of all C channels
        row_len = W * C
    else:
        cfg = launch_config(p, W)
        rows_per_image = n * C * p
        row_len = W
    programs_per_image = triton.cdiv(rows_per_image, cfg["BLOCK_R"])
    grid = (programs_per_image * B,)
    key = perm.contiguous() if perm is not None else src  # any pointer: never read without HAS_PERM
    extra = {k: cfg[k] for k in ("CL_CHANS", "BLOCK_RUN", "BLOCK_C") if k in cfg}
    _patch_tokens_kernel[grid](
        src,
        out,
        key,
        _stats(mean, std, C, acc_dtype, images.device),
        rows_per_image,
        programs_per_image,
        C,
        H,
        row_len // cfg["ALIGN"],
        W // p,
        n,
        HAS_PERM=perm is not None,
        FROM_BYTES=images.dtype == torch.uint8,
        CHANNELS_LAST=channels_last,
        ACC64=acc_dtype == torch.float64,
        OUT_BF16=dtype == torch.bfloat16,
        PATCH=p,
        ALIGN=cfg["ALIGN"],
        OUT_ALIGN=cfg["OUT_ALIGN"],
        BLOCK_R=cfg["BLOCK_R"],
        BLOCK_X=cfg["BLOCK_X"],
        INT64=needs_int64(src, out),
        num_warps=cfg["num_warps"],
        **extra,
    )
    return out
