"""Triton kernel of ppml::anchor_loss: per-sample loss and d(loss_i)/d(f_i), built like the fused linear
cross-entropy kernels of Liger-Kernel and Cut Cross-Entropy: the logits are tl.dot tiles on tensor cores, produced and
consumed in registers, never stored as a B×C matrix.

One jit function, four phases (the PHASE constexpr; one name, so the sm_90 AOT replay of the tests compiles all four):

0. rows (grid: row blocks): per row ‖f‖², ‖f − a_y‖² (from the difference vector, as the reference: the expanded form
   cancels badly near the anchor) and f·a_y, into a [3, B] buffer the other phases read.
1. softmax statistics (grid: row blocks × class splits, so that B = 256 still fills 132 SMs): logits z[BLOCK_B,
   BLOCK_C] one class tile at a time, f·a_c accumulated by tl.dot over D in BLOCK_K steps, then squared Euclidean
   u_c = γ f·a_c − (γ/2)‖a_c‖² (the ‖f‖² row constant cancels in the softmax and is left out, as loss_and_grad),
   Euclidean −γ·√max(‖f‖² − 2f·a_c + ‖a_c‖², ε), cosine γ·f̂·â_c, with the true class's logit substituted from phase 0
   (Euclidean: its distance from the difference vector); an online (max, sum) per row and split goes to [2, S1, B].
2. gradient (grid: row blocks × output column blocks × class splits): the (max, sum) pairs merged across splits, the
   logits recomputed per tile, the coefficients w_c of loss_and_grad (squared Euclidean γ·dz; Euclidean −γ dz/d_c, 0
   under the distance floor; cosine γ·dz/‖a_c‖), and w·A[:, cols] accumulated by tl.dot into a [BLOCK_B, BLOCK_N]
   fp32 tile, written per split to a [S2, B, D] buffer (with Σ_c w_c per row for the Euclidean term).
3. finish (grid: row blocks): the loss (merged log-sum-exp, pull term) and the per-row gradient terms over the summed
   splits: squared Euclidean dF = w·A; Euclidean dF = f·Σw − w·A; both + pull·(f − a_y); cosine dF̂ = w·A − pull·â_y,
   dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖ (dF̂/ε when ‖f‖ <= ε), dF̂·f̂ summed over the whole row first; rounded once to the
   features' dtype.

Memory: besides the outputs, [3, B] + [2, S1, B] + S2·B·(D + 1) accumulation-dtype values (S2 is 1 when the row and
column blocks alone fill the GPU); no B×C buffer at any C. FLOPs: 2BCD (phase 1) + (D/BLOCK_N)·2BCD + 2BCD (phase 2,
which recomputes the logits once per output column block; the 16-bit path does w·A as two dots, below).

Precision (DOT constexpr), as torch's matmul: 16-bit features with anchors of the same dtype multiply in that dtype with
float32 accumulation (the products are exact, so the logits are as good as float32 dots of the widened inputs);
float32 uses TF32 when torch.backends.cuda.matmul.allow_tf32 is set when the launcher is called, IEEE float32
otherwise (and for mixed dtypes); float64 stays float64. In the 16-bit path the probabilities w are split as
w_hi + w_lo, each in the 16-bit dtype (bfloat16), or in TF32 against the exactly widened float16 anchors (float16's
range is too small for the Euclidean w = −γ dz/d near an anchor): two dots give w·A to ~2^-16 relative, where one
rounding of w would cost the gradient ~2^-9 per class. scale and pull arrive as float64 arguments and are rounded to
the accumulation dtype in the kernel (a Python float argument would be float32, too coarse for float64 features).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ppml._constants import COS_EPS, DIST2_EPS

from ._common import round_to_bfloat16

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

_ROWS, _STATS, _GRAD, _FINISH = 0, 1, 2, 3
_P_ROWS = tl.constexpr(_ROWS)
_P_STATS = tl.constexpr(_STATS)
_P_GRAD = tl.constexpr(_GRAD)
_P_FINISH = tl.constexpr(_FINISH)

# Programs the class splits aim for: two per SM of an H100/H200 (132 SMs), so that one wave is not left half empty.
_TARGET_PROGRAMS = 264
# The gradient's per-split buffer is S2·B·D floats: never more splits than this.
_MAX_GRAD_SPLITS = 16


class Config(NamedTuple):
    """Tile sizes and class splits of one launch (see launch_config)."""

    block_b: int  # rows per program
    block_c: int  # classes per logit tile
    block_k: int  # feature columns per tl.dot step of the logits
    block_n: int  # gradient columns per phase-2 program
    stat_splits: int  # class splits of phase 1 (an upper bound: splits are whole class tiles, none empty)
    grad_splits: int  # class splits of phase 2
    num_warps: int


def launch_config(B: int, C: int, D: int, dot: int) -> Config:
    """Tensor-core tiles of 64 (rows, classes) × 64 (16-bit) or 32 (TF32) feature columns, 128 gradient columns (256
    would halve phase 2's recomputed logits but took 255 registers with spills, sm_90a); the
    FMA-based IEEE/float64 dots hold K-long operand slices per thread, so their tiles are 32 to stay in registers.
    Class splits fill _TARGET_PROGRAMS programs where the row (and column) blocks alone do not. Untuned: no GPU here."""
    if dot == DOT_IEEE:
        bb, bc, bk, bn = 32, 32, 32, 64
    else:
        bb, bc, bk, bn = 64, 64, 64 if dot == DOT_16 else 32, 128
    p2 = max(16, triton.next_power_of_2(max(D, 1)))  # tl.dot wants every dimension >= 16
    bk, bn = min(bk, p2), min(bn, p2)
    row_blocks, class_tiles = triton.cdiv(max(B, 1), bb), triton.cdiv(C, bc)
    stat_splits = max(1, min(class_tiles, triton.cdiv(_TARGET_PROGRAMS, row_blocks)))
    grad_programs = row_blocks * triton.cdiv(D, bn)
    grad_splits = max(1, min(class_tiles, _MAX_GRAD_SPLITS, triton.cdiv(_TARGET_PROGRAMS, grad_programs)))
    return Config(bb, bc, bk, bn, stat_splits, grad_splits, 8)


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
def _div_rn(x, y):
    """IEEE-rounded x / y: float32 `/` compiles to the approximate div.full.f32, and div_rn takes float32 only."""
    if x.dtype == tl.float32:
        r = tl.div_rn(x, y)
    else:
        r = x / y
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
def _dots(features, anchors, rows, row_mask, c, c_mask, D, DOT: tl.constexpr, ACC: tl.constexpr,
          BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
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
    """Phase 0's per-row values and what follows from them: (lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho)."""
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
    """(z, d2) for one tile: masked classes get z = −inf (nothing in the softmax), the true class its phase-0 value.
    d2 (the clamped squared distance, the label's from the difference vector) is only meaningful for Euclidean."""
    an = tl.load(anorm + c, mask=c_mask, other=0)
    is_y = c[None, :] == lab[:, None]
    d2 = dots  # only the Euclidean metric uses it
    if METRIC == _COSINE:
        z = gamma * (dots * inv_fden[:, None]) * an[None, :]
    elif METRIC == _SQEUCLIDEAN:
        z = gamma * dots - (0.5 * gamma) * an[None, :]
    else:
        d2 = tl.maximum(fn2[:, None] - 2 * dots + an[None, :], 0.0)
        d2 = tl.where(is_y, dy2[:, None], d2)
        z = -gamma * _sqrt(tl.maximum(d2, _DIST2_EPS))
    z = tl.where(is_y, zy[:, None], z)
    return tl.where(c_mask[None, :], z, float("-inf")), d2


@triton.jit
def _merged_stats(stats, rows, row_mask, B, S1, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """Phase 1's (max, sum) pairs of every split merged: (max, sum) of the whole row. Kept as the pair, never folded
    into lse = max + log(sum): the logits can be in the thousands, where one ulp of lse is ~1e-4 and exp(z − lse)
    would carry that error into every probability; z − max is exact for the classes that matter (Sterbenz)."""
    run_max = tl.full([BLOCK_B], float("-inf"), ACC)
    for s in range(0, S1):
        run_max = tl.maximum(run_max, tl.load(stats + s * B + rows, mask=row_mask, other=0))
    run_sum = tl.zeros([BLOCK_B], ACC)
    for s in range(0, S1):
        m = tl.load(stats + s * B + rows, mask=row_mask, other=0)
        run_sum += tl.load(stats + (S1 + s) * B + rows, mask=row_mask, other=1) * tl.exp(m - run_max)
    return run_max, run_sum


@triton.jit
def _wa_dot(w, a, acc, DOT: tl.constexpr, ACC: tl.constexpr):
    """acc + w @ a, w the float32 coefficients, a the anchors' [BLOCK_C, BLOCK_N] tile as loaded. In DOT_16, w as
    w_hi + w_lo (see the module docstring): bfloat16 halves against the bfloat16 anchors; float16 anchors widened
    (exactly) to float32 against TF32 halves of w, whose exponent range a float16 w would not have."""
    if DOT == _DOT_16:
        if a.dtype == tl.bfloat16:
            w_hi = w.to(tl.bfloat16)
            w_lo = (w - w_hi.to(ACC)).to(tl.bfloat16)
            r = _mma(w_lo, a, acc, DOT, ACC)
            r = _mma(w_hi, a, r, DOT, ACC)
        else:
            a32 = a.to(ACC)
            # the top 10 mantissa bits: exactly a TF32 value
            w_hi = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(ACC, bitcast=True)
            r = tl.dot(w - w_hi, a32, acc, input_precision="tf32", out_dtype=ACC)
            r = tl.dot(w_hi, a32, r, input_precision="tf32", out_dtype=ACC)
    else:
        r = _mma(w, a, acc, DOT, ACC)
    return r


# B, C and the split counts only bound masks and loops (never an address), so they are not specialised: otherwise B or
# C equal to 1 or divisible by 16 would each be a separate compile (~1 s), e.g. a training run's last, partial batch.
@triton.jit
def _column_slice(
    partial, f_rows, ay_rows, rows, row_mask, k, B, D, S2,
    SOFTMAX: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The columns ``k`` of the rows' finish step: their mask, dF̂ summed over the S2 class splits' partials (zero
    without softmax), the features and the true class's anchor, in ACC."""
    m2 = row_mask[:, None] & (k < D)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_K], ACC)
    if SOFTMAX:
        for s in range(0, S2):
            acc += tl.load(partial + (s * B + rows)[:, None] * D + k[None, :], mask=m2, other=0)
    f = tl.load(f_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
    ay = tl.load(ay_rows[:, None] + k[None, :], mask=m2, other=0).to(ACC)
    return m2, acc, f, ay


@triton.jit(do_not_specialize=["B", "C", "S1", "CPS1", "S2", "CPS2"])
def _anchor_loss_kernel(
    features,
    anchors,
    anorm,
    labels,
    rowstats,
    stats,
    partial,
    wsums,
    loss,
    grad,
    B,
    C,
    D,
    S1,
    CPS1,
    S2,
    CPS2,
    scale: tl.float64,
    pull: tl.float64,
    PHASE: tl.constexpr,
    METRIC: tl.constexpr,
    SOFTMAX: tl.constexpr,
    DOT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # int64 before any row meets D: B·D (and C·D) may pass 2^31 elements while each argument fits int32.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    gamma = _to_acc(scale, ACC)
    rho_w = _to_acc(pull, ACC)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
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

    elif PHASE == _P_STATS:
        lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
            rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC, ACC)
        inv_fden = 1.0 / fden
        split = tl.program_id(1)
        c_begin = split * CPS1
        c_end = tl.minimum(c_begin + CPS1, C)
        run_max = tl.full([BLOCK_B], float("-inf"), ACC)
        run_sum = tl.zeros([BLOCK_B], ACC)
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < c_end
            dots = _dots(features, anchors, rows, row_mask, c, c_mask, D, DOT, ACC, BLOCK_B, BLOCK_C, BLOCK_K)
            z, _ = _logits(dots, c, c_mask, lab, anorm, fn2, inv_fden, dy2, zy, gamma, METRIC)
            # Every split's first tile holds a real class, so new_max is finite and exp(−inf − new_max) = 0.
            new_max = tl.maximum(run_max, tl.max(z, 1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
            run_max = new_max
        tl.store(stats + split * B + rows, run_max, mask=row_mask)
        tl.store(stats + (S1 + split) * B + rows, run_sum, mask=row_mask)

    elif PHASE == _P_GRAD:
        lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
            rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC, ACC)
        inv_fden = 1.0 / fden
        run_max, run_sum = _merged_stats(stats, rows, row_mask, B, S1, ACC, BLOCK_B)
        inv_sum = 1.0 / run_sum
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < D
        split = tl.program_id(2)
        c_begin = split * CPS2
        c_end = tl.minimum(c_begin + CPS2, C)
        wa = tl.zeros([BLOCK_B, BLOCK_N], ACC)  # Σ_c w_c a_c[cols]
        wsum = tl.zeros([BLOCK_B], ACC)  # Σ_c w_c
        for c0 in range(c_begin, c_end, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < c_end
            dots = _dots(features, anchors, rows, row_mask, c, c_mask, D, DOT, ACC, BLOCK_B, BLOCK_C, BLOCK_K)
            z, d2 = _logits(dots, c, c_mask, lab, anorm, fn2, inv_fden, dy2, zy, gamma, METRIC)
            p = tl.exp(z - run_max[:, None]) * inv_sum[:, None]
            dz = p - tl.where(c[None, :] == lab[:, None], 1.0, 0.0)
            if METRIC == _SQEUCLIDEAN:
                w = gamma * dz  # ∂u_c/∂f = γ·a_c
            elif METRIC == _EUCLIDEAN:
                # ∂z/∂d2 = −γ/(2d); 0 where the distance floor is active (the reference's torch.where).
                w = tl.where(d2 > _DIST2_EPS, -gamma * dz / _sqrt(tl.maximum(d2, _DIST2_EPS)), 0.0)
            else:
                an = tl.load(anorm + c, mask=c_mask, other=0)
                w = gamma * dz * an[None, :]
            w = tl.where(c_mask[None, :] & row_mask[:, None], w, 0.0)
            wsum += tl.sum(w, 1)
            a = tl.load(anchors + c.to(tl.int64)[:, None] * D + n[None, :], mask=c_mask[:, None] & n_mask[None, :],
                        other=0)
            wa = _wa_dot(w, a, wa, DOT, ACC)
        out = partial + (split * B + rows)[:, None] * D + n[None, :]
        tl.store(out, wa, mask=row_mask[:, None] & n_mask[None, :])
        if tl.program_id(1) == 0:
            tl.store(wsums + split * B + rows, wsum, mask=row_mask)

    else:  # _P_FINISH
        lab, fn2, dy2, fay, fnorm, fden, an_y, zy, rho = _row_terms(
            rowstats, anorm, labels, rows, row_mask, B, C, gamma, METRIC, ACC)
        total = rho_w * rho
        wsum = tl.zeros([BLOCK_B], ACC)
        if SOFTMAX:
            run_max, run_sum = _merged_stats(stats, rows, row_mask, B, S1, ACC, BLOCK_B)
            total += (run_max - zy) + tl.log(run_sum)
            for s in range(0, S2):
                wsum += tl.load(wsums + s * B + rows, mask=row_mask, other=0)
        tl.store(loss + rows, total, mask=row_mask)
        ay_rows = anchors + lab * D
        fden_col = fden[:, None]
        radial = tl.zeros([BLOCK_B], ACC)
        if METRIC == _COSINE:  # dF̂·f̂ over the whole row first, from dF̂ itself, as the reference
            for k0 in range(0, D, BLOCK_K):
                k = k0 + offs_k
                m2, ghat, f, ay = _column_slice(
                    partial, f_rows, ay_rows, rows, row_mask, k, B, D, S2, SOFTMAX, ACC, BLOCK_B, BLOCK_K)
                ghat -= (rho_w * an_y)[:, None] * ay
                radial += tl.sum(ghat * _div_rn(f, fden_col), 1)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + offs_k
            m2, wa, f, ay = _column_slice(
                partial, f_rows, ay_rows, rows, row_mask, k, B, D, S2, SOFTMAX, ACC, BLOCK_B, BLOCK_K)
            if METRIC == _COSINE:
                ghat = wa - (rho_w * an_y)[:, None] * ay
                # The reference's divisions, correctly rounded: f̂ = f/‖f‖ is then exactly ±1 where D = 1, and the
                # gradient (which has no tangent direction there) exactly 0 instead of eps·|dF̂|.
                fhat = _div_rn(f, fden_col)
                g = tl.where(
                    (fnorm > _COS_EPS)[:, None],
                    _div_rn(ghat - radial[:, None] * fhat, fden_col),
                    _div_rn(ghat, tl.full([1, 1], _COS_EPS, ACC)),
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
    """Launches the four phases; arguments are already checked by the caller (shapes, labels in [0, C), metric,
    pull > 0 when not softmax).

    Args:
        features (Tensor[B, D]): float16, bfloat16, float32 or float64.
        anchors (Tensor[C, D]): any of those float dtypes (widened to the accumulation dtype on load; for float64
            features, to float64 before the launch).
        labels (Tensor[B] int64): in [0, C).
        metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        scale, pull, softmax: as :func:`ppml.anchor_loss`.
        config: tile sizes and splits (default: launch_config; tests force small tiles and several splits).

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
    cfg = config or launch_config(B, C, D, dot)
    # C values, once per call, by a reduction (no C×D temporary): squared norms for the Euclidean metrics (the
    # −(γ/2)‖a_c‖² term, the expanded-form distance), inverse norms (floored like F.normalize) for cosine.
    # (vector_norm widens but refuses to narrow: float64 anchors of float32 features are rounded first, as the kernel
    # rounds them on load.)
    norm = torch.linalg.vector_norm(a.to(acc_t) if a.dtype == torch.float64 else a, dim=1, dtype=acc_t)
    anorm = ((1.0 / norm.clamp_min(COS_EPS)) if metric == "cosine" else norm.square()).contiguous()
    # Whole class tiles per split, no split empty.
    cps1 = triton.cdiv(triton.cdiv(C, cfg.stat_splits), cfg.block_c) * cfg.block_c
    cps2 = triton.cdiv(triton.cdiv(C, cfg.grad_splits), cfg.block_c) * cfg.block_c
    s1, s2 = triton.cdiv(C, cps1), triton.cdiv(C, cps2)
    rowstats = torch.empty((3, B), dtype=acc_t, device=dev)
    stats = torch.empty((2, s1, B) if softmax else (0,), dtype=acc_t, device=dev)
    partial = torch.empty((s2, B, D) if softmax else (0,), dtype=acc_t, device=dev)
    wsums = torch.empty((s2, B) if softmax else (0,), dtype=acc_t, device=dev)
    row_blocks = triton.cdiv(B, cfg.block_b)
    args = (f, a, anorm, y, rowstats, stats, partial, wsums, loss, grad, B, C, D, s1, cps1, s2, cps2,
            float(scale), float(pull))
    consts = dict(
        METRIC=_METRIC_IDS[metric],
        SOFTMAX=bool(softmax),
        DOT=dot,
        ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
        BLOCK_B=cfg.block_b,
        BLOCK_C=cfg.block_c,
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps,
    )
    _anchor_loss_kernel[(row_blocks,)](*args, PHASE=_ROWS, **consts)
    if softmax:
        _anchor_loss_kernel[(row_blocks, s1)](*args, PHASE=_STATS, **consts)
        _anchor_loss_kernel[(row_blocks, triton.cdiv(D, cfg.block_n), s2)](*args, PHASE=_GRAD, **consts)
    _anchor_loss_kernel[(row_blocks,)](*args, PHASE=_FINISH, **consts)
    return loss, grad
