"""Triton kernel of ppml::anchor_loss: per-sample loss and d(loss_i)/d(f_i) in one launch, never storing the B×C logits.

One program owns a block of BLOCK_B rows (not one row): the anchors are the big operand (C×D, re-read for every block of
rows), so a block of rows divides that traffic by BLOCK_B and turns the dot products f·a_c into tl.dot tiles (one row
would be a broadcast-multiply-sum re-reading all of A per sample). Per program:

- prologue: per row ‖f‖², ‖f − a_y‖² (from the difference vector, as the reference: the expanded form cancels badly
  near the anchor) and f·a_y, looping over D in blocks of BLOCK_D;
- pass 1 (softmax only): logits z[BLOCK_B, BLOCK_C] one class block at a time from f·a_c and the launcher's per-anchor
  norms — squared Euclidean u_c = γ f·a_c − (γ/2)‖a_c‖² (the ‖f‖² row constant cancels in the softmax and is left
  out, as loss_and_grad), Euclidean −γ·√max(‖f‖² − 2f·a_c + ‖a_c‖², ε), cosine γ·f̂·â_c — with the true class's logit
  substituted from the prologue (Euclidean: its distance from the difference vector); an online max and sum give the
  log-sum-exp (kept as the pair: pass 2's probabilities are exp(z − max)/sum, as torch.softmax, see pass 1);
- pass 2, per output block of BLOCK_D columns: the same logits again, the gradient coefficients w_c
  (ppml.ops.anchor_loss.loss_and_grad) and w·A accumulated into a [BLOCK_B, BLOCK_D] tile, then the per-row terms:
  squared Euclidean dF = γ·dz·A; Euclidean dF = f·Σw − w·A with w_c = −γ dz_c/d_c; both + pull·(f − a_y); cosine
  dF̂ = γ·dz·Â − pull·â_y and dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖ (dF̂/ε when ‖f‖ <= ε); when D spans several blocks,
  dF̂·f = Σ_c w_c (f·a_c) − pull·(f·â_y) is summed in the class loop, so the projection needs no second look at the
  whole of dF̂.

D is not bounded: up to _MAX_BLOCK_D (the common case) the feature tile stays in registers and each anchor tile is
loaded once per pass; above it the dot products loop over D, and pass 2 recomputes them for each of the D/BLOCK_D
output blocks (more FLOPs, but still no B×C buffer).

Numerics follow loss_and_grad: float32 (float64 for float64 features) throughout, inputs of any float dtype widened on
load, dot products with input_precision="ieee" (TF32 would ruin the logits' cancellations), the gradient rounded once
to the features' dtype. scale and pull arrive as float64 arguments and are rounded to the accumulation dtype in the
kernel (a plain Python float argument would be float32, too coarse for float64 features).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppml.reference.anchor_loss import COS_EPS, DIST2_EPS, accumulation_dtype

from ._common import _round_to_bfloat16

_METRIC_IDS = {"sqeuclidean": 0, "euclidean": 1, "cosine": 2}
_SQEUCLIDEAN = tl.constexpr(0)
_EUCLIDEAN = tl.constexpr(1)
_COSINE = tl.constexpr(2)
_COS_EPS = tl.constexpr(COS_EPS)
_DIST2_EPS = tl.constexpr(DIST2_EPS)

# Tile sizes, untuned (no GPU here), chosen by `ptxas -v` for sm_90a: with 8 warps no spills for D <= 128 across metrics
# and float32/bfloat16/float64 (the looped-D bfloat16 kernel spills a few dozen bytes). The FMA-based ieee tl.dot holds
# K-long operand slices per thread, so registers bound the tiles: 16/32/128 with 4 warps spilled. tl.dot wants every
# dimension >= 16.
# Rows per program: more rows divide the anchor traffic further but leave fewer programs at training batch sizes.
_BLOCK_B = 16
# Classes per step of the online softmax and of w·A.
_BLOCK_C = 16
# Feature columns held at once: D <= 128 (most embeddings) keeps the feature tile resident.
_MAX_BLOCK_D = 128
_NUM_WARPS = 8


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
def _dot_products(
    f_tile,
    f_rows,
    row_mask,
    anchors,
    c,
    c_mask,
    D,
    ONE_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ACC: tl.constexpr,
):
    """f·a_c for a block of rows and classes, [BLOCK_B, BLOCK_C]; with ONE_D the features are the resident f_tile."""
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = anchors + c.to(tl.int64) * D
    dots = tl.zeros([BLOCK_B, BLOCK_C], ACC)
    if ONE_D:
        a_tile = tl.load(a_rows[:, None] + offs_d[None, :], mask=c_mask[:, None] & (offs_d < D)[None, :], other=0)
        dots = tl.dot(f_tile, tl.trans(a_tile.to(ACC)), dots, input_precision="ieee", out_dtype=ACC)
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            f = tl.load(f_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0).to(ACC)
            a = tl.load(a_rows[:, None] + d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0).to(ACC)
            dots = tl.dot(f, tl.trans(a), dots, input_precision="ieee", out_dtype=ACC)
    return dots


@triton.jit
def _logits(dots, c, c_mask, lab, anorm, fn2, inv_fden, dy2, zy, gamma, METRIC: tl.constexpr):
    """(z, d2) for one block: masked classes get z = −inf (nothing in the softmax), the true class its prologue value.
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


# B and C only bound masks and loops (never an address), so they are not specialised: otherwise B or C equal to 1 or
# divisible by 16 would each be a separate compile (~1 s), e.g. a training run's last, partial batch.
@triton.jit(do_not_specialize=["B", "C"])
def _anchor_loss_kernel(
    features,
    anchors,
    anorm,
    labels,
    loss,
    grad,
    B,
    C,
    D,
    scale: tl.float64,
    pull: tl.float64,
    METRIC: tl.constexpr,
    SOFTMAX: tl.constexpr,
    ONE_D: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # int64 before any row meets D: B·D (and C·D below) may pass 2^31 elements while each argument fits int32.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    lab = tl.load(labels + rows, mask=row_mask, other=0)
    # The caller checks labels (a device-side assert on a GPU, queued ahead of this launch); the clamp keeps even a
    # bad one from indexing outside the anchors.
    lab = tl.minimum(tl.maximum(lab, 0), C - 1)
    f_rows = features + rows * D
    ay_rows = anchors + lab * D
    gamma = _to_acc(scale, ACC)
    rho_w = _to_acc(pull, ACC)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)

    # ---- prologue: ‖f‖², ‖f − a_y‖², f·a_y ----
    fn2 = tl.zeros([BLOCK_B], ACC)
    dy2 = tl.zeros([BLOCK_B], ACC)
    fay = tl.zeros([BLOCK_B], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        m2 = row_mask[:, None] & (d < D)[None, :]
        f = tl.load(f_rows[:, None] + d[None, :], mask=m2, other=0).to(ACC)
        ay = tl.load(ay_rows[:, None] + d[None, :], mask=m2, other=0).to(ACC)
        diff = f - ay
        fn2 += tl.sum(f * f, 1)
        dy2 += tl.sum(diff * diff, 1)
        fay += tl.sum(f * ay, 1)
    if ONE_D:  # the feature tile stays in registers for both passes
        f_tile = tl.load(f_rows[:, None] + offs_d[None, :], mask=row_mask[:, None] & (offs_d < D)[None, :], other=0)
        f_tile = f_tile.to(ACC)
    else:  # _dot_products reloads it per D block
        f_tile = tl.zeros([BLOCK_B, BLOCK_D], ACC)
    fnorm = _sqrt(fn2)
    fden = tl.maximum(fnorm, _COS_EPS)
    inv_fden = 1.0 / fden
    an_y = tl.load(anorm + lab)  # cosine: 1/max(‖a_y‖, ε); Euclidean: ‖a_y‖²
    if METRIC == _COSINE:
        cos_y = fay * inv_fden * an_y
        zy = gamma * cos_y
        rho = 1.0 - cos_y
    else:
        if METRIC == _SQEUCLIDEAN:
            zy = gamma * fay - (0.5 * gamma) * an_y
        else:
            zy = -gamma * _sqrt(tl.maximum(dy2, _DIST2_EPS))
        rho = 0.5 * dy2
    total = rho_w * rho

    # ---- pass 1: online log-sum-exp over class blocks ----
    # Kept as (max, sum), never folded into lse = max + log(sum): the logits can be in the thousands, where one ulp of
    # lse is ~1e-4 and exp(z − lse) would carry that error into every probability. z − max is exact for the classes
    # that matter (Sterbenz), so p = exp(z − max)/sum is as good as torch.softmax.
    run_max = tl.zeros([BLOCK_B], ACC)
    inv_sum = tl.zeros([BLOCK_B], ACC)
    if SOFTMAX:
        run_max = tl.full([BLOCK_B], float("-inf"), ACC)
        run_sum = tl.zeros([BLOCK_B], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + offs_c
            c_mask = c < C
            dots = _dot_products(f_tile, f_rows, row_mask, anchors, c, c_mask, D, ONE_D, BLOCK_B, BLOCK_C, BLOCK_D, ACC)
            z, _ = _logits(dots, c, c_mask, lab, anorm, fn2, inv_fden, dy2, zy, gamma, METRIC)
            # The first block always holds a real class (C >= 1), so new_max is finite and exp(−inf − new_max) = 0.
            new_max = tl.maximum(run_max, tl.max(z, 1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
            run_max = new_max
        total += (run_max - zy) + tl.log(run_sum)
        inv_sum = 1.0 / run_sum
    tl.store(loss + rows, total, mask=row_mask)

    # ---- pass 2: gradient, one output block of BLOCK_D columns at a time ----
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        m2 = row_mask[:, None] & d_mask[None, :]
        wa = tl.zeros([BLOCK_B, BLOCK_D], ACC)  # Σ_c w_c a_c
        wsum = tl.zeros([BLOCK_B], ACC)  # Σ_c w_c
        wdot = tl.zeros([BLOCK_B], ACC)  # Σ_c w_c (f·a_c) = (w·A)·f
        if SOFTMAX:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + offs_c
                c_mask = c < C
                a = tl.load(
                    anchors + c.to(tl.int64)[:, None] * D + d[None, :], mask=c_mask[:, None] & d_mask[None, :], other=0
                ).to(ACC)
                if ONE_D:
                    dots = tl.dot(f_tile, tl.trans(a), input_precision="ieee", out_dtype=ACC)
                else:
                    dots = _dot_products(
                        f_tile, f_rows, row_mask, anchors, c, c_mask, D, ONE_D, BLOCK_B, BLOCK_C, BLOCK_D, ACC
                    )
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
                    if not ONE_D:
                        wdot += tl.sum(tl.where(c_mask[None, :], w * dots, 0.0), 1)
                w = tl.where(c_mask[None, :], w, 0.0)
                wsum += tl.sum(w, 1)
                wa = tl.dot(w, a, wa, input_precision="ieee", out_dtype=ACC)
        f = tl.load(f_rows[:, None] + d[None, :], mask=m2, other=0).to(ACC)
        ay = tl.load(ay_rows[:, None] + d[None, :], mask=m2, other=0).to(ACC)
        if METRIC == _COSINE:
            ghat = wa - (rho_w * an_y)[:, None] * ay
            # The reference's divisions, correctly rounded: f̂ = f/‖f‖ is then exactly ±1 where D = 1, and the
            # gradient (which has no tangent direction there) exactly 0 instead of eps·|dF̂|.
            fden_col = fden[:, None]
            fhat = _div_rn(f, fden_col)
            if ONE_D:  # dF̂·f̂ from dF̂ itself, as the reference
                radial = tl.sum(ghat * fhat, 1)
            else:  # dF̂ is spread over the D blocks: its dot with f was summed in the class loop
                radial = _div_rn(wdot - rho_w * an_y * fay, fden)
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
            # Rounded on the bits: the interpreter's float32 -> bfloat16 cast truncates (see mix_subpatches).
            out = _round_to_bfloat16(g.to(tl.float32))
        else:
            out = g.to(grad.dtype.element_ty)
        tl.store(grad + rows[:, None] * D + d[None, :], out, mask=m2)


def block_sizes(D: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_D) for features of D columns; every one >= 16 (tl.dot's smallest tile)."""
    return _BLOCK_B, _BLOCK_C, min(max(16, triton.next_power_of_2(D)), _MAX_BLOCK_D)


def anchor_loss_triton(
    features: torch.Tensor,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    metric: str,
    scale: float,
    pull: float,
    softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the kernel; arguments are already checked by the caller (shapes, labels in [0, C), metric, pull > 0
    when not softmax).

    Args:
        features (Tensor[B, D]): float16, bfloat16, float32 or float64.
        anchors (Tensor[C, D]): any of those float dtypes (widened to the accumulation dtype on load; for float64
            features, to float64 before the launch).
        labels (Tensor[B] int64): in [0, C).
        metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        scale, pull, softmax: as :func:`ppml.anchor_loss`.

    Returns:
        (loss, grad): Tensor[B] float32 (float64 for float64 features), and d(loss_i)/d(f_i) as a contiguous
        Tensor[B, D] of the features' dtype.
    """
    B, D = features.shape
    C = anchors.shape[0]
    acc_t = accumulation_dtype(features.dtype)
    f = features.contiguous()
    # float64 accumulation takes float64 anchors: widened here (exactly, as the kernel's load would) because Triton
    # cannot lower a float64 tl.dot whose operand was widened from 16 bits in the kernel (it folds the cast into the
    # operand's layout and fails in MMAv2 lowering: "fp64 don't support largeK MMA", triton 3.6 and 3.8, sm_90).
    a = (anchors.to(acc_t) if acc_t == torch.float64 else anchors).contiguous()
    y = labels.contiguous()
    loss = torch.empty(B, dtype=acc_t, device=features.device)
    grad = torch.empty((B, D), dtype=features.dtype, device=features.device)
    if B == 0:
        return loss, grad
    # C values, once per call, by a reduction (no C×D temporary): squared norms for the Euclidean metrics (the
    # −(γ/2)‖a_c‖² term, the expanded-form distance), inverse norms (floored like F.normalize) for cosine.
    # (vector_norm widens but refuses to narrow: float64 anchors of float32 features are rounded first, as the kernel
    # rounds them on load.)
    norm = torch.linalg.vector_norm(a.to(acc_t) if a.dtype == torch.float64 else a, dim=1, dtype=acc_t)
    anorm = (1.0 / norm.clamp_min(COS_EPS)) if metric == "cosine" else norm.square()
    block_b, block_c, block_d = block_sizes(D)
    _anchor_loss_kernel[(triton.cdiv(B, block_b),)](
        f,
        a,
        anorm.contiguous(),
        y,
        loss,
        grad,
        B,
        C,
        D,
        float(scale),
        float(pull),
        METRIC=_METRIC_IDS[metric],
        SOFTMAX=bool(softmax),
        ONE_D=D <= block_d,
        ACC=tl.float64 if acc_t == torch.float64 else tl.float32,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
        BLOCK_D=block_d,
        num_warps=_NUM_WARPS,
    )
    return loss, grad
