"""What every op module shares: the ppml op library, the error wording, the memory-layout rule."""

from __future__ import annotations

import torch

from .._checks import check_positive_int, describe  # noqa: F401  (re-exported to the op modules)
from .._layout import output_is_channels_last

# One Library for the namespace: schemas are defined here in Python so the ops exist even without ppml._C.
lib = torch.library.Library("ppml", "DEF")


def empty_output(images: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if output_is_channels_last(images) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or images.dtype, device=images.device, memory_format=fmt)


IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IMAGE_DTYPE_SET = frozenset(IMAGE_DTYPES)  # one hash instead of up to five comparisons, on every call

# (op name, kernel) pairs: the reference-backed kernel each op registers where ppml._C registered none.
_FALLBACKS: list[tuple[str, object]] = []
# (op name, backward, setup_context): autograd in Python for an op whose autograd ppml._C registers in C++
# (csrc/autograd/), for when _C is not there.
_AUTOGRAD_FALLBACKS: list[tuple[str, object, object]] = []


def fallback_kernel(op: str):
    """Marks `fn` as ppml::<op>'s kernel for when ppml._C does not provide one (see register_fallback_kernels)."""

    def deco(fn):
        _FALLBACKS.append((op, fn))
        return fn

    return deco


def autograd_fallback(op: str, backward, setup_context) -> None:
    """Registers ``torch.library.register_autograd(ppml::<op>, backward, setup_context)`` where ppml._C registered no
    autograd kernel for ``op`` (see register_fallback_kernels): never two autograd kernels for one op."""
    _AUTOGRAD_FALLBACKS.append((op, backward, setup_context))


def register_fallback_kernels() -> None:
    """Registers each op's reference kernel for CPU and CUDA, and the Python autograd of the ops in
    _AUTOGRAD_FALLBACKS, where ppml._C registered none. Called by ppml/__init__.py after trying to load _C: one kernel
    per (op, dispatch key), never two (a Python kernel would silently override the C++ one)."""
    from .. import _extension

    for op, fn in _FALLBACKS:
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", key):
                lib.impl(op, fn, key)
                _extension.fallback_registered.add((op, key))
    for op, backward, setup_context in _AUTOGRAD_FALLBACKS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", "Autograd"):
            torch.library.register_autograd(f"ppml::{op}", backward, setup_context=setup_context)
            _extension.fallback_registered.add((op, "Autograd"))


def check_values(ok: torch.Tensor, message) -> None:
    """Checks a property of tensor data (``ok``: a 0-d bool tensor) without making the host wait for a device.

    On CPU a failure raises ``ValueError(message())`` at once (``message`` is called only then, so it may read the
    data to say what was wrong). On a GPU the check is queued as a device-side assert (``torch._assert_async``), as
    torch's own index ops do: the call never synchronises, and a failure stops the stream with ``CUDA error:
    device-side assert triggered`` at the next synchronisation, the message on stderr. Kernels clamp what they index
    with, so a bad value never reads or writes out of bounds either way.
    """
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message())
    else:
        torch._assert_async(ok, message(device_side=True))


def check_images(images, op: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{op}: images must be 4-D [B, C, H, W], got {describe(images)}")
    if images.dtype not in _IMAGE_DTYPE_SET:
        raise TypeError(f"{op}: images must be uint8, float16, bfloat16, float32 or float64, got {describe(images)}")


def check_tile_key(images: torch.Tensor, perm, patch_size: int, op: str) -> int:
    """The checks every op keyed by a tile permutation shares (shuffle_patches, patch_tokens): 4-D images of an image
    dtype, p dividing H and W, ``perm`` None or int64 [B, N] on the images' device. Shapes only (fake tensors pass
    through). Returns N = (H/p)·(W/p)."""
    check_images(images, op)
    check_positive_int(patch_size, op, "patch_size")
    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"{op}: patch_size must divide H and W, got patch_size={patch_size} for H={H}, W={W}")
    n = (H // patch_size) * (W // patch_size)
    if perm is not None:
        if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.dim() != 2 or perm.shape != (B, n):
            raise ValueError(f"{op}: perm must be int64 [B, N] with B={B} and N=(H/p)*(W/p)={n}, got {describe(perm)}")
        if perm.device != images.device:
            raise ValueError(f"{op}: perm must be on the images' device {images.device}, got {describe(perm)}")
    return n


def check_perm_rows(perm: torch.Tensor, op: str) -> None:
    """Every row of ``perm`` a permutation of 0..N-1: an error at once on CPU, a device-side assert on a GPU (no host
    sync; see :func:`check_values`)."""
    if perm.numel() == 0:
        return
    n = perm.shape[1]
    in_range = (perm >= 0) & (perm < n)
    # each in-range value counted once per row; a row is a permutation iff every count is exactly 1
    counts = torch.zeros_like(perm).scatter_add_(1, perm.clamp(0, n - 1), in_range.to(perm.dtype))
    bad_rows = (counts != 1).any(1)

    def message(device_side: bool = False) -> str:
        which = "at least one row is not" if device_side else f"row {int(bad_rows.nonzero()[0, 0])} is not"
        return f"{op}: every row of perm must be a permutation of 0..{n - 1} (N=(H/p)*(W/p)={n}), {which}"

    check_values(~bad_rows.any(), message)
