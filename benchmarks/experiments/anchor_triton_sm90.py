"""Evidence without a GPU for the Triton anchor-loss kernel: every phase AOT-compiled for sm_90 at the issue's sizes.

For each size × precision (float32 IEEE, float32 TF32, bfloat16) and each of the kernel's five phases: the grid
against the 132 SMs of an H200, `ptxas -v` registers and spills (sm_90a, as Triton assembles it), the mma / wgmma
instructions in the PTX, the FLOPs, the bytes the launches move against the bytes that must move, and the time an
H200 would need at its peak rates (bf16 ~790 TFLOP/s dense, tf32 ~400, FP32 FMA ~67, 4.3 TB/s HBM) and at the
fractions of them the native kernel's estimate assumes (GEMMs at 70 %, row passes at 3.5 TB/s). Launches are recorded
on CPU meta data (nothing runs), then compiled exactly as a launch would compile them.

Bytes, two models: "L2" counts each operand once per chunk from HBM (the grids' orders are chosen for it: the logits'
row blocks run fastest, so one anchor tile serves the chunk's row blocks while its features (≤ 8 MB) stay in the 50 MB
L2; W·A's column blocks run fastest, so the programs sharing a W row block run together, and a class split's anchor
slice is reused by every row block), "no reuse" re-reads every anchor tile per row block and every W row block per
column block.

    PYTHONPATH=$PWD python benchmarks/experiments/anchor_triton_sm90.py [--sizes 256x768x1000 ...]

Run it with the GPU machine's triton (3.6) or the development one (3.8); it prints Markdown tables.
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
GEMM_EFF, ROW_BW = 0.7, 3.5e12  # the native estimate's assumptions (benchmarks/RESULTS.md, anchor loss, CUDA)
LAUNCH_S = 5e-6  # per launch on the device (the host side overlaps at these sizes)
PHASES = {K._ROWS: "rows", K._LOGITS: "logits", K._SOFTMAX: "softmax", K._WA: "W·A", K._FINISH: "finish"}
# Expected native times (ms) on an H200, from benchmarks/RESULTS.md "anchor loss, CUDA" (C = 1,000: host-bound at the
# harness's ~0.94-1.0 ms; the GPU part in parentheses there).
NATIVE_MS = {(4096, 768, 32000): {"bf16": 1.2, "tf32": 1.9, "ieee": 8.3}}


def record(B, D, C, prec):
    """The launches of one call: (grid, args, kwargs), recorded on CPU tensors of the right dtypes."""
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


def ptxas_v(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored) from ptxas -v for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run(
            [ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def phase_cost(phase, grid, args, kwargs, B, D, C, esize, mma_per):
    """(FLOPs, bytes with L2 reuse, bytes without) of one launch (sqeuclidean: no anchor norms in the row pass)."""
    names = K._anchor_loss_kernel.arg_names
    nb, T, S = (args[names.index(n)] for n in ("NB", "T", "S"))
    bb, bn = kwargs["BLOCK_B"], kwargs["BLOCK_N"]
    rb, db = triton.cdiv(nb, bb), triton.cdiv(D, bn)
    acc = 4
    if phase == K._ROWS:
        b = 2 * B * D * esize + 3 * B * acc
        return 0, b, b
    if phase == K._LOGITS:
        out = nb * C * acc + 2 * nb * T * acc
        return 2 * nb * C * D, C * D * esize + nb * D * esize + out, rb * C * D * esize + nb * D * esize + out
    if phase == K._SOFTMAX:
        b = 2 * nb * C * acc + 2 * nb * T * acc + 2 * nb * acc
        return 0, b, b
    if phase == K._WA:
        out = S * nb * D * acc
        return (
            mma_per * 2 * nb * C * D,
            nb * C * acc + C * D * esize + out,
            db * nb * C * acc + rb * C * D * esize + out,
        )
    b = S * nb * D * acc + 2 * nb * D * esize + nb * D * esize + 3 * nb * acc
    return 0, b, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["256x768x1000", "1024x2048x1000", "4096x768x32000"], help="BxDxC")
    p.add_argument("--precisions", nargs="*", default=["ieee", "tf32", "bf16"])
    ns = p.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90 AOT")
    print(
        "| B, D, C | precision | phase | launches × grid (programs / 132 SMs) | tiles (B×C×K / N) | warps | regs "
        "| spill B | mma / wgmma in PTX |"
    )
    print("|---|---|---|---|---|---:|---:|---:|---|")
    summary = []
    for size in ns.sizes:
        B, D, C = map(int, size.split("x"))
        for prec in ns.precisions:
            esize = 2 if prec == "bf16" else 4
            mma_per = 2 if prec == "bf16" else 1  # the bf16 w·A is two dots (w_hi, w_lo)
            flops = moved = moved_nr = 0
            t_real = 0.0
            launches = record(B, D, C, prec)
            seen = {}
            for grid, args, kwargs in launches:
                phase = kwargs["PHASE"]
                fl, by, by_nr = phase_cost(phase, grid, args, kwargs, B, D, C, esize, mma_per)
                flops, moved, moved_nr = flops + fl, moved + by, moved_nr + by_nr
                t_real += max(fl / (PEAK[prec] * GEMM_EFF), by / ROW_BW) + LAUNCH_S
                seen.setdefault(phase, [grid, args, kwargs, 0])[3] += 1
            for phase, (grid, args, kwargs, count) in sorted(seen.items()):
                k = compile_sm90(args, kwargs)
                ptx = k.asm["ptx"]
                regs, spill = ptxas_v(ptx)
                n_mma = len(re.findall(r"^\s*mma\.", ptx, re.M))
                n_wgmma = len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M))
                programs = 1
                for g in grid:
                    programs *= g
                tiles = f"{kwargs['BLOCK_B']}×{kwargs['BLOCK_C']}×{kwargs['BLOCK_K']} / {kwargs['BLOCK_N']}"
                print(
                    f"| {B}, {D}, {C} | {prec} | {PHASES[phase]} | {count} × {tuple(grid)} = {programs} "
                    f"({programs / SMS:.2f}×) | {tiles} | {kwargs['num_warps']} | {regs} | {spill} "
                    f"| {n_mma} / {n_wgmma} |"
                )
            needed = (B * D + C * D) * esize + B * D * esize + B * 4  # features and anchors in, grad and loss out
            summary.append((B, D, C, prec, len(launches), moved / needed, moved_nr / needed, flops, t_real))
    print()
    print(
        "| B, D, C | precision | launches | bytes moved ÷ needed (L2 / no reuse) | GFLOP | time at peak FLOP/s | "
        "time at 4.3 TB/s (L2 model) | expected (GEMMs 70 %, rows 3.5 TB/s, 5 µs a launch) | native expected |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for B, D, C, prec, n, ratio, ratio_nr, flops, t_real in summary:
        needed = (B * D + C * D) * (2 if prec == "bf16" else 4) + B * D * (2 if prec == "bf16" else 4) + B * 4
        native = NATIVE_MS.get((B, D, C), {}).get(prec)
        print(
            f"| {B}, {D}, {C} | {prec} | {n} | {ratio:.1f} / {ratio_nr:.1f} | {flops / 1e9:.1f} "
            f"| {flops / PEAK[prec] * 1e3:.3f} ms | {ratio * needed / HBM * 1e3:.3f} ms | {t_real * 1e3:.3f} ms "
            f"| {'host-bound ~0.94-1.0 ms' if native is None else f'{native} ms'} |"
        )


if __name__ == "__main__":
    sys.exit(main())
