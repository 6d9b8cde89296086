"""Whether the compiled kernels (ppml._C, CUDA) and Triton can be used here, and if not, why not.

ppml._C is imported only when it was built against the running torch (recorded in _build_info.json at build time):
a _C for another torch would fail to load or, worse, load with a mismatched ABI. Without it, ppml still works: the
reference implementation is registered as the CPU kernel of each op.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass, field

import torch


@dataclass
class _State:
    loaded: bool = False
    reason: str | None = "not loaded yet"
    build: dict = field(default_factory=dict)


_state = _State()
# (op, dispatch key) pairs whose kernel is the Python reference, registered because _C provided none.
fallback_registered: set[tuple[str, str]] = set()


def _build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load() -> None:
    """Imports ppml._C if it exists and matches this torch; records why not otherwise. Never raises."""
    if _state.loaded:
        return
    if os.environ.get("PPML_DISABLE_NATIVE", "") not in ("", "0"):
        _state.reason = "disabled by PPML_DISABLE_NATIVE"
        return
    if importlib.util.find_spec("ppml._C") is None:
        _state.reason = "ppml._C is not built (install with `pip install .`; see README)"
        return
    info = _build_info()
    _state.build = info
    built_for = info.get("torch")
    if built_for is not None and built_for != torch.__version__:
        _state.reason = (
            f"ppml._C was built against torch {built_for} but torch {torch.__version__} is running; "
            "rebuild with `pip install --no-build-isolation .`"
        )
        return
    try:
        importlib.import_module("ppml._C")
    except Exception as exc:  # an ImportError or an undefined symbol: either way, run without it
        _state.reason = f"importing ppml._C failed: {exc}"
        return
    _state.loaded, _state.reason = True, None


def native_loaded() -> bool:
    return _state.loaded


def load_reason() -> str | None:
    """Why ppml._C is not loaded, or None when it is."""
    return _state.reason


def native_reason(device_type: str, op: str) -> str | None:
    """None when the C++ kernel of ppml::<op> serves `device_type`, else why it does not."""
    if not _state.loaded:
        return _state.reason
    if device_type not in ("cpu", "cuda"):
        return f"no native kernel for device type {device_type!r}"
    if device_type == "cuda":
        if not _state.build.get("cuda", False):
            why = _state.build.get("cuda_reason", "")
            return "ppml._C was built without CUDA kernels" + (f" ({why})" if why else "")
        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False"
    key = "CPU" if device_type == "cpu" else "CUDA"
    if (op, key) in fallback_registered or not torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", key):
        return f"ppml._C registers no {key} kernel for ppml::{op}"
    return None


def cuda_kernels_built() -> bool:
    return _state.loaded and bool(_state.build.get("cuda", False))


def triton_reason(device_type: str) -> str | None:
    """None when the Triton kernels can run on `device_type`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") == "1":
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing ppml)"
    return f"Triton does not support device type {device_type!r}"


def build_info() -> dict:
    return dict(_state.build)
