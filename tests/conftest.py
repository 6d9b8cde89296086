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
