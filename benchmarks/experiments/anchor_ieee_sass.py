"""The Triton anchor loss's IEEE float32 dots (FMA, no tensor cores) read from sm_90 SASS: which tiles keep the FP32
pipes busy. No GPU needed; every figure is a prediction from the compiler's output, to be measured on an H100/H200.

For each candidate configuration (BLOCK_B × BLOCK_C (logits) / BLOCK_N (W·A) × BLOCK_K, num_warps, num_stages) the
logits phase and the W·A phase of kernels/anchor_loss.py are AOT-compiled for GPUTarget("cuda", 90, 32) exactly as a
launch compiles them, the cubin disassembled with the triton package's nvdisasm, and the main K loop (the backward
branch whose body holds the most FFMA) counted per iteration: FFMA, shared-memory loads (LDS*, LDSM), global loads
(LDG*, LDGSTS), barriers (BAR, DEPBAR, LDGDEPBAR), integer/address arithmetic, the rest. Registers and local memory
(spills) come from cuobjdump --dump-resource-usage, shared memory from the compile's metadata.

Model (stated, not measured; per SM of an H100/H200, 4 sub-partitions):
- issue: each sub-partition issues at most one warp instruction a cycle and runs one FFMA warp instruction a cycle,
  so the loop reaches at most FFMA / (all instructions) of the FP32 FMA peak ("density");
- shared memory: 128 bytes a cycle per SM (one wavefront). A warp's shared load costs max(ceil(unique bytes / 128),
  most distinct words in one bank) wavefronts; the addresses follow from the dot's accumulator layout in the TTGIR
  (each thread's rows of A and columns of B) and the operand tiles' shared layout (unswizzled, row-major here), so
  broadcasts and bank conflicts are counted, not guessed. smem bound = (FFMA / 4) / wavefronts per warp-iteration;
- L2: every program streams its A and B tiles from L2 (the grids reuse operands through L2, not HBM): bytes per
  FLOP = (rows + cols) · 4 / (2 · rows · cols); at an assumed 5.5 TB/s L2 → SM bandwidth (H100 SXM class);
- the whole program, not only the loop: the instructions outside the K loop (prologue, logits epilogue: exp, stores)
  are issued once per program, so a phase's density is FFMA_total / issued_total over its iterations;
- fraction of peak = min(issue density, smem bound, L2 bound) × SM efficiency: the programs spread evenly over the
  132 SMs, at most "CTAs/SM" (registers, shared memory, warps) at a time on one, and an SM runs at min(1, resident
  warps / 8) of its peak — two warps a sub-partition to hide the shared-load latency and each K step's barrier (an
  assumption: one warp a sub-partition stalls at every barrier with nothing to fill the gap); the busiest SM sets
  the time. Configs that cannot hold 8 warps on an SM are flagged (!).
Time of one call = Σ GEMM FLOPs / (67 TFLOP/s × fraction) + the same non-GEMM phases as native (rows, softmax,
finish: bytes at 3.5 TB/s + 5 µs a launch, anchor_triton_sm90.py's model). Native = cuBLAS SGEMM at 85 % of the
FMA peak for both GEMMs + the same epilogue. Ratio = native ÷ Triton (≥ 0.8 is the target of issue 19 point 4).

    PYTHONPATH=$PWD python benchmarks/experiments/anchor_ieee_sass.py [--configs 64x64x16/64w4s3 ...] [--chosen]

Run it with either triton (3.8 here, the floor's 3.6: /tmp/ppml-floor-venv/bin/python); it prints Markdown tables.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from anchor_triton_sm90 import compile_sm90  # noqa: E402  (the launch-exact sm_90 compile)

from ppml.kernels import anchor_loss as K  # noqa: E402

SMS, REGS_PER_SM, SMEM_PER_SM, SMEM_PER_CTA_MAX, WARPS_PER_SM, CTAS_PER_SM = 132, 65536, 233472, 232448, 64, 32
FMA_PEAK, NATIVE_EFF, L2_BW, ROW_BW, LAUNCH_S = 67e12, 0.85, 5.5e12, 3.5e12, 5e-6
SIZES = [(256, 768, 1000), (1024, 2048, 1000), (4096, 768, 32000)]
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# BLOCK_B x BLOCK_C(=BLOCK_N) x BLOCK_K / num_warps / num_stages
DEFAULT_CONFIGS = [
    "64x64x16w4s3",  # before 2026-12-05
    "64x64x16w4s2",
    "64x64x32w4s3",
    "64x64x32w4s2",  # launch_config's since 2026-12-05
    "64x64x16w2s3",
    "64x32x16w2s3",
    "32x32x16w2s3",
    "128x64x16w4s3",
    "128x64x16w8s3",
    "128x128x16w8s3",
    "128x128x32w8s2",
    "128x128x16w4s2",
]


def parse_config(text):
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise SystemExit(f"--configs: expected BxCxKwWARPSsSTAGES (e.g. 64x64x16w4s3), got {text!r}")
    return tuple(map(int, m.groups()))


def launches_for(bb, bc, bk, warps, stages, dtype=torch.float32):
    """The logits and W·A launches of a small float32 IEEE call at D = 768 with the tiles forced (block sizes depend on
    D's divisibility and the constexprs only; B, C and the split counts are not specialised)."""
    recorded = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append((grid, args, kwargs))

    f, a = torch.zeros(4, 768, dtype=dtype), torch.randn(5, 768, dtype=dtype)
    y = torch.zeros(4, dtype=torch.int64)
    cfg = K.Config(bb, bc, bk, bc, max(bk, 256 * warps), 4, 1, warps, stages)
    saved, tf32 = K._anchor_loss_kernel, torch.backends.cuda.matmul.allow_tf32
    K._anchor_loss_kernel, torch.backends.cuda.matmul.allow_tf32 = Recorder(), False
    try:
        K.anchor_loss_triton(f, a, y, "sqeuclidean", 1.0, 0.1, True, config=cfg)
    finally:
        K._anchor_loss_kernel, torch.backends.cuda.matmul.allow_tf32 = saved, tf32
    out = {}
    for _grid, args, kwargs in recorded:
        if kwargs["PHASE"] in (K._LOGITS, K._WA):
            out[kwargs["PHASE"]] = (args, kwargs)
    return out


def sass_of(cubin: bytes) -> tuple[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True, check=True)
        res = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        )
    usage = dict((k, int(v)) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res.stdout))
    return sass.stdout, usage


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)(.*);")


def categorise(op):
    base = op.split(".")[0]
    if base == "FFMA":
        return "FFMA"
    if base in ("LDS", "LDSM"):
        return "LDS"
    if base in ("LDG", "LDGSTS"):
        return "LDG"
    if base in ("BAR", "DEPBAR", "LDGDEPBAR", "WARPSYNC"):
        return "BAR"
    if base in (
        "IADD3",
        "IMAD",
        "LEA",
        "SHF",
        "LOP3",
        "ISETP",
        "SEL",
        "MOV",
        "IABS",
        "UIADD3",
        "UIMAD",
        "ULEA",
        "USHF",
        "ULOP3",
        "UISETP",
        "USEL",
        "UMOV",
        "IADD",
        "VIADD",
        "PRMT",
        "PLOP3",
        "R2UR",
        "S2UR",
        "S2R",
    ):
        return "int"
    return "other"


def main_loop(sass: str):
    """(per-iteration counts, instructions outside the loop) of the backward branch with the most FFMA."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = lines[labels[m.group(1)] : i + 1]
            n_ffma = sum(1 for b in body if (mm := _INSTR.match(b)) and mm.group(1).startswith("FFMA"))
            key = (n_ffma, -(i - labels[m.group(1)]))
            if best is None or key > best[0]:
                best = (key, labels[m.group(1)], i)
    if best is None:
        raise RuntimeError("no backward branch in the SASS")
    _, lo, hi = best
    counts, lds_ops, outside = {}, {}, 0
    for i, line in enumerate(lines):
        mm = _INSTR.match(line)
        if not mm or mm.group(1) == "NOP":
            continue
        if lo <= i <= hi:
            cat = categorise(mm.group(1))
            counts[cat] = counts.get(cat, 0) + 1
            if cat == "LDS":
                lds_ops[mm.group(1)] = lds_ops.get(mm.group(1), 0) + 1
        elif not (mm.group(1) == "BRA" and "`(.L_x_" in line and re.search(r"^(\.L_x_\d+):", lines[i - 1] or "")):
            outside += 1
    return counts, lds_ops, outside


def acc_layout(ttgir: str, shape: tuple[int, int]):
    """sizePerThread, threadsPerWarp, warpsPerCTA of the tt.dot result (a #blocked layout for FMA dots)."""
    m = re.search(r"tt\.dot .*-> tensor<(\d+)x(\d+)xf32, #(\w+)>", ttgir)
    if not m or (int(m.group(1)), int(m.group(2))) != shape:
        raise RuntimeError(f"no {shape} f32 tt.dot in the TTGIR")
    lay = re.search(rf"#{m.group(3)} = #ttg\.blocked<\{{(.*?)\}}>", ttgir).group(1)
    get = lambda name: [int(x) for x in re.search(rf"{name} = \[([\d, ]+)\]", lay).group(1).split(",")]  # noqa: E731
    return get("sizePerThread"), get("threadsPerWarp"), get("warpsPerCTA"), get("order")


def wavefronts(addr_sets):
    """Shared-memory wavefronts of one warp instruction whose threads read the given byte ranges [start, end)."""
    words = {w for s, e in addr_sets for w in range(s // 4, e // 4)}
    per_bank = {}
    for w in words:
        per_bank[w % 32] = per_bank.get(w % 32, 0) + 1
    return max(-(-len(words) * 4 // 128), max(per_bank.values()))


def smem_wavefronts(layout, rows, cols, bk, vec):
    """Wavefronts per warp per K step of BLOCK_K for the FMA dot (A [rows, bk] row-major, B [bk, cols] row-major in
    shared memory, as the TTGIR's unswizzled #shared layouts), each thread loading its A rows `vec` K values at a time
    and its B columns in sizePerThread[1] runs. One warp (warp 0) stands for all."""
    spt, tpw, _, order = layout
    lanes = [
        (lane // tpw[1], lane % tpw[1]) if order == [1, 0] else (lane % tpw[0], lane // tpw[0]) for lane in range(32)
    ]
    rep_m = rows // (spt[0] * tpw[0] * layout[2][0]) or 1
    rep_n = cols // (spt[1] * tpw[1] * layout[2][1]) or 1
    total = 0
    for k0 in range(0, bk, vec):
        for r in range(rep_m):
            for i in range(spt[0]):  # one A load per row of the thread: its `vec` K values
                rows_ = {r * spt[0] * tpw[0] * layout[2][0] + tm * spt[0] + i for tm, _ in lanes}
                total += wavefronts([(m * bk * 4 + k0 * 4, m * bk * 4 + (k0 + vec) * 4) for m in rows_])
        for k in range(k0, k0 + vec):
            for r in range(rep_n):
                starts = {r * spt[1] * tpw[1] * layout[2][1] + tn * spt[1] for _, tn in lanes}
                total += wavefronts([(k * cols * 4 + n * 4, k * cols * 4 + (n + spt[1]) * 4) for n in starts])
    return total


def occupancy(regs, smem, warps):
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + 1024) if smem else CTAS_PER_SM
    return min(by_regs, by_smem, WARPS_PER_SM // warps, CTAS_PER_SM)


def analyse(text):
    bb, bc, bk, warps, stages = parse_config(text)
    res = {}
    for phase, (args, kwargs) in launches_for(bb, bc, bk, warps, stages).items():
        k = compile_sm90(args, kwargs)
        sass, usage = sass_of(k.asm["cubin"])
        counts, lds_ops, outside = main_loop(sass)
        shape = (bb, bc)
        layout = acc_layout(k.asm["ttgir"], shape)
        n_all = sum(counts.values())
        ffma = counts.get("FFMA", 0)
        lds_bytes = sum(
            n * (int(op.split(".")[1]) // 8 if op.count(".") and op.split(".")[1].isdigit() else 4)
            for op, n in lds_ops.items()
        )
        vec = 4 if any(".128" in op for op in lds_ops) else (2 if any(".64" in op for op in lds_ops) else 1)
        wf = smem_wavefronts(layout, bb, bc, bk, vec)
        smem = k.metadata.shared
        occ = occupancy(usage["REG"], smem, warps)
        res[phase] = dict(
            counts=counts,
            lds_ops=lds_ops,
            n_all=n_all,
            ffma=ffma,
            outside=outside,
            lds_bytes=lds_bytes,
            wf=wf,
            regs=usage["REG"],
            spill=usage["LOCAL"],
            smem=smem,
            occ=occ,
            layout=layout,
            density=ffma / n_all if n_all else 0.0,
            smem_bound=min(1.0, (ffma / 4) / wf) if wf else 1.0,
        )
    return (bb, bc, bk, warps, stages), res


def sm_efficiency(programs, occ, warps):
    """Share of the SMs' FMA throughput a grid gets: programs go to the SMs evenly, up to occ at a time on one SM, and
    an SM runs at min(1, resident warps / 8) of its peak (two warps a sub-partition hide the shared-load latency
    and the K step's barrier; fewer leave issue slots empty). The busiest SM sets the time."""
    sat = lambda n: min(1.0, n * warps / 8)  # noqa: E731
    p = -(-programs // SMS)
    full, r = divmod(p, occ)
    busiest = full * occ / sat(occ) + (r / sat(r) if r else 0.0)
    return programs / (SMS * busiest)


def phase_fraction(r, iters, programs, l2_bound, warps):
    """Predicted fraction of the FP32 FMA peak of one GEMM phase (see the module docstring)."""
    issued = iters * r["n_all"] + r["outside"]
    density = iters * r["ffma"] / issued
    eff = sm_efficiency(programs, max(r["occ"], 1), warps)
    return min(density, r["smem_bound"], l2_bound) * eff, density, eff


def predict(cfg, res, B, D, C):
    """(Triton ms, native ms, details) at one size, the grids and splits as the launcher would pick them."""
    bb, bc, bk, warps, _ = cfg
    chunk = K.chunk_rows(B, C, True)
    chunks = -(-B // chunk)
    rb = -(-chunk // bb)
    bn = min(bc, max(16, triton.next_power_of_2(D)))
    splits = K._pick_splits(rb * -(-D // bn), -(-C // bk), chunk, D, SMS)
    k_steps = triton.cdiv(C, bk)
    kps = triton.cdiv(k_steps, splits)  # whole K steps a split, none empty, as the launcher
    splits = triton.cdiv(k_steps, kps)
    gemm = 2 * chunk * C * D  # FLOPs of one GEMM per chunk
    l2 = min(1.0, L2_BW * (2 * bb * bc / ((bb + bc) * 4)) / FMA_PEAK)
    f1, d1, w1 = phase_fraction(res[K._LOGITS], -(-D // bk), rb * -(-C // bc), l2, warps)
    f3, d3, w3 = phase_fraction(res[K._WA], kps, -(-D // bn) * rb * splits, l2, warps)
    t_gemm = chunks * (gemm / (FMA_PEAK * f1) + gemm / (FMA_PEAK * f3) + 2 * LAUNCH_S)
    # The phases both implementations share: rows (features + y's anchors), per chunk the softmax pass over the
    # [chunk, C] buffer (read, write), the finish (features, anchors of y, the W·A result, the gradient).
    acc = 4
    rest = (2 * B * D * acc) / ROW_BW + LAUNCH_S
    rest += chunks * ((2 * chunk * C * acc) / ROW_BW + LAUNCH_S + (splits + 3) * chunk * D * acc / ROW_BW + LAUNCH_S)
    t_native = chunks * 2 * gemm / (FMA_PEAK * NATIVE_EFF) + rest
    det = dict(logits=(rb * -(-C // bc), f1, d1, w1), wa=(-(-D // bn) * rb * splits, f3, d3, w3), splits=splits)
    return (t_gemm + rest) * 1e3, t_native * 1e3, det


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, help="BxCxKwWARPSsSTAGES, e.g. 64x64x16w4s3")
    ns = p.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_90 AOT (GPUTarget('cuda', 90, 32)), fp32 IEEE")
    print()
    print(
        "| config (B×C/N×K, warps, stages) | phase | acc layout spt / tpw / wpc | loop: FFMA "
        "| LDS (ops) | LDG | BAR | int | other | FFMA density | FFMA / LDS byte | smem wavefronts | smem bound "
        "| outside loop | regs "
        "| spill B | smem KB | CTAs/SM |"
    )
    print("|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for text in ns.configs:
        try:
            cfg, res = analyse(text)
        except Exception as e:  # a config that does not compile is a result too
            print(f"| {text} | — | compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:120]} |")
            continue
        results.append((text, cfg, res))
        for phase, name in ((K._LOGITS, "logits"), (K._WA, "W·A")):
            r = res[phase]
            c = r["counts"]
            spt, tpw, wpc, _ = r["layout"]
            ops = ", ".join(f"{n} {op}" for op, n in sorted(r["lds_ops"].items()))
            print(
                f"| {text} | {name} | {spt} / {tpw} / {wpc} | {r['ffma']} | {c.get('LDS', 0)} ({ops}) "
                f"| {c.get('LDG', 0)} | {c.get('BAR', 0)} | {c.get('int', 0)} | {c.get('other', 0)} "
                f"| {r['density']:.3f} | {r['ffma'] / max(r['lds_bytes'], 1):.2f} | {r['wf']} "
                f"| {r['smem_bound']:.2f} | {r['outside']} | {r['regs']} | {r['spill']} | {r['smem'] / 1024:.0f} "
                f"| {r['occ']}{'' if r['occ'] * cfg[3] >= 8 else ' (!)'} |"
            )
    print()
    print(
        "| config | B, D, C | logits programs (÷ slots) · fraction of FMA peak (density × SM efficiency) "
        "| W·A programs · splits · fraction | Triton ms | native ms (SGEMM 85 %) | native ÷ Triton |"
    )
    print("|---|---|---|---|---:|---:|---:|")
    for text, cfg, res in results:
        for B, D, C in SIZES:
            t, tn, det = predict(cfg, res, B, D, C)
            (p1, f1, d1, w1), (p3, f3, d3, w3) = det["logits"], det["wa"]
            slots1, slots3 = SMS * res[K._LOGITS]["occ"], SMS * res[K._WA]["occ"]
            print(
                f"| {text} | {B}, {D}, {C} | {p1} ({p1 / slots1:.2f}) · {f1:.2f} ({d1:.2f} × {w1:.2f}) "
                f"| {p3} ({p3 / slots3:.2f}) · {det['splits']} · {f3:.2f} ({d3:.2f} × {w3:.2f}) "
                f"| {t:.3f} | {tn:.3f} | {tn / t:.2f} |"
            )


if __name__ == "__main__":
    sys.exit(main())
