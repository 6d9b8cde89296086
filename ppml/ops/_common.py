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


def fallback_kernel(op: str):
    """Marks `fn` as ppml::<op>'s kernel for when ppml._C does not provide one (see register_fallback_kernels)."""

    def deco(fn):
        _FALLBACKS.append((op, fn))
        return fn

    return deco


def register_fallback_kernels() -> None:
    """Registers each op's reference kernel for CPU and CUDA where ppml._C registered none. Called by
    ppml/__init__.py after trying to load _C: one kernel per (op, dispatch key), never two (a Python kernel would
    silently override the C++ one)."""
    from .. import _extension

    for op, fn in _FALLBACKS:
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", key):
                lib.impl(op, fn, key)
                _extension.fallback_registered.add((op, key))


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
