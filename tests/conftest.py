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
from ppml.reference import anchor_loss as ref_loss

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

# Which parametrisations the `triton` tests run. Compiled (on a GPU), every distinct specialisation of a kernel (its
# pointer dtypes, its constexprs, each int argument equal to 1 or divisible by 16) is a fresh compile of 0.2-2 s, and
# the full cross products are hundreds of them; in the interpreter nothing is compiled. "all": every parametrisation
# (the default under TRITON_INTERPRET=1); "gpu": every kernel path (each dtype, metric, softmax / weights branch,
# block-size class and layout) still launched at least once, repeats of the cross products skipped (the default when
# compiled; the interpreter run and the AOT tests, which compile every specialisation the "all" set launches, cover
# them). PPML_TRITON_CASES=all|gpu overrides (=gpu under the interpreter shows what a GPU run launches).
TRITON_CASES = os.environ.get("PPML_TRITON_CASES") or ("all" if INTERPRET else "gpu")
if TRITON_CASES not in ("all", "gpu"):
    raise ValueError(f"PPML_TRITON_CASES must be 'all' or 'gpu', not {TRITON_CASES!r}")
ALL_TRITON_CASES = TRITON_CASES == "all"
all_cases_only = pytest.mark.skipif(
    not ALL_TRITON_CASES, reason="PPML_TRITON_CASES=gpu: repeats a kernel path the GPU set compiles once (=all runs it)"
)


def triton_cases(cases, keep):
    """`cases` (tuples of parameters) for pytest.mark.parametrize, the ones `keep(*case)` rejects marked all_cases_only.
    Ids are the parameters joined by "-", as stacked parametrize decorators would make them."""
    return [
        pytest.param(*case, id="-".join(map(str, case)), marks=() if keep(*case) else all_cases_only) for case in cases
    ]

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


def pytest_collection_modifyitems(config, items):
    """On a GPU (compiled Triton), the AOT tests run first: they compile the specialisations the Triton tests launch
    in parallel (see _AOT_REPLAY), into Triton's cache, where the launches then find them instead of compiling one
    at a time; and a kernel that does not lower fails there, at once, by name."""
    if HAS_CUDA and not INTERPRET:
        first = [item for item in items if item.name == "test_triton_kernel_aot_compiles_for_sm90"]
        items[:] = first + [item for item in items if item.name != "test_triton_kernel_aot_compiles_for_sm90"]


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


def anchor_loss_ref64(f, a, y, metric, scale, pull, softmax):
    """The float64 reference anchor loss per row and its gradient wrt the features ``f`` (both detached)."""
    x = f.detach().double().requires_grad_(True)
    loss = ref_loss(x, a.double(), y, metric, scale, pull, softmax)
    loss.sum().backward()
    return loss.detach(), x.grad


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


# The AOT replay: the launcher of a kernel runs on CPU tensors with the kernel swapped for a recorder, over every case
# a test module launches (its aot_launches()), and each distinct specialisation recorded is compiled for sm_90 exactly
# as a launch on an H100/H200 would compile it (the kernel's own binder and JITFunction.run's options: same signature,
# constexprs, int and pointer specialisations, so the compiles land in Triton's cache under the keys the launches look
# up). A kernel that only fails to lower on the GPU (the interpreter compiles nothing) fails here, on any machine.
# The compiles run in PPML_AOT_JOBS forked processes (default: one per CPU but one, at most 16; 1 on a 2-CPU machine).
_AOT_REPLAY = r"""
import importlib, os, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

kernel_module = importlib.import_module(KERNEL_MODULE)
kernel = getattr(kernel_module, KERNEL)
launches = []


class Recorder:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: launches.append((args, kwargs))


import torch

torch.set_num_threads(1)  # tiny CPU tensors; and no thread pool to fork under the compile workers below
setattr(kernel_module, KERNEL, Recorder())
try:
    importlib.import_module(TEST_MODULE).aot_launches()
finally:
    setattr(kernel_module, KERNEL, kernel)
assert launches, "aot_launches() launched nothing"

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
binder = create_function_from_signature(kernel.signature, kernel.params, backend)
todo = {}
for args, kwargs in launches:
    kwargs = dict(kwargs)
    # What JITFunction.run adds before it binds the arguments.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(*args, **kwargs)
    key = repr((spec, opts))
    if key not in todo:
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
        what = ({n: t for n, t in signature.items() if t != "constexpr"},
                {kernel.arg_names[path[0]]: v for path, v in constexprs.items()})
        todo[key] = (what, signature, constexprs, attrs, options.__dict__)
todo = list(todo.values())


class Compiled:
    def __init__(self, asm):
        self.asm = asm


def compile_one(i):
    what, signature, constexprs, attrs, options = todo[i]
    try:
        k = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
        return {"ptx": k.asm["ptx"], "cubin": k.asm["cubin"]}, None
    except Exception as e:
        return None, f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


jobs = int(os.environ.get("PPML_AOT_JOBS") or max(1, min((os.cpu_count() or 1) - 1, 16)))
if jobs > 1 and len(todo) > 1:
    import concurrent.futures, multiprocessing
    # fork: the workers inherit the recorded specialisations (nothing has been compiled, and no GPU touched, yet).
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(compile_one, range(len(todo))))
else:
    results = [compile_one(i) for i in range(len(todo))]
ok = [(todo[i][0], Compiled(asm)) for i, (asm, _) in enumerate(results) if asm is not None]
failed = [err for _, err in results if err is not None]
exec(CHECKS)
print(f"{len(launches)} launches, {len(todo)} specialisations, {len(failed)} failed to compile", file=sys.stderr)
assert not failed, "failed for sm_90:\n" + "\n".join(failed)
print("ok")
"""


def run_aot_replay(test_module: str, kernel_module: str, kernel: str, checks: str = "") -> None:
    """Compiles for sm_90 every specialisation of `kernel_module.kernel` that `test_module.aot_launches()` launches
    through its launcher (see _AOT_REPLAY); `checks` is code run on `ok`, a list of (what, CompiledKernel), e.g.
    assertions on k.asm["ptx"]."""
    names = f"KERNEL_MODULE, KERNEL, TEST_MODULE, CHECKS = {kernel_module!r}, {kernel!r}, {test_module!r}, {checks!r}"
    run_aot_script(names + "\n" + _AOT_REPLAY)
