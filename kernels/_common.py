"""What the Triton kernels share: numerics helpers and the memory-layout rule (twin of ppml/ops/_common.py and the
C++ headers in csrc/common/)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest even, NaN kept NaN (torch's c10::BFloat16 rounding).

    Done on the bits because the interpreter's own float32 -> bfloat16 cast truncates, so the numerics tested on CPU
    would not be the ones that run on the GPU (where this is a handful of integer ops in a memory-bound kernel).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
