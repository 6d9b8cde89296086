"""The one place a backend is chosen.

Per op, an ordered list of backends: ``native`` (the C++ kernel of ``ppml::<op>``, CPU or CUDA), ``triton``
(``ppml::<op>_triton``), ``reference`` (plain PyTorch). Each answers "not supported because …" for a device. The
choice comes from the call's ``backend=``, else the ``PPML_BACKEND`` environment variable, else ``auto``. Auto takes
the first backend that can run, quietly; an explicit request either runs or raises with every reason. Triton on CPU
tensors (``TRITON_INTERPRET=1``) is for tests and is never chosen by auto.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import _extension

BACKENDS = ("native", "triton", "reference")
_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, *, native: Callable, triton: Callable | None, reference: Callable) -> None:
    """Called once by each op module (ppml/ops/<op>.py); ``triton=None`` for an op without a Triton kernel yet."""
    _IMPLS[op] = {"native": native, "triton": triton, "reference": reference}
    _CHOICES.clear()


# (op, backend, device type) -> reason or None. Filled by refresh() once ppml._C has been tried: nothing changes after
# that, and a plain dict lookup is something torch.compile can trace (the dispatcher queries behind it are not).
_REASONS: dict[tuple[str, str, str], str | None] = {}

# (op, device, backend=, PPML_BACKEND) -> choose()'s answer. Every input of the rules is in the key or fixed once
# refresh() has run (the reasons above), so a hit is the answer the rules would give. It saves a call at small sizes
# (B = 1) the walk through the rules: a few µs of Python, as much as the kernel. Failures are never cached: an explicit
# request that cannot run raises on every call.
_CHOICES: dict[tuple, tuple[str, Callable]] = {}


def refresh() -> None:
    _REASONS.clear()
    _CHOICES.clear()
    for op in _IMPLS:
        for backend in BACKENDS:
            for device_type in ("cpu", "cuda"):
                _REASONS[(op, backend, device_type)] = _compute_reason(op, backend, device_type)


def unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    """None when `backend` can run `op` on `device_type`, else why not."""
    key = (op, backend, device_type)
    if key in _REASONS:
        return _REASONS[key]
    return _compute_reason(op, backend, device_type)


def _compute_reason(op: str, backend: str, device_type: str) -> str | None:
    if backend == "native":
        return _extension.native_reason(device_type, op)
    if backend == "triton":
        if _IMPLS.get(op, {}).get("triton") is None:
            return f"ppml.{op} has no Triton kernel yet"
        return _extension.triton_reason(device_type)
    if backend == "reference":
        return None
    raise ValueError(
        f"ppml: unknown backend {backend!r}; expected one of None, 'auto', {', '.join(map(repr, BACKENDS))}"
    )


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("PPML_BACKEND", "auto")
    name = (name or "auto").strip().lower()
    if name != "auto" and name not in BACKENDS:
        src = "backend=" if backend is not None else "PPML_BACKEND="
        raise ValueError(f"ppml: unknown backend {src}{name!r}; expected one of None, 'auto', {', '.join(BACKENDS)}")
    return name


def choose(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """Returns ``(backend name, callable)`` for `op` on `device`."""
    if torch.compiler.is_compiling() or not (backend is None or type(backend) is str):
        # traced: the rules themselves (a lookup in a dict that eager calls keep filling would guard the graph on it);
        # a backend= that is no string: the rules' error
        return _choose(op, device.type, backend)
    key = (op, device, backend, os.environ.get("PPML_BACKEND") if backend is None else None)
    hit = _CHOICES.get(key)
    if hit is None:
        hit = _choose(op, device.type, backend)
        if _REASONS:  # refresh() has run: the reasons are final
            _CHOICES[key] = hit
    return hit


def _choose(op: str, device_type: str, backend: str | None) -> tuple[str, Callable]:
    impls = _IMPLS[op]
    name = requested_backend(backend)
    if name != "auto":
        why = unavailable_reason(op, name, device_type)
        if why is not None:
            raise RuntimeError(f"ppml.{op}: backend {name!r} cannot run on {device_type}: {why}")
        return name, impls[name]
    for cand in BACKENDS:
        if cand == "triton" and device_type != "cuda":
            continue
        if unavailable_reason(op, cand, device_type) is None:
            return cand, impls[cand]
    raise AssertionError("unreachable: the reference backend always runs")


def backend_info(op: str | None = None) -> dict:
    """Which backends can run each op on CPU and CUDA here, and why not: ``{op: {backend: {device: reason|None}}}``
    plus ``torch``, ``build`` (what ppml._C was built against) and ``native`` (why _C is not loaded, or None)."""
    ops = [op] if op is not None else sorted(_IMPLS)
    table = {o: {b: {d: unavailable_reason(o, b, d) for d in ("cpu", "cuda")} for b in BACKENDS} for o in ops}
    return {
        "torch": torch.__version__,
        "native": _extension.load_reason(),
        "build": _extension.build_info(),
        "ops": table,
    }
