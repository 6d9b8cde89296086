"""The build: ppml._C loads when it should, the CUDA kernels are registered when they were built, and ppml imports
and works without _C."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import ppml
from ppml import _extension


def test_native_loaded_when_required():
    if os.environ.get("PPML_REQUIRE_NATIVE", "") != "1":
        pytest.skip("set PPML_REQUIRE_NATIVE=1 to require ppml._C (CI does)")
    assert _extension.native_loaded(), ppml.backend_info()["native"]
    for op, table in ppml.backend_info()["ops"].items():
        assert table["native"]["cpu"] is None, (op, table["native"]["cpu"])


def test_build_info_matches_running_torch():
    if not _extension.native_loaded():
        pytest.skip(f"ppml._C not loaded: {ppml.backend_info()['native']}")
    assert _extension.build_info()["torch"] == torch.__version__


def test_cuda_kernels_registered_when_built():
    if not _extension.cuda_kernels_built():
        pytest.skip("ppml._C was built without CUDA kernels")
    # The CUDA kernels are registered even on a machine without a GPU (they just cannot run here).
    for op in ("shuffle_patches", "shuffle_patches.out", "mix_subpatches", "anchor_loss"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ppml::{op}", "CUDA"), op
        assert (op, "CUDA") not in _extension.fallback_registered


def _run_python(code: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_WITHOUT_C = """
import json, torch, ppml
x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
perm = torch.tensor([[3, 1, 0, 2], [0, 2, 3, 1]])
out = torch.ops.ppml.shuffle_patches(x, perm, 4)
ref = ppml.reference.shuffle_patches(x, perm, 4)
try:
    ppml.shuffle_patches(x, 4, perm, backend="native")
    explicit = "ran"
except RuntimeError as e:
    explicit = str(e)
print(json.dumps({"native": ppml.backend_info()["native"], "equal": bool(torch.equal(out, ref)),
                  "chosen": ppml._dispatch.choose("shuffle_patches", x.device)[0], "explicit": explicit}))
"""


def test_import_and_ops_work_without_native_extension():
    res = _run_python(_WITHOUT_C, PPML_DISABLE_NATIVE="1")
    assert res["native"] == "disabled by PPML_DISABLE_NATIVE"
    assert res["equal"], "the reference registered as CPU kernel must compute the op"
    assert res["chosen"] == "reference"
    assert "backend 'native' cannot run on cpu" in res["explicit"] and "PPML_DISABLE_NATIVE" in res["explicit"]


def test_extension_for_another_torch_is_refused(tmp_path, monkeypatch):
    # A _C built against another torch must not be imported; the reason must say what to do.
    monkeypatch.setattr(_extension, "_state", _extension._State())
    monkeypatch.setattr(_extension, "_build_info", lambda: {"torch": "0.0.1", "cuda": False})
    monkeypatch.setattr(_extension.importlib.util, "find_spec", lambda name: object())
    _extension.load()
    assert not _extension.native_loaded()
    assert "built against torch 0.0.1" in _extension.native_reason("cpu", "shuffle_patches")
    assert "--no-build-isolation" in _extension.native_reason("cpu", "shuffle_patches")
