"""Builds ppml._C: the CPU C++ kernels always, the CUDA kernels when torch sees a GPU (or FORCE_CUDA=1).

The compiler: CXX (and CC) when set; otherwise the default c++ when it links against the C++ runtime torch runs
with, else the first compiler found that does (ppml/_toolchain.py says why this matters). After the build, a
self-test in a child process makes ppml._C raise a C++ error on bad input: if that crashes instead of raising a
ValueError, the build fails and says which compiler to use.

`pip install .` needs no environment variables: CUDA_HOME defaults to /usr/local/cuda when nvcc is there, and the
CUDA headers that pip's CUDA build of torch ships (site-packages/nvidia/cu13/include, where cusparse.h lives) are put
on the include path. Set FORCE_CUDA=1 to build the CUDA kernels without a GPU (a CUDA build of torch and nvcc are
still needed), FORCE_CUDA=0 to skip them, PPML_CUDA_ARCH to choose the architectures
(default: sm_75;80;86;89;90 plus PTX for 90, as far as the toolkit supports them).
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


# torch.utils.cpp_extension reads CUDA_HOME at import time, so it must be set before that import.
_cuda_home = _find_cuda_home()
if _cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _load_toolchain():
    # By path: ppml itself cannot be imported before it is built.
    spec = importlib.util.spec_from_file_location("_ppml_toolchain", os.path.join(ROOT, "ppml", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toolchain = _load_toolchain()
_compiler_env, _compiler_why = _toolchain.pick_compiler()
os.environ.update(_compiler_env)  # read by torch's BuildExtension when it compiles (CXX; CC becomes nvcc's -ccbin)
print("ppml: compiler " + _compiler_why)


def _want_cuda():
    """torchvision's convention: the CUDA kernels when torch sees a GPU (and nvcc is there), or with FORCE_CUDA=1
    (CI and benchmarks/gpu_check.sh set it: a CPU machine then proves the .cu files compile); FORCE_CUDA=0 never."""
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force not in ("", "1"):
        return False, "FORCE_CUDA=%s" % force
    missing = None
    if torch.version.cuda is None:
        missing = "torch %s is a CPU build" % torch.__version__
    elif _cuda_home is None:
        missing = "nvcc not found (set CUDA_HOME)"
    if force == "1":
        if missing:  # asked for explicitly: fail rather than quietly build without them
            raise RuntimeError("ppml: FORCE_CUDA=1 but the CUDA kernels cannot be built: " + missing)
        return True, "FORCE_CUDA=1"
    if missing:
        return False, missing
    if not torch.cuda.is_available():
        return False, "torch sees no GPU here (FORCE_CUDA=1 builds them anyway)"
    return True, "torch %s sees a GPU, CUDA %s, nvcc at %s" % (torch.__version__, torch.version.cuda, _cuda_home)


def _torch_cuda_includes():
    """Headers pip's CUDA build of torch ships next to it (nvidia/cu13/include etc.); torch's headers need them."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d))


def _cuda_arch_flags():
    archs = os.environ.get("PPML_CUDA_ARCH", "75;80;86;89;90").replace(",", ";").split(";")
    flags = ["-gencode=arch=compute_%s,code=sm_%s" % (a, a) for a in archs if a]
    last = archs[-1]
    flags.append("-gencode=arch=compute_%s,code=compute_%s" % (last, last))
    return flags


def _extensions():
    # csrc/autograd: device-independent autograd kernels, in every build.
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/autograd/*.cpp")) + ["csrc/module.cpp"]
    # -ffp-contract=off: the MI kernels must round each multiply and add as the reference does (no FMA).
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC keeps a float
    # comparison (the clamps in csrc/cpu/vector_math.h's exp) as a branch, which stops the loop from vectorising.
    # It changes no rounding (values stay bit-identical; the bit-exact tests check that).
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off", "-fno-trapping-math", "-fno-wrapv"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    use_cuda, why = _want_cuda()
    print("ppml: CUDA kernels %s (%s)" % ("ON" if use_cuda else "OFF", why))
    if use_cuda:
        include_dirs += _torch_cuda_includes()
        return use_cuda, why, [
            CUDAExtension(
                "ppml._C",
                cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
                include_dirs=include_dirs,
                define_macros=[("PPML_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"] + _cuda_arch_flags()},
                extra_link_args=["-fopenmp"],
            )
        ]
    return use_cuda, why, [
        CppExtension(
            "ppml._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]


def _selftest(package_root: str) -> dict:
    if not os.path.exists(os.path.join(package_root, "ppml", "__init__.py")):
        print(f"ppml: self-test not run, no ppml package beside the new _C in {package_root}")
        return {"selftest": "not run"}
    env = {k: v for k, v in os.environ.items() if k not in ("PPML_DISABLE_NATIVE", "TRITON_INTERPRET")}
    # A child process: a crash must not take the build down with it, and the new _C must be loaded fresh.
    out = subprocess.run([sys.executable, os.path.join(ROOT, "ppml", "_selftest.py"), package_root], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode == 0:
        return {"selftest": "ok: C++ errors from ppml._C reach Python as ValueError"}
    if out.returncode == 3:
        # _C does not load here (e.g. a cross build): nothing to test, and ppml will say why at run time.
        print("ppml: self-test skipped, ppml._C does not load in this environment: " + out.stdout.strip())
        return {"selftest": "skipped: " + out.stdout.strip()}
    if out.returncode > 0 and out.returncode != 4:
        # A Python error in the child (an import failing, say) is not what this test looks for: report, go on.
        print("ppml: WARNING: self-test could not run:\n" + out.stderr[-2000:])
        return {"selftest": "could not run: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    how = "raised no ValueError or a garbled one" if out.returncode == 4 else f"crashed with signal {-out.returncode}"
    raise RuntimeError(
        f"ppml: the freshly built ppml._C {how} when it had to raise a C++ error on bad input, where a ValueError was "
        f"expected. Compiler: {_compiler_why}. A crash here means ppml._C and torch do not share one C++ runtime; "
        "rebuild with a compiler whose libstdc++ is the one torch loads, e.g. CXX=/usr/bin/g++ CC=/usr/bin/gcc, "
        "and see `python -m ppml._toolchain`.\n" + out.stdout[-2000:] + out.stderr[-4000:]
    )


class _BuildExt(BuildExtension):
    """Records what _C was built against and with (so ppml can refuse a _C built for another torch instead of
    crashing), then runs the self-test."""

    def run(self):
        super().run()
        cxx = _toolchain.compiler_info(os.environ.get("CXX", "c++"))
        info = {
            "torch": torch.__version__,
            "cuda": bool(self.distribution.ppml_with_cuda),
            "cuda_reason": self.distribution.ppml_cuda_reason,
            "torch_cuda": torch.version.cuda,
            "cxx": cxx["path"],
            "cxx_version": cxx["version"],
            "cxx_libstdc++": cxx["libstdc++"],
            "torch_libstdc++": _toolchain.loaded_libraries().get("libstdc++"),
            "torch_compiler": _toolchain.torch_compiler(),
        }
        bases = {self.build_lib, ROOT} if self.inplace else {self.build_lib}
        self._write_info(bases, info)
        # The package next to the new _C: the source tree for in-place builds, else build_lib (build_py ran first).
        info.update(_selftest(ROOT if self.inplace else self.build_lib))
        self._write_info(bases, info)

    @staticmethod
    def _write_info(bases, info):
        for base in bases:
            path = os.path.join(base, "ppml", "_build_info.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f)


_with_cuda, _why, _ext = _extensions()

from setuptools import Distribution  # noqa: E402

Distribution.ppml_with_cuda = _with_cuda
Distribution.ppml_cuda_reason = _why

setup(
    packages=find_packages(include=["ppml", "ppml.*"]) + ["ppml.kernels"],
    package_dir={"ppml.kernels": "kernels"},
    ext_modules=_ext,
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
)
