"""The memory-layout rule every backend follows, in one place for Python (the C++ twin is
csrc/common/plane_geometry.h::use_channels_last).

A leaf module (imports nothing from ppml): the op modules' fake kernels promise these strides, and the Triton
launchers (ppml.kernels) choose their geometry by it.
"""

from __future__ import annotations

import torch


def output_is_channels_last(images: torch.Tensor) -> bool:
    """Kernels keep channels_last inputs channels_last and make everything else contiguous. A tensor that is both
    (C = 1, or H = W = 1) counts as contiguous."""
    return not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
