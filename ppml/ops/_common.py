"""What every op module shares: the ppml op library, the error wording, the memory-layout rule."""

from __future__ import annotations

import torch

# One Library for the namespace: schemas are defined here in Python so the ops exist even without ppml._C.
lib = torch.library.Library("ppml", "DEF")

_DTYPE_NAMES = {
    torch.uint8: "uint8",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bool: "bool",
}


def describe(t) -> str:
    """``int32 [8, 196] on cpu`` — the same wording the C++ checks use (csrc/common/*.h::describe)."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"
    name = _DTYPE_NAMES.get(t.dtype, str(t.dtype).replace("torch.", ""))
    return f"{name} {list(t.shape)} on {t.device}"


def output_is_channels_last(images: torch.Tensor) -> bool:
    """Kernels keep channels_last inputs channels_last and make everything else contiguous (twin of
    csrc/common/shuffle_patches.h::shuffle_use_channels_last); fake kernels must promise the same strides."""
    return not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)


def empty_output(images: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    fmt = torch.channels_last if output_is_channels_last(images) else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or images.dtype, device=images.device, memory_format=fmt)


IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)
