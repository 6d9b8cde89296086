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
# the Python autograd registered in place of csrc/autograd/: d/dx sum(shuffle(x) * w) = unshuffle(w)
xg = x.clone().requires_grad_(True)
w = torch.randn(2, 3, 8, 8)
(torch.ops.ppml.shuffle_patches(xg, perm, 4) * w).sum().backward()
grad_ok = bool(torch.equal(xg.grad, ppml.reference.shuffle_patches(w, ppml.invert_permutations(perm), 4)))
print(json.dumps({"native": ppml.backend_info()["native"], "equal": bool(torch.equal(out, ref)), "grad": grad_ok,
                  "python_autograd": ("shuffle_patches", "Autograd") in ppml._extension.fallback_registered,
                  "chosen": ppml._dispatch.choose("shuffle_patches", x.device)[0], "explicit": explicit}))
"""


def test_import_and_ops_work_without_native_extension():
    res = _run_python(_WITHOUT_C, PPML_DISABLE_NATIVE="1")
    assert res["native"] == "disabled by PPML_DISABLE_NATIVE"
    assert res["equal"], "the reference registered as CPU kernel must compute the op"
    assert res["python_autograd"] and res["grad"], "without _C the Python autograd must be registered and right"
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


# ---- the C++ runtime ppml._C is built with (the first GPU run crashed on bad input with a foreign one) -------------


def test_selftest_passes_for_this_build():
    # The post-build self-test, on the installed ppml: a C++ error from _C arrives as the documented ValueError.
    if not _extension.native_loaded():
        pytest.skip(f"ppml._C not loaded: {ppml.backend_info()['native']}")
    # From tests/, as _run_python does: `python -m` puts the cwd first on sys.path, and from the repository root that
    # imports the source tree's ppml, which has no _C after a non-editable `pip install .` (CI's clean clone).
    out = subprocess.run([sys.executable, "-m", "ppml._selftest"], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ValueError as documented") == 2
    assert _extension.build_info().get("selftest", "").startswith("ok"), _extension.build_info()


def test_extension_uses_the_process_cpp_runtime():
    if not _extension.native_loaded():
        pytest.skip(f"ppml._C not loaded: {ppml.backend_info()['native']}")
    from ppml import _toolchain

    so = ppml._C.__file__
    rt = _toolchain.extension_runtime(so)
    if not rt["needed"]:
        pytest.skip("readelf is not available")
    assert rt["defines_runtime"] == [], f"{so} carries its own C++ runtime: {rt}"
    assert "libstdc++.so.6" in rt["needed"]


def _compiler(path, lib):
    return {"command": path, "path": path, "version": f"{path} 1.0", "libstdc++": lib}


def test_toolchain_names_a_compiler_without_shared_runtime():
    from ppml import _toolchain

    loaded = {"libstdc++": "/usr/lib/libstdc++.so.6.0.33"}
    assert _toolchain.runtime_mismatch(_compiler("/usr/bin/g++", "/usr/lib/libstdc++.so.6.0.33"), loaded) is None
    why = _toolchain.runtime_mismatch(_compiler("/opt/gcc/bin/g++", None), loaded)
    assert "no shared libstdc++" in why and "/opt/gcc/bin/g++" in why
    why = _toolchain.runtime_mismatch(_compiler("/opt/gcc/bin/g++", "/opt/gcc/lib64/libstdc++.so.6.0.34"), loaded)
    assert "/opt/gcc/lib64/libstdc++.so.6.0.34" in why and "/usr/lib/libstdc++.so.6.0.33" in why


def test_pick_compiler_prefers_one_with_torchs_runtime(monkeypatch):
    from ppml import _toolchain

    runtime = "/usr/lib/libstdc++.so.6.0.33"
    compilers = {
        "c++": _compiler("/opt/gcc/bin/c++", None),
        "g++": _compiler("/opt/gcc/bin/c++", None),
        "/usr/bin/c++": _compiler("/usr/bin/x86_64-linux-gnu-g++-13", runtime),
        "/usr/bin/g++": _compiler("/usr/bin/x86_64-linux-gnu-g++-13", runtime),
    }
    monkeypatch.setattr(_toolchain, "loaded_libraries", lambda: {"libstdc++": runtime})
    monkeypatch.setattr(_toolchain, "compiler_info", lambda cmd: compilers[cmd])
    monkeypatch.setattr(_toolchain, "_c_compiler_beside", lambda path: "/usr/bin/x86_64-linux-gnu-gcc-13")
    env, why = _toolchain.pick_compiler({})
    assert env == {"CXX": "/usr/bin/x86_64-linux-gnu-g++-13", "CC": "/usr/bin/x86_64-linux-gnu-gcc-13"}
    assert "instead of c++" in why and "no shared libstdc++" in why
    # a CXX the user chose is kept, with the warning
    compilers["/opt/gcc/bin/g++"] = _compiler("/opt/gcc/bin/g++", None)
    env, why = _toolchain.pick_compiler({"CXX": "/opt/gcc/bin/g++"})
    assert env == {} and "WARNING" in why
    # nothing better to be had: keep the default, say so
    compilers["/usr/bin/c++"] = compilers["/usr/bin/g++"] = _compiler("/opt/gcc/bin/c++", None)
    env, why = _toolchain.pick_compiler({})
    assert env == {} and why.startswith("WARNING: no compiler found")
