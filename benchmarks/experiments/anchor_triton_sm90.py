"""Evidence without a GPU for the Triton anchor-loss kernel: every phase AOT-compiled for sm_90 at the issue's sizes.

For each size × precision (float32 IEEE, float32 TF32, bfloat16) and each of the kernel's four phases: the grid
against the 132 SMs of an H200, `ptxas -v` registers and spills (sm_90a, as Triton assembles it), the mma / wgmma
instructions in the PTX, the bytes the launch moves against the bytes that must move, the FLOPs, and the time an H200
would need at its peak rates (bf16 ~790 TFLOP/s dense, tf32 ~400, 4.3 TB/s HBM). Launches are recorded on CPU meta
data (nothing runs), then compiled exactly as a launch would compile them.

    PYTHONPATH=$PWD python benchmarks/experiments/anchor_triton_sm90.py [--sizes 256x768x1000 ...]

Run it with the GPU machine's triton (3.6) or the development one (3.8); it prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from ppml.kernels import anchor_loss as K

SMS = 132
PEAK = {"bf16": 790e12, "tf32": 400e12, "ieee": 67e12}  # dense tensor-core FLOP/s; ieee: FP32 FMA (no tensor cores)
HBM = 4.3e12
PHASES = {K._ROWS: "rows", K._STATS: "stats", K._GRAD: "grad", K._FINISH: "finish"}


def record(B, D, C, prec):
    """The four launches of one call: (grid, args, kwargs), recorded on CPU tensors of the right dtypes."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    f = torch.zeros(B, D, dtype=dtype)
    a = torch.randn(C, D).to(dtype)
    y = torch.zeros(B, dtype=torch.int64)
    saved, tf32 = K._anchor_loss_kernel, torch.backends.cuda.matmul.allow_tf32
    K._anchor_loss_kernel = Recorder()
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    try:
        K.anchor_loss_triton(f, a, y, "sqeuclidean", 1.0, 0.1, True)
    finally:
        K._anchor_loss_kernel, torch.backends.cuda.matmul.allow_tf32 = saved, tf32
    return launches


def compile_sm90(args, kwargs):
    kernel = K._anchor_loss_kernel
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def ptxas_v(ptx: str, name: str) -> tuple[int, int]:
    """(registers, spill bytes stored) from ptxas -v for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["256x768x1000", "1024x2048x1000", "4096x768x32000"],
                   help="BxDxC")
    p.add_argument("--precisions", nargs="*", default=["ieee", "tf32", "bf16"])
    ns = p.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90 AOT")
    print("| B, D, C | precision | phase | grid (programs / 132 SMs) | regs | spill B | mma / wgmma in PTX |")
    print("|---|---|---|---|---:|---:|---|")
    summary = []
    for size in ns.sizes:
        B, D, C = map(int, size.split("x"))
        for prec in ns.precisions:
            esize = 2 if prec == "bf16" else 4
            moved = 0
            for grid, args, kwargs in record(B, D, C, prec):
                k = compile_sm90(args, kwargs)
                ptx = k.asm["ptx"]
                regs, spill = ptxas_v(ptx, k.name)
                n_mma = len(re.findall(r"^\s*mma\.", ptx, re.M))
                n_wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
                programs = 1
                for g in grid:
                    programs *= g
                phase = kwargs["PHASE"]
                print(f"| {B}, {D}, {C} | {prec} | {PHASES[phase]} | {grid} = {programs} ({programs / SMS:.2f}×) "
                      f"| {regs} | {spill} | {n_mma} / {n_wgmma} |")
                cfg_bb, cfg_bn = kwargs["BLOCK_B"], kwargs["BLOCK_N"]
                rb = triton.cdiv(B, cfg_bb)
                s2 = args[15]
                # Bytes each phase moves from HBM/L2 (anchor tiles re-read per row block; per split buffers).
                if phase == K._ROWS:
                    moved += 2 * B * D * esize + 3 * B * 4
                elif phase == K._STATS:
                    moved += rb * C * D * esize + B * D * esize * args[13]
                elif phase == K._GRAD:
                    db = triton.cdiv(D, cfg_bn)
                    moved += rb * db * C * D * esize + rb * C * D * esize + s2 * B * D * 4
                else:
                    moved += s2 * B * D * 4 + 2 * B * D * esize + B * D * esize
            needed = (B * D + C * D) * esize + B * D * esize + B * 4  # features and anchors in, grad and loss out
            db = triton.cdiv(D, kwargs["BLOCK_N"])
            mma_per = 2 if prec == "bf16" else 1  # the bf16 w·A is two dots (w_hi, w_lo)
            flops = 2 * B * C * D * (1 + db) + mma_per * 2 * B * C * D
            t_flops = flops / PEAK[prec]
            t_bytes = moved / HBM
            summary.append((B, D, C, prec, moved / needed, flops, t_flops, t_bytes))
    print()
    print("| B, D, C | precision | bytes moved ÷ needed (upper bound, all from HBM) | GFLOP | "
          "time at peak FLOP/s | time at 4.3 TB/s (if nothing hit L2) |")
    print("|---|---|---:|---:|---:|---:|")
    for B, D, C, prec, ratio, flops, t_f, t_b in summary:
        print(f"| {B}, {D}, {C} | {prec} | {ratio:.1f} | {flops / 1e9:.0f} | {t_f * 1e3:.2f} ms | {t_b * 1e3:.2f} ms |")


if __name__ == "__main__":
    sys.exit(main())
