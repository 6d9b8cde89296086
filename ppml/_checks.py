"""Neutral checks and the error wording every layer shares (ops, models, attacks, detection, data).

It imports nothing from ppml, so any module may use it without pulling in the op library.
"""

from __future__ import annotations

import math
import numbers

import torch

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


def check_positive_int(value, op: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{op}: {name} must be a positive integer, got {value!r}")


def check_int(value, op: str, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else ``{op}: {name} must be an int >= {minimum}``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{op}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def is_real(value) -> bool:
    """A finite real number that is not a bool (Python or NumPy scalar)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_probability(value, op: str, name: str) -> float:
    """``float(value)`` if it is a real number in [0, 1]; else ``{op}: {name} must be a probability in [0, 1]``."""
    if not is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)
