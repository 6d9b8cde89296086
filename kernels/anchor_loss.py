"""Triton kernel of ppml::anchor_loss: per-sample loss and d(loss_i)/d(f_i), built like the fused linear
cross-entropy of Liger-Kernel: per chunk of rows, the logits as tl.dot tiles on tensor cores into a bounded
[chunk, C] buffer, a row pass that turns them into the gradient coefficients W in place, and W·A as a second tl.dot
GEMM. Every logit is computed once: 2BCD for the logits plus 2BCD for W·A (4BCD for 16-bit inputs, whose W·A is two
dots, below), as eager and the native CUDA kernel.

One jit function, five phases (the PHASE constexpr; one name, so the sm_90 AOT replay of the tests compiles all):

0. rows (grid: row blocks, all B): per row ‖f‖², ‖f − a_y‖² (from the difference vector, as the reference: the
   expanded form cancels badly near the anchor) and f·a_y, into a [3, B] buffer the other phases read.
Then per chunk of rows (chunk_rows: the native kernels' sizing, csrc/common/anchor_loss.h, so that the [chunk, C]
buffer holds at most 64M elements):
1. logits (grid: row blocks × class tiles, the row block fastest, so that one anchor tile serves every row block
   from L2 while the chunk's features stay there): f·a_c accumulated by tl.dot over D in BLOCK_K steps, then squared
   Euclidean u_c = γ f·a_c − (γ/2)‖a_c‖² (the ‖f‖² row constant cancels in the softmax and is left out, as
   loss_and_grad), Euclidean −γ·√max(‖f‖² − 2f·a_c + ‖a_c‖², ε), cosine γ·f̂·â_c, the true class's logit from phase
   0 (Euclidean: its distance from the difference vector); the tile's logits go to the buffer, its (max, Σexp) per row
   to a [2, chunk, class tiles] buffer.
2. softmax (grid: the chunk's rows, one program each): the tiles' (max, sum) merged (online log-sum-exp), the loss
   (without the pull term), then one read of the row that writes over each logit its coefficient w_c of
   loss_and_grad (squared Euclidean γ·dz; Euclidean −γ dz/d_c, 0 under the distance floor, d_c = −z_c/γ; cosine
   γ·dz/‖a_c‖), and Σ_c w_c.
3. W·A (grid: 128-column blocks × row blocks × class splits, the column block fastest, so that the programs reading
   one W row block run together): tl.dot over the classes in BLOCK_K steps, the splits (split-K, only where the output
   tiles alone leave SMs idle) written to a [S, chunk, D] buffer and summed in a fixed order by phase 4: deterministic.
4. finish (grid: row blocks): the loss's pull term and the per-row gradient terms over the summed splits: squared
   Euclidean dF = w·A; Euclidean dF = f·Σw − w·A; both + pull·(f − a_y); cosine dF̂ = w·A − pull·â_y,
   dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖ (dF̂/ε when ‖f‖ <= ε), dF̂·f̂ summed over the whole row first; rounded once to the
   features' dtype.

Memory: besides the outputs, [3, B] + one [chunk, C] buffer (≤ 64M elements, as native) + [2, chunk, C/BLOCK_C] +
S·chunk·D + chunk accumulation-dtype values (S·chunk·D ≤ 16M; the buffer's rows padded to whole K steps). Bytes: the
buffer is written once (phase 1), read and rewritten once (phase 2) and read by phase 3 (the column blocks of one row
block share it through L2).

Precision (DOT constexpr), as torch's matmul: 16-bit features with anchors of the same dtype multiply in that dtype with
float32 accumulation (the products are exact, so the logits are as good as float32 dots of the widened inputs); float32
uses TF32 when torch.backends.cuda.matmul.allow_tf32 is set when the launcher is called, IEEE float32 otherwise (and for
mixed dtypes); float64 stays float64. In the 16-bit path W keeps more than 16 bits: for bfloat16, phase 2 writes it as
w_hi + w_lo, both bfloat16, in the bytes of its logits (per K step of W·A, the step's w_hi then its w_lo), and phase 3
runs two bfloat16 dots; for float16 (whose range is too small for the Euclidean w = −γ dz/d near an anchor) W stays
float32 and phase 3 splits it on load into TF32 halves against the exactly widened anchors. Either way w·A comes to
~2^-16 relative, where one rounding of w would cost the gradient ~2^-9 per class. scale and pull arrive as float64
arguments and are rounded to the accumulation dtype in the kernel (a Python float argument would be float32, too coarse
for float64 features).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ppml._constants import COS_EPS, DIST2_EPS

from ._common import div_rn, round_to_bfloat16

_METRIC_IDS = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}
_SQEUCLIDEAN = tl.constexpr(0)
_EUCLIDEAN = tl.constexpr(1)
_COSINE = tl.constexpr(2)
_COS_EPS = tl.constexpr(COS_EPS)
_DIST2_EPS = tl.constexpr(DIST2_EPS)

# DOT: how the tiles multiply.
DOT_IEEE, DOT_TF32, DOT_16 = 0, 1, 2
_DOT_IEEE = tl.constexpr(DOT_IEEE)
_DOT_TF32 = tl.constexpr(DOT_TF32)
_DOT_16 = tl.constexpr(DOT_16)

# The interpreter (triton 3.6 and 3.8) reads bfloat16 tl.dot operands as integers (numpy has no bfloat16: a 16×16 dot
# is off by ~1e10), so there its bfloat16 operands are widened first: the same products (exact in float32 either way)
# and float32 sums, what the GPU's MMA computes up to the order of the sums. Read at import, like TRITON_INTERPRET.
_WIDEN_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "") == "1")

_ROWS, _LOGITS, _SOFTMAX, _WA, _FINISH = 0, 1, 2, 3, 4
_P_ROWS = tl.constexpr(_ROWS)
_P_LOGITS = tl.constexpr(_LOGITS)
_P_SOFTMAX = tl.constexpr(_SOFTMAX)
_P_WA = tl.constexpr(_WA)
_P_FINISH = tl.constexpr(_FINISH)

# The [rows, C] buffer's budget in elements: csrc/common/anchor_loss.h's kAnchorChunkElements, with the same
# PPML_ANCHOR_CHUNK_ELEMENTS override (tests use it to force several chunks).
CHUNK_ELEMENTS = 1 << 26
# The W·A split buffer (S·chunk·D values) stays within a quarter of that budget.
_SPLIT_ELEMENTS = CHUNK_ELEMENTS // 4
_MAX_SPLITS = 16
# SMs assumed where the features are not on a GPU (the interpreter, the AOT experiments): an H100/H200's.
_DEFAULT_SMS = 132


class Config(NamedTuple):
    """Tile sizes, chunk and class splits of one launch (see launch_config)."""

    block_b: int  # rows per tile (logits and W·A)
    block_c: int  # classes per logit tile
    block_k: int  # the tl.dot K step: feature columns (logits), classes (W·A)
    block_n: int  # gradient columns per W·A program
    block_r: int  # classes per step of the softmax row pass
    chunk: int  # rows per chunk: the [chunk, C] buffer
    splits: int  # class splits of W·A (an upper bound: splits are whole K steps, none empty)
    num_warps: int
    num_stages: int = 3  # software-pipeline depth of the tl.dot loops (3: Triton's default on CUDA)


def chunk_rows(B: int, C: int, softmax: bool) -> int:
    """Rows per chunk, as csrc/common/anchor_loss.h's anchor_chunk_rows: as many as the [rows, C] buffer's budget
    allows, evened out over the chunks the batch needs (B = 4096 at C = 32,000: two chunks of 2048 rows)."""
    if not softmax or B <= 0:
        return max(B, 1)
    budget = CHUNK_ELEMENTS
    env = os.environ.get("PPML_ANCHOR_CHUNK_ELEMENTS", "")
    if env.strip().lstrip("-").isdigit() and int(env) > 0:
        budget = int(env)
    most = max(1, min(B, budget // C))
    chunks = triton.cdiv(B, most)
    return triton.cdiv(B, chunks)


def _pick_splits(tiles: int, k_steps: int, chunk: int, D: int, sms: int) -> int:
    """Class splits of W·A: the fewest within 5 % of the best waves × (K steps per split), i.e. split-K only where the
    output tiles alone would leave SMs idle or a last wave half empty; the split buffer within _SPLIT_ELEMENTS."""
    most = max(1, min(_MAX_SPLITS, k_steps, _SPLIT_ELEMENTS // max(1, chunk * D)))
    cost = {}
    for s in range(1, most + 1):
        per = triton.cdiv(k_steps, s)
        s_eff = triton.cdiv(k_steps, per)
        cost.setdefault(s_eff, triton.cdiv(tiles * s_eff, sms) * per)
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= 1.05 * best)


def launch_config(B: int, C: int, D: int, dot: int, softmax: bool = True, sms: int = _DEFAULT_SMS) -> Config:
    """Tensor-core tiles of 128 (rows, classes) × 64 (16-bit) or 32 (TF32) K, 8 warps, cut to 64 × 64 where the
    chunk has too few 128-tiles to fill the SMs twice (B = 256 at C = 1,000); 128 gradient columns.

    The FMA-based IEEE/float32 and float64 dots: 64 × 64 × 32, 4 warps, 2 pipeline stages, 64 gradient columns. From
    the sm_90 SASS (benchmarks/experiments/anchor_ieee_sass.py, benchmarks/RESULTS.md "IEEE fp32 FMA dots", triton 3.8
    and 3.6 alike): 32 outputs a thread (4 × 4, two row repeats), FFMA density of the K loop 0.87 (logits) / 0.84
    (W·A), against 0.85 / 0.82 for the previous 64 × 64 × 16 in 3 stages (a 32-wide K step cuts the loop's address
    arithmetic, barriers and cp.async waits per FFMA by a quarter to a third); 168 / 96 registers, no spills, 16 KB
    shared memory, 3 / 5 CTAs an SM. Predicted (not measured) ≈ 0.83 of the FP32 FMA peak at (4096, 768, 32,000),
    ≈ 0.96× native's cuBLAS SGEMM at 85 %. 128 × 128 tiles (64 outputs a thread) reach density 0.89 but take 255
    registers and one CTA an SM, and quarter the logits grid at C = 1,000: predicted ≤ 4 % better at C = 32,000, 25 %
    worse at 1,000."""
    chunk = chunk_rows(B, C, softmax)
    if dot == DOT_IEEE:
        bb, bc, bk, bn, warps, stages = 64, 64, 32, 64, 4, 2
    else:
        stages = 3
        bb, bc, bk, bn, warps = 128, 128, 64 if dot == DOT_16 else 32, 128, 8
        if triton.cdiv(chunk, bb) * triton.cdiv(C, bc) < 2 * sms:
            bb, bc, warps = 64, 64, 4
    p2 = max(16, triton.next_power_of_2(max(D, 1)))  # tl.dot wants every dimension >= 16
    bk, bn = min(bk, p2), min(bn, p2)
    tiles = triton.cdiv(chunk, bb) * triton.cdiv(D, bn)
    splits = _pick_splits(tiles, triton.cdiv(C, bk), chunk, D, sms)
    # Phase 2: 8 classes a thread per step (16 spilled 4 bytes with 4 warps, triton 3.6), whole K steps (packed W).
    br = max(bk, min(256 * warps, max(16, triton.next_power_of_2(C))))
    return Config(bb, bc, bk, bn, br, chunk, splits, warps, stages)


def dot_mode(features: torch.Tensor, anchors: torch.Tensor) -> int:
    """DOT_16 for 16-bit features with anchors of the same dtype, DOT_TF32 for float32 arithmetic when
    torch.backends.cuda.matmul.allow_tf32 allows it, DOT_IEEE otherwise (float64 included)."""
    if features.dtype in (torch.bfloat16, torch.float16) and anchors.dtype == features.dtype:
        return DOT_16
    if features.dtype != torch.float64 and torch.backends.cuda.matmul.allow_tf32:
        return DOT_TF32
    return DOT_IEEE


@triton.jit
def _to_acc(x, ACC: tl.constexpr):
    """A float64 kernel argument in the accumulation dtype. Written as 0 + x because the interpreter passes a Python
    float (a weak scalar that takes ACC), the compiled kernel a float64 scalar (promoted, then rounded once here)."""
    return (tl.zeros([], ACC) + x).to(ACC)


@triton.jit
def _sqrt(x):
    """IEEE-rounded square root: tl.sqrt is the approximate one for float32, and sqrt_rn takes float32 only."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _mma(x, y, acc, DOT: tl.constexpr, ACC: tl.constexpr):
    """acc + x @ y in the launch's precision (x, y as loaded: 16-bit in DOT_16, else any float dtype)."""
    if DOT == _DOT_16:
        if _WIDEN_BF16 and x.dtype == tl.bfloat16:
            r = tl.dot(x.to(ACC), y.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
        else:
            r = tl.dot(x, y, acc, out_dtype=ACC)
    elif DOT == _DOT_TF32:
        r = tl.dot(x.to(ACC), y.to(ACC), acc, input_precision="tf32", out_dtype=ACC)
    else:
        r = tl.dot(x.to(ACC), y.to(ACC), acc, input_precision="ieee", out_dtype=ACC)
    return r


@triton.jit
def _dots(
    features,
    anchors,
    rows,
    row_mask,
    c,
    c_mask,
    D,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """f·a_c for a block of rows and classes, [BLOCK_B, BLOCK_C], accumulated over D in BLOCK_K steps."""
    offs_k = tl.arange(0, BLOCK_K)
    f_rows = features + rows * D
    a_rows = anchors + c.to(tl.int64) * D
    acc = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < D
        f = tl.load(f_rows[:, None] + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0)
        # [BLOCK_K, BLOCK_C]: the anchors' tile loaded transposed, the MMA's B operand as it wants it.
        a = tl.load(a_rows[None, :] + k[:, None], mask=c_mask[None, :] & k_mask[:, None], other=0)
        acc = _mma(f, a, acc, DOT, ACC)
    return acc


@triton.jit
def _row_terms(rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC: tl.constexpr, ACC: tl.constexpr):
    """Phase 0's per-row values and what follows from them: (lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho). rows may
    be a block or a single row."""
    lab = tl.load(labels + rows, mask=row_mask, other=0)
    # The caller checks labels (a device-side assert on a GPU, queued ahead of this launch); the clamp keeps even a
    # bad one from indexing outside the anchors.
    lab = tl.minimum(tl.maximum(lab, 0), C - 1)
    fn2 = tl.load(rowstats + rows, mask=row_mask, other=0)
    dy2 = tl.load(rowstats + B + rows, mask=row_mask, other=0)
    fay = tl.load(rowstats + 2 * B + rows, mask=row_mask, other=0)
    fnorm = _sqrt(fn2)
    fden = tl.maximum(fnorm, _COS_EPS)
    an_y = tl.load(anorm + lab)  # cosine: 1/max(‖a_y‖, ε); Euclidean: ‖a_y‖²
    if METRIC == _COSINE:
        cos_y = fay * (1.0 / fden) * an_y
        zy = gamma * cos_y
        rho = 1.0 - cos_y
    else:
        if METRIC == _SQEUCLIDEAN:
            zy = gamma * fay - (0.5 * gamma) * an_y
        else:
            zy = -gamma * _sqrt(tl.maximum(dy2, _DIST2_EPS))
        rho = 0.5 * dy2
    return lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho


@triton.jit
def _logits(dots, c, c_mask, lab, anorm, fn2, inv_fden, dy2, zy, gamma, METRIC: tl.constexpr):
    """z for one tile: masked classes get −inf (nothing in the softmax), the true class its phase-0 value."""
    an = tl.load(anorm + c, mask=c_mask, other=0)
    is_y = c[None, :] == lab[:, None]
    if METRIC == _COSINE:
        z = gamma * (dots * inv_fden[:, None]) * an[None, :]
    elif METRIC == _SQEUCLIDEAN:
        z = gamma * dots - (0.5 * gamma) * an[None, :]
    else:
        d2 = tl.maximum(fn2[:, None] - 2 * dots + an[None, :], 0.0)
        z = -gamma * _sqrt(tl.maximum(d2, _DIST2_EPS))
    z = tl.where(is_y, zy[:, None], z)
    return tl.where(c_mask[None, :], z, float("-inf"))


@triton.jit
def _wa_dot(w, a, acc, DOT: tl.constexpr, ACC: tl.constexpr):
    """acc + w @ a, w the float32 coefficients, a the anchors' [BLOCK_K, BLOCK_N] tile as loaded (bfloat16 W comes
    packed, see phase 2). In DOT_16 (float16 anchors), w as w_hi + w_lo in TF32 against the anchors widened exactly
    to float32: a float16 w would not have the exponent range (see the module docstring)."""
    if DOT == _DOT_16:
        a32 = a.to(ACC)
        # the top 10 mantissa bits: exactly a TF32 value
        w_hi = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(ACC, bitcast=True)
        r = tl.dot(w - w_hi, a32, acc, input_precision="tf32", out_dtype=ACC)
        r = tl.dot(w_hi, a32, r, input_precision="tf32", out_dtype=ACC)
    else:
        r = _mma(w, a, acc, DOT, ACC)
    return r


@triton.jit
def _column_slice(
    partial,
    f_rows,
    ay_rows,
    local,
    row_mask,
    k,
    NB,
    D,
    S,
    SOFTMAX: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The columns ``k`` of the rows' finish step: their mask, w·A summed over the S class splits' partials (zero
    without softmax), the features and the true class's anchor, in ACC."""
    m2 = row_mask[:, None] & (k < D)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_K], ACC)
    if SOFTMAX:
        for s in range(0, S):
            acc += tl.load(partial + (s * NB + local)[:, None] * D + k[None, :], mask=m2, other=0)
    f = tl.load(f_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
    ay = tl.load(ay_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
    return m2, acc, f, ay


@triton.jit
def _softmax_row(
    zbuf,
    wbuf,
    tstats,
    anorm,
    labels,
    rowstats,
    loss,
    wsums,
    local,
    B,
    C,
    NB,
    T,
    LDZ,
    gamma,
    METRIC: tl.constexpr,
    ACC: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    R0,
):
    """Phase 2 for the chunk's row ``local``: the class tiles' (max, sum) merged, the loss without its pull term, W
    written over the logits (PACKED: as bfloat16 w_hi, w_lo, each K step's BLOCK_K w_hi then its BLOCK_K w_lo in the
    bytes of that K step's logits), Σw (of W before any rounding)."""
    row = R0 + local
    offs = tl.arange(0, BLOCK_R)
    lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
        rowstats, anorm, labels, row, row < B, B, C, gamma, METRIC, ACC
    )
    # Kept as the pair (max, sum), never folded into lse = max + log(sum) before use: the logits can be in the
    # thousands, where one ulp of lse is ~1e-4 and exp(z − lse) would carry that error into every probability;
    # z − max is exact for the classes that matter (Sterbenz).
    t_max = tstats + local * T
    t_sum = tstats + (NB + local) * T
    m_vec = tl.full([BLOCK_R], float("-inf"), ACC)
    for t0 in range(0, T, BLOCK_R):
        t = t0 + offs
        m_vec = tl.maximum(m_vec, tl.load(t_max + t, mask=t < T, other=float("-inf")))
    run_max = tl.max(m_vec, 0)
    s_vec = tl.zeros([BLOCK_R], ACC)
    for t0 in range(0, T, BLOCK_R):
        t = t0 + offs
        tm = t < T
        m = tl.load(t_max + t, mask=tm, other=float("-inf"))
        s_vec += tl.where(tm, tl.load(t_sum + t, mask=tm, other=0) * tl.exp(m - run_max), 0.0)
    run_sum = tl.sum(s_vec, 0)
    tl.store(loss + row, (run_max - zy) + tl.log(run_sum))
    inv_sum = 1.0 / run_sum
    # The Euclidean logit at the distance floor, computed as phase 1 computes it there: below it w is 0.
    z_floor = -gamma * _sqrt(tl.full([], _DIST2_EPS, ACC))
    zrow = zbuf + local * LDZ
    w_vec = tl.zeros([BLOCK_R], ACC)
    # The whole padded row (LDZ, divisible by 16, bounds the vector loads and stores; C, not specialised, would make
    # them scalar): the padding gets w = 0, so that W·A reads W unmasked.
    for c0 in range(0, LDZ, BLOCK_R):
        c = c0 + offs
        cm = c < C
        in_row = c < LDZ
        z = tl.where(cm, tl.load(zrow + c, mask=in_row, other=0), float("-inf"))
        dz = tl.exp(z - run_max) * inv_sum - tl.where(c == lab, 1.0, 0.0)
        if METRIC == _SQEUCLIDEAN:
            w = gamma * dz  # ∂u_c/∂f = γ·a_c
        elif METRIC == _EUCLIDEAN:
            # ∂z/∂d2 = −γ/(2d) with d = −z/γ; 0 where the distance floor is active (the reference's torch.where).
            w = tl.where(z < z_floor, (gamma * gamma) * dz / z, 0.0)
        else:
            an = tl.load(anorm + c, mask=cm, other=0)
            w = gamma * dz * an
        w = tl.where(cm, w, 0.0)
        w_vec += w
        if PACKED:
            # Rounded on the bits (the interpreter's cast truncates); w_hi + w_lo is w to ~2^-16.
            w_hi = round_to_bfloat16(w)
            w_lo = round_to_bfloat16(w - w_hi.to(ACC))
            # The pair lands in bytes of logits other threads of this program read: all of this block's reads first.
            # (BLOCK_R is a multiple of BLOCK_K, so the block's K steps, and the bytes written, are its own.)
            tl.debug_barrier()
            k_start = (c // BLOCK_K) * BLOCK_K
            dst = wbuf + local * (2 * LDZ) + 2 * k_start + (c - k_start)
            tl.store(dst, w_hi, mask=in_row)
            tl.store(dst + BLOCK_K, w_lo, mask=in_row)
        else:
            tl.store(zrow + c, w, mask=in_row)
    tl.store(wsums + local, tl.sum(w_vec, 0))


# B, C, the chunk's rows and the split counts only bound masks and loops (never an address's alignment), so they are
# not specialised: otherwise B or C equal to 1 or divisible by 16 would each be a separate compile (~1 s), e.g. a
# training run's last, partial batch.
@triton.jit(do_not_specialize=["B", "C", "R0", "NB", "T", "S", "KPS"])
def _anchor_loss_kernel(
    features,
    anchors,
    anorm,
    labels,
    rowstats,
    zbuf,
    wbuf,
    tstats,
    partial,
    wsums,
    loss,
    grad,
    B,
    C,
    D,
    R0,
    NB,
    T,
    S,
    KPS,
    LDZ,
    scale: tl.float64,
    pull: tl.float64,
    PHASE: tl.constexpr,
    METRIC: tl.constexpr,
    SOFTMAX: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    gamma = _to_acc(scale, ACC)
    rho_w = _to_acc(pull, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    # Chunk-local rows (the chunk's buffers) and global rows (features, labels, outputs). int64 before any row meets D
    # or C: B·D and chunk·C may pass 2^31 elements while each argument fits int32.
    row_block = tl.program_id(1) if PHASE == _P_WA else tl.program_id(0)
    local = row_block.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = local < NB
    rows = R0 + local
    f_rows = features + rows * D

    if PHASE == _P_ROWS:
        lab = tl.load(labels + rows, mask=row_mask, other=0)
        lab = tl.minimum(tl.maximum(lab, 0), C - 1)
        ay_rows = anchors + lab * D
        fn2 = tl.zeros([BLOCK_B], ACC)
        dy2 = tl.zeros([BLOCK_B], ACC)
        fay = tl.zeros([BLOCK_B], ACC)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + offs_k
            m2 = row_mask[:, None] & (k < D)[None, :]
            f = tl.load(f_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
            ay = tl.load(ay_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
            diff = f - ay
            fn2 += tl.sum(f * f, 1)
            dy2 += tl.sum(diff * diff, 1)
            fay += tl.sum(f * ay, 1)
        tl.store(rowstats + rows, fn2, mask=row_mask)
        tl.store(rowstats + B + rows, dy2, mask=row_mask)
        tl.store(rowstats + 2 * B + rows, fay, mask=row_mask)

    elif PHASE == _P_LOGITS:
        lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
            rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC, ACC
        )
        tile = tl.program_id(1)
        c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = c < C
        dots = _dots(features, anchors, rows, row_mask, c, c_mask, D, DOT, ACC, BLOCK_B, BLOCK_C, BLOCK_K)
        z = _logits(dots, c, c_mask, lab, anorm, fn2, 1.0 / fden, dy2, zy, gamma, METRIC)
        # Masked by the padded pitch, not C (vector stores, as in phase 2); the padding is never read as a logit.
        tl.store(zbuf + local[:, None] * LDZ + c[None, :], z, mask=row_mask[:, None] & (c < LDZ)[None, :])
        # Every tile holds a real class, so its max is finite and exp(−inf − max) = 0 for the masked ones.
        t_max = tl.max(z, 1)
        t_sum = tl.sum(tl.exp(z - t_max[:, None]), 1)
        tl.store(tstats + local * T + tile, t_max, mask=row_mask)
        tl.store(tstats + (NB + local) * T + tile, t_sum, mask=row_mask)

    elif PHASE == _P_SOFTMAX:
        _softmax_row(
            zbuf,
            wbuf,
            tstats,
            anorm,
            labels,
            rowstats,
            loss,
            wsums,
            tl.program_id(0).to(tl.int64),
            B,
            C,
            NB,
            T,
            LDZ,
            gamma,
            METRIC,
            ACC,
            PACKED,
            BLOCK_K,
            BLOCK_R,
            R0,
        )

    elif PHASE == _P_WA:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < D
        split = tl.program_id(2)
        k_steps = tl.cdiv(C, BLOCK_K)
        acc = tl.zeros([BLOCK_B, BLOCK_N], ACC)  # Σ_c w_c a_c[cols]
        # K steps as multiples of BLOCK_K (the split's first is, but as a runtime value the compiler could not tell):
        # the W rows are then 16-byte aligned for vector loads.
        for kt in range(split * KPS, tl.minimum(split * KPS + KPS, k_steps)):
            c = kt * BLOCK_K + offs_k
            c_mask = c < C
            # W's padding columns are 0 (phase 2): only the rows are masked, so the loads stay vectors.
            m2 = row_mask[:, None]
            a = tl.load(
                anchors + c.to(tl.int64)[:, None] * D + n[None, :], mask=c_mask[:, None] & n_mask[None, :], other=0
            )
            if PACKED:
                w16 = wbuf + local[:, None] * (2 * LDZ) + (2 * BLOCK_K) * kt + offs_k[None, :]
                acc = _mma(tl.load(w16 + BLOCK_K, mask=m2, other=0), a, acc, DOT, ACC)  # w_lo first: the small terms
                acc = _mma(tl.load(w16, mask=m2, other=0), a, acc, DOT, ACC)
            else:
                w = tl.load(zbuf + local[:, None] * LDZ + c[None, :], mask=m2, other=0)
                acc = _wa_dot(w, a, acc, DOT, ACC)
        out = partial + (split * NB + local)[:, None] * D + n[None, :]
        tl.store(out, acc, mask=row_mask[:, None] & n_mask[None, :])

    else:  # _P_FINISH
        lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
            rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC, ACC
        )
        total = rho_w * rho
        wsum = tl.zeros([BLOCK_B], ACC)
        if SOFTMAX:
            total += tl.load(loss + rows, mask=row_mask, other=0)
            wsum = tl.load(wsums + local, mask=row_mask, other=0)
        tl.store(loss + rows, total, mask=row_mask)
        ay_rows = anchors + lab * D
        fden_col = fden[:, None]
        radial = tl.zeros([BLOCK_B], ACC)
        if METRIC == _COSINE:  # dF̂·f̂ over the whole row first, from dF̂ itself, as the reference
            for k0 in range(0, D, BLOCK_K):
                k = k0 + offs_k
                m2, ghat, f, ay = _column_slice(
                    partial, f_rows, ay_rows, local, row_mask, k, NB, D, S, SOFTMAX, ACC, BLOCK_B, BLOCK_K
                )
                ghat -= (rho_w * an_y)[:, None] * ay
                radial += tl.sum(ghat * div_rn(f, fden_col), 1)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + offs_k
            m2, wa, f, ay = _column_slice(
                partial, f_rows, ay_rows, local, row_mask, k, NB, D, S, SOFTMAX, ACC, BLOCK_B, BLOCK_K
            )
            if METRIC == _COSINE:
                ghat = wa - (rho_w * an_y)[:, None] * ay
                # The reference's divisions, correctly rounded: f̂ = f/‖f‖ is then exactly ±1 where D = 1, and the
                # gradient (which has no tangent direction there) exactly 0 instead of eps·|dF̂|.
                fhat = div_rn(f, fden_col)
                g = tl.where(
                    (fnorm > _COS_EPS)[:, None],
                    div_rn(ghat - radial[:, None] * fhat, fden_col),
                    div_rn(ghat, tl.full([1, 1], _COS_EPS, ACC)),
                )
            elif METRIC == _SQEUCLIDEAN:
                g = wa + rho_w * (f - ay)
            else:
                g = f * wsum[:, None] - wa + rho_w * (f - ay)
            # Padding rows (f = 0, label 0) would take the dF̂/ε branch: zero them so nothing overflows on the way out.
            g = tl.where(row_mask[:, None], g, 0.0)
            if grad.dtype.element_ty == tl.bfloat16:
                # Rounded on the bits: the interpreter's float32 -> bfloat16 cast truncates (see _common).
                out = round_to_bfloat16(g.to(tl.float32))
            else:
                out = g.to(grad.dtype.element_ty)
            tl.store(grad + rows[:, None] * D + k[None, :], out, mask=m2)


def anchor_loss_triton(
    features: torch.Tensor,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    metric: str,
    scale: float,
    pull: float,
    softmax: bool,
    *,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the phases; arguments are already checked by the caller (shapes, labels in [0, C), metric,
    pull > 0 when not softmax).

    Args:
        features (Tensor[B, D]): float16, bfloat16, float32 or float64.
        anchors (Tensor[C, D]): any of those float dtypes (widened to the accumulation dtype on load; for float64
            features, to float64 before the launch).
        labels (Tensor[B] int64): in [0, C).
        metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        scale, pull, softmax: as :func:`ppml.anchor_loss`.
        config: tile sizes, chunk and splits (default: launch_config; tests force small tiles, chunks and splits).

    Returns:
        (loss, grad): Tensor[B] float32 (float64 for float64 features), and d(loss_i)/d(f_i) as a contiguous
        Tensor[B, D] of the features' dtype.
    """
    B, D = features.shape
    C = anchors.shape[0]
    acc_t = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.contiguous()
    # float64 accumulation takes float64 anchors: widened here (exactly, as the kernel's load would) because Triton
    # cannot lower a float64 tl.dot whose operand was widened from 16 bits in the kernel (it folds the cast into the
    # operand's layout and fails in MMAv2 lowering: "fp64 don't support largeK MMA", triton 3.6 and 3.8, sm_90).
    a = (anchors.to(acc_t) if acc_t == torch.float64 else anchors).contiguous()
    y = labels.contiguous()
    dev = features.device
    loss = torch.empty(B, dtype=acc_t, device=dev)
    grad = torch.empty((B, D), dtype=features.dtype, device=dev)
    if B == 0:
        return loss, grad
    dot = dot_mode(f, a)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else _DEFAULT_SMS
    cfg = config or launch_config(B, C, D, dot, softmax, sms)
    # C values, once per call, by a reduction (no C×D temporary): squared norms for the Euclidean metrics (the
    # −(γ/2)‖a_c‖² term, the expanded-form distance), inverse norms (floored like F.normalize) for cosine.
    # (vector_norm widens but refuses to narrow: float64 anchors of float32 features are rounded first, as the kernel
    # rounds them on load.)
    norm = torch.linalg.vector_norm(a.to(acc_t) if a.dtype == torch.float64 else a, dim=1, dtype=acc_t)
    anorm = ((1.0 / norm.clamp_min(COS_EPS)) if metric == "cosine" else norm.square()).contiguous()
    chunk = min(cfg.chunk, B)
    tiles = triton.cdiv(C, cfg.block_c)
    # Whole K steps per split, no split empty.
    k_steps = triton.cdiv(C, cfg.block_k)
    kps = triton.cdiv(k_steps, cfg.splits)
    splits = triton.cdiv(k_steps, kps)
    # bfloat16 W packed into the logits' bytes (phase 2) for W·A's bfloat16 dots.
    packed = dot == DOT_16 and a.dtype == torch.bfloat16
    if packed and cfg.block_r % cfg.block_k:
        raise ValueError(f"anchor_loss_triton: block_r must be a multiple of block_k, got {cfg}")
    # The buffer's row pitch: whole K steps (the packed W's layout) and 16-byte aligned rows (vector loads; the pitch
    # is a specialised argument, always divisible by 16).
    ldz = triton.cdiv(C, max(16, cfg.block_k)) * max(16, cfg.block_k)
    rowstats = torch.empty((3, B), dtype=acc_t, device=dev)
    zbuf = torch.empty((chunk, ldz) if softmax else (0,), dtype=acc_t, device=dev)
    wbuf = zbuf.view(torch.bfloat16) if packed else zbuf
    tstats = torch.empty((2, chunk, tiles) if softmax else (0,), dtype=acc_t, device=dev)
    partial = torch.empty((splits, chunk, D) if softmax else (0,), dtype=acc_t, device=dev)
    wsums = torch.empty((chunk,) if softmax else (0,), dtype=acc_t, device=dev)
    consts = dict(
        METRIC=_METRIC_IDS[metric],
        SOFTMAX=bool(softmax),
        DOT=dot,
        PACKED=packed,
        ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
        BLOCK_B=cfg.block_b,
        BLOCK_C=cfg.block_c,
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
        BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )

    def run(grid, r0, nb, phase):
        _anchor_loss_kernel[grid](
            f,
            a,
            anorm,
            y,
            rowstats,
            zbuf,
            wbuf,
            tstats,
            partial,
            wsums,
            loss,
            grad,
            B,
            C,
            D,
            r0,
            nb,
            tiles,
            splits,
            kps,
            ldz,
            float(scale),
            float(pull),
            PHASE=phase,
            **consts,
        )

    run((triton.cdiv(B, cfg.block_b),), 0, B, _ROWS)
    for r0 in range(0, B, chunk):
        nb = min(chunk, B - r0)
        row_blocks = triton.cdiv(nb, cfg.block_b)
        if softmax:
            run((row_blocks, tiles), r0, nb, _LOGITS)
            run((nb,), r0, nb, _SOFTMAX)
            run((triton.cdiv(D, cfg.block_n), row_blocks, splits), r0, nb, _WA)
        run((row_blocks,), r0, nb, _FINISH)
    return loss, grad
