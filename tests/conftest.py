"""Shared test helpers: which backends and devices this machine can exercise, and image/perm factories.

Tests import the *installed* ppml (tests/ is not a package and the repo root is not on sys.path), so they exercise
the built ppml._C. Set PPML_REQUIRE_NATIVE=1 (CI does) to fail instead of skip when _C did not load.
"""

from __future__ import annotations

import os

import pytest
import torch

import ppml
from ppml import _dispatch

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# (layout name, function making a [B, C, H, W] tensor of that layout from a contiguous one)
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    # a strided view: every other column of a twice-as-wide buffer
    "sliced": lambda x: torch.repeat_interleave(x, 2, dim=3)[..., ::2],
    # H and W swapped in memory, then transposed back: neither contiguous nor channels_last
    "transposed": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),
}

ALL_DTYPES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64]


def make_images(shape, dtype, device="cpu", layout="contiguous", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return LAYOUTS[layout](x.to(device))


def make_perm(batch, n, device="cpu", seed=0) -> torch.Tensor:
    return ppml.random_permutations(batch, n, generator=torch.Generator().manual_seed(seed)).to(device)


def backends_for(device: str, op: str = "shuffle_patches", *, triton: bool = False) -> list[str]:
    """Backends that can run `op` on `device` here. Triton on CPU only in the interpreter run (and only when asked:
    the interpreter is too slow for the big parametrised grids)."""
    out = []
    for b in _dispatch.BACKENDS:
        if b == "triton" and device == "cpu" and not triton:
            continue
        if _dispatch.unavailable_reason(op, b, device) is None:
            out.append(b)
    return out


def pytest_report_header(config):
    info = ppml.backend_info()
    return [f"ppml backends: {info['ops']}", f"ppml._C: {info['native'] or 'loaded'}; build: {info['build']}"]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv("PPML_BACKEND", raising=False)


# ---- tolerances (one table) ----------------------------------------------------------------------------------------
# Data-movement ops (shuffle) must match bit for bit. Mixing ops may differ from the reference by 1 ulp of the output
# dtype, plus the rounding a different (but still float32-accumulated) summation order can add when terms cancel:
# EPS[accumulation dtype] * sum(|terms|).
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of `dtype` at |values| (float64): 2^(exponent - mantissa bits), the subnormal spacing below tiny."""
    fi = torch.finfo(dtype)
    v = values.double().abs()
    _, e = torch.frexp(v)
    spacing = torch.ldexp(torch.ones_like(v), e - 1).clamp_min(fi.tiny)
    return torch.where(v == 0, fi.tiny, spacing) * fi.eps


def assert_within_ulp(out: torch.Tensor, ref: torch.Tensor, abs_terms: torch.Tensor | None = None, ulps: float = 1.0):
    """|out - ref| <= ulps · ulp(ref, out.dtype) + EPS[acc] · abs_terms elementwise (abs_terms: Σ|terms| per output
    element, acc: float64 for float64 outputs, else float32); NaN and inf must agree exactly."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    o, r = out.double(), ref.double()
    assert torch.equal(o.isnan(), r.isnan()), "NaN positions differ"
    inf = r.isinf()
    assert torch.equal(o[inf], r[inf]), "infinities differ"
    tol = ulps * ulp(r, out.dtype)
    if abs_terms is not None:
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32
        tol = tol + EPS[acc] * abs_terms.double()
    err = (o - r).abs()
    bad = r.isfinite() & ~(err <= tol)
    if bad.any():
        i = int((err - tol).masked_fill(~bad, -1).flatten().argmax())
        raise AssertionError(
            f"{int(bad.sum())} of {r.numel()} outside tolerance; worst out={o.flatten()[i].item()!r} "
            f"ref={r.flatten()[i].item()!r} tol={tol.flatten()[i].item()!r}"
        )


def run_aot_script(code: str) -> None:
    """Runs a Triton AOT-compile script in a fresh process without TRITON_INTERPRET (the interpreter replaces
    triton.jit, so nothing would be compiled) and requires it to end by printing "ok". It runs from tests/, not the
    repository root, so that `import ppml` finds the installed package (with ppml.kernels) rather than the source tree."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# ---- CUDA set-up without a GPU --------------------------------------------------------------------------------------
class FakeCuda:
    """What a trainer asked of the mocked ``torch.cuda`` / ``torch.distributed`` (see the ``fake_cuda`` fixture)."""

    def __init__(self) -> None:
        self.count = 2  # torch.cuda.device_count()
        self.current = 0  # torch.cuda.current_device()
        self.set_device: list[int] = []  # the index of every torch.cuda.set_device call
        self.backends: list = []  # the backend of every init_process_group call
        self.initialized = False


@pytest.fixture
def fake_cuda(monkeypatch):
    """``torch.cuda`` as on a machine with two GPUs (current device 0) and torch.distributed's process-group set-up,
    mocked so that the trainers' device set-up runs on a machine without CUDA. ``set_device``, like the real one,
    refuses a CUDA ``torch.device`` without an index ("Expected a torch.device with a specified index or an integer,
    but got:cuda") and makes the index current. No torchrun variables are set (the test sets them)."""
    fake = FakeCuda()

    def set_device(device):
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "cuda":
                raise ValueError(f"Expected a cuda device, but got: {device}")
            if device.index is None:
                raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
            device = device.index
        assert isinstance(device, int) and 0 <= device < fake.count, device
        fake.set_device.append(device)
        fake.current = device

    def init_process_group(backend=None, *args, **kwargs):
        assert not fake.initialized
        fake.backends.append(backend)
        fake.initialized = True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: fake.initialized)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return fake


def backend_device_types(backend) -> set[str]:
    """The tensor device types a process group made with ``init_process_group(backend=backend)`` can reduce."""
    from torch.distributed.distributed_c10d import BackendConfig

    return set(BackendConfig(backend).get_device_backend_map())
