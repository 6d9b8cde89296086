"""Triton kernel of ppml::anchor_loss vs the fused formulas in float64: metrics × settings × dtypes, block edges (C, B
and D around the tiles, several class/row/D blocks), row chunks and class splits, edge values, mixed dtypes and
layouts, fuzzing, the op, AOT sm_90.

The `triton` tests run on a GPU, or here on CPU tensors in their own run: ``TRITON_INTERPRET=1 pytest -m triton``
(the variable must be set before ppml is imported). The AOT test compiles the kernel for sm_90 in a fresh process
without the interpreter, so it runs in the main run, GPU or not: every specialisation the tests launch
(aot_launches), mixed dtypes included.

Compile budget (see conftest.TRITON_CASES): compiled, each new (dtypes, metric, softmax, D class) costs ~1 s, so the
small-D tests share one D class (BLOCK_D = 16, D neither 1 nor a multiple of 16; B and C are not specialised by the
kernel) and the GPU set compiles each dtype × metric × softmax there once (test_triton_matches_float64_formulas),
plus the block-size classes of test_triton_block_edges, D = 1, and the mixed-dtype loads.

Oracle: ``loss_and_grad`` on the same inputs widened to float64. Tolerance (ARCHITECTURE.md's loss rule, applied per row
to the gradient's largest entry as well): |ours − ref64| <= 2·|torch_same − ref64| + atol·(1 + |ref64|) + cond,
torch_same being ``loss_and_grad`` run in the kernel's own precision (float32 for half inputs, the gradient rounded to
the input dtype). atol is 1e-10 for float64 and 1e-5 for float32 arithmetic; half-precision gradients add one ulp of
their dtype (the float32 gradient may sit on the other side of a rounding point than torch's). cond is the conditioning
of the Euclidean logits, 2·eps(acc)·γ·(‖f‖² + max‖a‖²) on a logit (see term_scale; 0 for cosine): at γ = 20 and D = 130
one float32 logit is only good to ~1e-3, and torch's own error there, the 2·|torch_same − ref64| term, is small by luck.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ALL_TRITON_CASES, INTERPRET, run_aot_replay, triton_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml.ops.anchor_loss import loss_and_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_run = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton needs a GPU, or TRITON_INTERPRET=1 set before import (run: TRITON_INTERPRET=1 pytest -m triton)",
)
# The custom op ppml::anchor_loss_triton wraps the launcher; until it is registered only the launcher is tested.
needs_op = pytest.mark.skipif(
    not hasattr(torch.ops.ppml, "anchor_loss_triton"), reason="torch.ops.ppml.anchor_loss_triton not registered"
)
pytestmark = [pytest.mark.triton]

METRICS = ["sqeuclidean", "euclidean", "cosine"]
SETTINGS = [(0.0, True), (0.5, True), (0.7, False)]  # (pull, softmax)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Neither is a float32: a kernel that took them as float32 arguments would miss the float64 tolerance by ~1e-8.
SCALE, PULL_SCALE = 1.7, 1.0

LOSS_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def launch(f, a, y, metric, scale, pull, softmax, config=None):
    from ppml.kernels.anchor_loss import anchor_loss_triton

    return anchor_loss_triton(f, a, y, metric, scale, pull, softmax, config=config)


def make_case(B, C, D, dtype=torch.float32, seed=0, anchor_dtype=None, device=DEVICE):
    """Features ~ N(0, 1), anchors of unequal norms (the per-anchor norms matter), labels uniform."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    a = torch.randn(C, D, generator=g, dtype=torch.float64) * (0.5 + torch.rand(C, 1, generator=g, dtype=torch.float64))
    y = torch.randint(0, C, (B,), generator=g)
    return f.to(device, dtype), a.to(device, anchor_dtype or dtype), y.to(device)


def term_scale(f, a, metric, scale):
    """Per row, the size of the terms one logit is computed from, so that it is only exact to eps(acc) times this:
    γ·(‖f‖·max‖a‖ + max‖a‖²) for squared Euclidean (γ f·a_c − (γ/2)‖a_c‖²), γ·(‖f‖² + max‖a‖²) for Euclidean (the
    expanded form ‖f‖² − 2f·a + ‖a‖²); 0 for cosine (bounded logits, no cancellation)."""
    if metric == "cosine":
        return torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
    fn, an = f.double().norm(dim=1), a.double().norm(dim=1).max()
    return scale * ((fn * an if metric == "sqeuclidean" else fn.square()) + an.square())


def assert_within(ours, same, ref, atol, cond, what):
    """|ours − ref| <= 2·|same − ref| + atol·(1 + |ref|) + cond, per row (the gradient by its largest entry: its errors
    come from the row's logits and spread over the row, so where torch happens to be exact elementwise says little)."""
    err, err_same, mag = (ours.double() - ref).abs(), (same.double() - ref).abs(), ref.abs()
    if err.dim() == 2:
        err, err_same, mag = err.amax(1), err_same.amax(1), mag.amax(1)
    bound = 2 * err_same + atol * (1 + mag) + cond
    ok = err <= bound
    if not bool(ok.all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: {int((~ok).sum())} of {ok.numel()} rows outside tolerance; worst row {i}: err={err[i].item()!r} "
            f"bound={bound[i].item()!r} |ref|={mag[i].item()!r}"
        )


def check(f, a, y, metric, scale, pull, softmax, out=None):
    """The launcher's (or a given) output against the float64 formulas, with the output contract."""
    loss, grad = launch(f, a, y, metric, scale, pull, softmax) if out is None else out
    B, D = f.shape
    acc = torch.float64 if f.dtype == torch.float64 else torch.float32
    assert loss.shape == (B,) and loss.dtype == acc and loss.device == f.device
    assert grad.shape == (B, D) and grad.dtype == f.dtype and grad.is_contiguous() and grad.device == f.device
    assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(grad).all())
    ref_l, ref_g = loss_and_grad(f.double(), a.double(), y, metric, scale, pull, softmax)
    same_l, same_g = loss_and_grad(f, a, y, metric, scale, pull, softmax)
    # A logit error δ moves the loss by up to δ and each probability by p·δ, so the gradient by γ·δ·max|f − a_c|.
    delta = 2 * torch.finfo(acc).eps * term_scale(f, a, metric, scale) if softmax else 0
    reach = scale * (f.double().abs().amax(1) + a.double().abs().max())
    assert_within(loss, same_l, ref_l, LOSS_ATOL[f.dtype], delta, "loss")
    assert_within(grad, same_g, ref_g, GRAD_ATOL[f.dtype], delta * reach, "grad")
    return loss, grad


# ---- the launcher vs the float64 formulas -----------------------------------------------------------------------


# Every dtype × metric × setting, in the GPU set too: these are the kernel's paths at the shared small-D class.
FORMULA_CASES = [(dtype, metric, pull, softmax) for dtype in DTYPES for metric in METRICS for pull, softmax in SETTINGS]


@triton_run
@pytest.mark.parametrize("dtype,metric,pull,softmax", triton_cases(FORMULA_CASES, keep=lambda *case: True))
def test_triton_matches_float64_formulas(dtype, metric, pull, softmax):
    # C = 20: two class blocks, the second partial; D = 12: not a power of two, one masked D block (the small-D class
    # most tests share; test_triton_block_edges has the others).
    f, a, y = make_case(5, 20, 12, dtype, seed=DTYPES.index(dtype))
    check(f, a, y, metric, SCALE, pull * PULL_SCALE, softmax)


BLOCK_EDGE_SHAPES = [
    (1, 1, 1),  # B = 1, C = 1 (loss = pull term only, softmax of one class), D = 1
    (3, 17, 5),  # C one past a class block
    (16, 16, 16),  # exactly one block of each
    (37, 50, 20),  # three row blocks (last partial), four class blocks, BLOCK_D = 32
    (4, 9, 40),  # BLOCK_D = 64, masked
    (2, 3, 128),  # D = BLOCK_D exactly: the resident-feature path at its limit
    (2, 3, 129),  # one past it: the looped-D path with a one-column last block
    (5, 33, 300),  # three D blocks, several W·A column blocks
]
# The GPU set: the looped-D path (D > 128) with every metric; each other block-size class with one metric (its D
# masks are metric-blind; D = 5 is the shared small-D class, free for all three).
_EDGE_METRIC = {1: "cosine", 16: "sqeuclidean", 20: "euclidean", 40: "sqeuclidean", 128: "cosine"}


def block_edge_runs(metric, B, C, D, all_cases=ALL_TRITON_CASES):
    """The (dtype, pull, softmax) runs of one block-edge case: the GPU set keeps float32 with the softmax."""
    if all_cases:
        dtypes, settings = (torch.float64, torch.float32), ((0.3, True), (0.7, False))
        return [(dtype, pull, softmax) for dtype in dtypes for pull, softmax in settings]
    return [(torch.float32, 0.3, True)]


@triton_run
@pytest.mark.parametrize(
    "metric,B,C,D",
    triton_cases(
        [(metric, *shape) for metric in METRICS for shape in BLOCK_EDGE_SHAPES],
        lambda metric, B, C, D: _EDGE_METRIC.get(D, metric) == metric,
    ),
)
def test_triton_block_edges(metric, B, C, D):
    for dtype, pull, softmax in block_edge_runs(metric, B, C, D):
        f, a, y = make_case(B, C, D, dtype, seed=B + C + D)
        check(f, a, y, metric, SCALE, pull, softmax)


@triton_run
def test_triton_launch_config_fills_the_gpu():
    # Tensor-core tiles (128, or 64 where the chunk has too few 128-tiles), the chunk of the native kernels (its
    # [chunk, C] buffer within the budget), the W·A split-K: B = 256 must give at least 132 programs (an H200's SMs)
    # in the W·A GEMM, and the logits one program per (row block, class tile) at the smallest tile; no tile below
    # tl.dot's 16; the split buffer within a quarter of the chunk budget.
    from ppml.kernels.anchor_loss import CHUNK_ELEMENTS, DOT_16, DOT_IEEE, DOT_TF32, launch_config

    for dot in (DOT_IEEE, DOT_TF32, DOT_16):
        for B, C, D in ((256, 1000, 768), (1024, 1000, 2048), (4096, 32000, 768), (3, 5, 1)):
            cfg = launch_config(B, C, D, dot)
            assert min(cfg.block_b, cfg.block_c, cfg.block_k, cfg.block_n, cfg.block_r) >= 16, cfg
            assert cfg.chunk * C <= max(CHUNK_ELEMENTS, C) and 1 <= cfg.splits <= -(-C // cfg.block_k), cfg
            assert cfg.splits == 1 or cfg.splits * cfg.chunk * D <= CHUNK_ELEMENTS // 4, cfg
            row_blocks = -(-cfg.chunk // cfg.block_b)
            if B >= 256:
                logit_programs = row_blocks * -(-C // cfg.block_c)
                assert logit_programs >= 132 or cfg.block_b == cfg.block_c == 64, cfg
                assert row_blocks * -(-D // cfg.block_n) * cfg.splits >= 132, (B, C, D, cfg)
        assert launch_config(4096, 32000, 768, dot).chunk == 2048, "two chunks of 2048 rows, as native"
        assert launch_config(256, 1000, 768, dot).block_b >= 64
    assert launch_config(4096, 32000, 768, DOT_16)[:4] == (128, 128, 64, 128)
    assert launch_config(8, 8, 8, DOT_16)[:3] == (64, 64, 16), "tensor-core tiles of 64, the K step cut to D"


def test_triton_chunk_rows_as_native(monkeypatch):
    # csrc/common/anchor_loss.h's anchor_chunk_rows: the budget over C, evened out; the same environment override.
    from ppml.kernels.anchor_loss import CHUNK_ELEMENTS, chunk_rows

    assert chunk_rows(4096, 32000, True) == 2048
    assert chunk_rows(1024, 1000, True) == 1024 and chunk_rows(5, 3, False) == 5
    most = CHUNK_ELEMENTS // 50_000
    assert chunk_rows(most + 1, 50_000, True) == -(-(most + 1) // 2)
    assert chunk_rows(4096, 10**9, True) == 1, "at least one row"
    monkeypatch.setenv("PPML_ANCHOR_CHUNK_ELEMENTS", "100")
    assert chunk_rows(10, 20, True) == 5 and chunk_rows(11, 20, True) == 4  # 3 chunks of <= 5 rows: 4, 4, 3
    monkeypatch.setenv("PPML_ANCHOR_CHUNK_ELEMENTS", "junk")
    assert chunk_rows(4096, 32000, True) == 2048


def test_triton_dot_mode_follows_dtypes_and_tf32_flag():
    # As torch's matmul: 16-bit operands of one dtype multiply in it; float32 in TF32 only when allowed.
    from ppml.kernels.anchor_loss import DOT_16, DOT_IEEE, DOT_TF32, dot_mode

    def t(dtype):
        return torch.zeros(1, 1, dtype=dtype)

    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow
            f32 = DOT_TF32 if allow else DOT_IEEE
            assert dot_mode(t(torch.bfloat16), t(torch.bfloat16)) == DOT_16
            assert dot_mode(t(torch.float16), t(torch.float16)) == DOT_16
            assert dot_mode(t(torch.float32), t(torch.float32)) == f32
            assert dot_mode(t(torch.bfloat16), t(torch.float32)) == f32, "mixed: float32 arithmetic"
            assert dot_mode(t(torch.float64), t(torch.float64)) == DOT_IEEE
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def small_config(chunk, splits):
    """16-wide tiles (tl.dot's smallest), forced row chunks and W·A class splits: several row, class, K and column
    blocks, chunks and split sums, at interpreter-sized shapes."""
    from ppml.kernels.anchor_loss import Config

    return Config(16, 16, 16, 16, 16, chunk, splits, 4)


# (B, C, D, chunk, splits): ragged B and C (masks), ragged last chunks, chunks of one row block and of several, a
# split count above the K steps (clipped), D spanning several K and column blocks.
SPLIT_SHAPES = [(19, 37, 20, 7, 2), (5, 50, 33, 2, 4), (33, 17, 7, 33, 1), (7, 70, 12, 3, 9)]
SPLIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def split_runs(all_cases=ALL_TRITON_CASES):
    """(dtype, metric, pull, softmax, shape) of the split tests: the GPU set one metric and setting per dtype."""
    runs = []
    for i, (dtype, metric, (pull, softmax)) in enumerate(itertools.product(SPLIT_DTYPES, METRICS, SETTINGS)):
        if all_cases or i % (len(METRICS) * len(SETTINGS)) == SPLIT_DTYPES.index(dtype):
            runs.append((dtype, metric, pull, softmax, SPLIT_SHAPES[i % len(SPLIT_SHAPES)]))
    return runs


@triton_run
@pytest.mark.parametrize("dtype,metric,pull,softmax,shape", split_runs(), ids=str)
def test_triton_chunks_splits_and_ragged_blocks(dtype, metric, pull, softmax, shape):
    B, C, D, chunk, splits = shape
    f, a, y = make_case(B, C, D, dtype, seed=B * C + D)
    out = launch(f, a, y, metric, SCALE, pull, softmax, config=small_config(chunk, splits))
    loss, grad = check(f, a, y, metric, SCALE, pull, softmax, out=out)
    # Chunks and splits regroup the same sums: one chunk and one split agree with them to float rounding.
    one = launch(f, a, y, metric, SCALE, pull, softmax, config=small_config(B, 1))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss, one[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), one[1].double(), rtol=tol, atol=tol + GRAD_ATOL[dtype])


@triton_run
@pytest.mark.parametrize("metric", METRICS)
def test_triton_tf32_mode(metric):
    # With allow_tf32 the float32 dots run in TF32 on a GPU: there the bound is check()'s with TF32's unit roundoff
    # (2^-11) in the conditioning term and torch's own matmul in TF32 as `same`. The interpreter multiplies in float32,
    # so on CPU the TF32 specialisation's paths and masks are held to the float32 bound.
    f, a, y = make_case(19, 37, 20, torch.float32, seed=11)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if INTERPRET:
            check(f, a, y, metric, SCALE, 0.5, True)
        else:
            loss, grad = launch(f, a, y, metric, SCALE, 0.5, True)
            ref_l, ref_g = loss_and_grad(f.double(), a.double(), y, metric, SCALE, 0.5, True)
            same_l, same_g = loss_and_grad(f, a, y, metric, SCALE, 0.5, True)
            delta = 2 * 2.0**-11 * term_scale(f, a, metric, SCALE) + (2.0**-11 * SCALE if metric == "cosine" else 0)
            reach = SCALE * (f.double().abs().amax(1) + a.double().abs().max())
            assert_within(loss, same_l, ref_l, 1e-5, delta, "loss")
            assert_within(grad, same_g, ref_g, 1e-5, delta * reach, "grad")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_empty_batch(dtype):
    f, a, y = make_case(0, 4, 6, dtype)
    loss, grad = launch(f, a, y, "cosine", 1.0, 0.0, True)
    assert loss.shape == (0,) and grad.shape == (0, 6) and grad.dtype == dtype


@triton_run
@pytest.mark.parametrize("pull,softmax", SETTINGS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_triton_edge_values_stay_finite(dtype, metric, pull, softmax):
    f, a, y = make_case(4, 5, 8, dtype, seed=1)
    f[0] = 0  # zero-norm feature: cosine divides by max(‖f‖, ε), its gradient is dF̂/ε
    f[1] = a[y[1]]  # exactly on its anchor: the non-squared distance's slope is infinite there
    f[2] = a[(y[2] + 1) % 5]  # exactly on another anchor
    check(f, a, y, metric, 4.0, pull, softmax)


@triton_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_triton_cosine_one_dimension_has_no_gradient(dtype):
    # D = 1: f̂ = ±1 and cos(f, a) = ±1 whatever ‖f‖, so the gradient is 0, and with correctly rounded divisions (as the
    # reference) exactly 0, not eps·|dF̂|.
    f, a, y = make_case(5, 3, 1, dtype, seed=8)
    for pull, softmax in SETTINGS:
        _, grad = check(f, a, y, "cosine", 19.0, pull, softmax)
        assert bool((grad == 0).all())


@triton_run
@pytest.mark.parametrize("metric", METRICS)
def test_triton_huge_logits_stable_log_sum_exp(metric):
    # Logits down to ~−1e6: exp overflows without the running max and underflows for all but a class or two. One ulp
    # of such a float32 logit moves the softmax visibly, so only closeness to 1e-3 is asked here, next to finiteness.
    f, a, y = make_case(6, 20, 8, torch.float32, seed=2)
    f = f * 10
    loss, grad = launch(f, a, y, metric, 1e4, 0.0, True)
    assert bool(torch.isfinite(loss).all() and torch.isfinite(grad).all()) and bool((loss >= 0).all())
    ref_l, ref_g = loss_and_grad(f.double(), a.double(), y, metric, 1e4, 0.0, True)
    assert bool(((loss.double() - ref_l).abs() <= 1e-3 * (1 + ref_l.abs())).all())
    assert bool(((grad.double() - ref_g).abs() <= 1e-3 * (1 + ref_g.abs())).all())


MIXED_DTYPES = [
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    # float64 features with 16-bit anchors did not compile for the GPU (a float64 tl.dot on an operand widened from 16
    # bits); the launcher widens such anchors to float64 first.
    (torch.float64, torch.float16),
]


def mixed_dtype_metrics(f_dtype, a_dtype, all_cases=ALL_TRITON_CASES):
    """Every metric, or in the GPU set one per pair (the anchors' load and widening do not depend on it)."""
    return METRICS if all_cases else [METRICS[MIXED_DTYPES.index((f_dtype, a_dtype)) % len(METRICS)]]


@triton_run
@pytest.mark.parametrize("f_dtype,a_dtype", MIXED_DTYPES, ids=str)
def test_triton_anchors_of_another_dtype(f_dtype, a_dtype):
    # The accumulation dtype follows the features; anchors are widened (or rounded) to it on load, like .to(acc).
    f, a, y = make_case(5, 20, 12, f_dtype, seed=3, anchor_dtype=a_dtype)
    for metric in mixed_dtype_metrics(f_dtype, a_dtype):
        check(f, a, y, metric, SCALE, 0.5, True)


@triton_run
def test_triton_strided_inputs():
    f, a, y = make_case(6, 20, 10, torch.float32, seed=4)
    f_t = f.T.contiguous().T  # column-major
    a_s = torch.repeat_interleave(a, 2, dim=1)[:, ::2]  # every other column
    y_s = torch.repeat_interleave(y, 2)[::2]
    assert not (f_t.is_contiguous() or a_s.is_contiguous() or y_s.is_contiguous())
    for metric in METRICS:
        expected = launch(f, a, y, metric, SCALE, 0.5, True)
        got = launch(f_t, a_s, y_s, metric, SCALE, 0.5, True)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---- fuzzing ------------------------------------------------------------------------------------------------------


# D: 1 to 40 (BLOCK_D 16, 32, 64) and 120 to 140 (128, resident or looped). The GPU set draws D from the shared
# small-D class only (2 to 15: every draw is then a specialisation test_triton_matches_float64_formulas compiled; B and
# C are not specialised): random D in the other classes would be a compile (~1 s) per new dtype/metric/setting.
FUZZ_D = st.one_of(st.integers(1, 40), st.integers(120, 140)) if ALL_TRITON_CASES else st.integers(2, 15)


@st.composite
def tiny_cases(draw):
    # At most two row programs; D past 128 now and then for the looped-D path. The interpreter costs ms per program.
    D = draw(FUZZ_D)
    return (
        draw(st.integers(1, 20)),
        draw(st.integers(1, 40)),
        D,
        draw(st.sampled_from(METRICS)),
        draw(st.sampled_from(SETTINGS)),
        draw(st.sampled_from(DTYPES)),
        draw(st.floats(0.1, 20.0)),
        draw(st.integers(0, 2**31 - 1)),
    )


@triton_run
@settings(max_examples=200, deadline=None)
@given(case=tiny_cases())
def test_triton_fuzz(case):
    B, C, D, metric, (pull, softmax), dtype, scale, seed = case
    f, a, y = make_case(B, C, D, dtype, seed)
    check(f, a, y, metric, scale, pull, softmax)


# ---- the op ppml::anchor_loss_triton ------------------------------------------------------------------------------


OPCHECK_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@triton_run
@needs_op
@pytest.mark.parametrize(
    "dtype,metric",
    # The GPU set: one metric per dtype (the op's schema, fake and autograd registrations do not depend on it).
    triton_cases(
        [(dtype, metric) for dtype in OPCHECK_DTYPES for metric in METRICS],
        lambda dtype, metric: METRICS.index(metric) == OPCHECK_DTYPES.index(dtype),
    ),
)
def test_triton_op_opcheck(dtype, metric):
    # Small: opcheck calls the kernel a dozen times.
    f, a, y = make_case(3, 4, 5, dtype)
    torch.library.opcheck(torch.ops.ppml.anchor_loss_triton, (f.requires_grad_(True), a, y, metric, 2.0, 0.3, True))


@triton_run
@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_triton_op_matches_launcher(dtype):
    f, a, y = make_case(5, 20, 12, dtype, seed=5)
    for metric in METRICS:
        loss, grad = torch.ops.ppml.anchor_loss_triton(f, a, y, metric, SCALE, 0.5, True)
        expected = launch(f, a, y, metric, SCALE, 0.5, True)
        assert torch.equal(loss, expected[0]) and torch.equal(grad, expected[1])


@triton_run
@needs_op
@pytest.mark.parametrize("pull,softmax", SETTINGS)
@pytest.mark.parametrize("metric", METRICS)
def test_triton_op_gradcheck(metric, pull, softmax):
    # 2 x 3 inputs, two forward calls each; the backward is the forward's gradient scaled by grad_loss.
    f, a, y = make_case(2, 4, 3, torch.float64, seed=6)
    f.requires_grad_(True)
    op = torch.ops.ppml.anchor_loss_triton
    assert torch.autograd.gradcheck(lambda t: op(t, a, y, metric, 2.0, pull, softmax)[0], (f,))


@triton_run
@needs_op
def test_triton_op_compile_fullgraph():
    f, a, y = make_case(6, 5, 8, torch.float32, seed=7)
    op = torch.ops.ppml.anchor_loss_triton

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t):
        return op(t, a, y, "euclidean", 2.0, 0.1, True)[0].mean() * 2

    x = f.clone().requires_grad_(True)
    out = step(x)
    out.backward()
    loss, grad = launch(f, a, y, "euclidean", 2.0, 0.1, True)
    torch.testing.assert_close(out, loss.mean() * 2)
    torch.testing.assert_close(x.grad, grad * (2 / 6))


@triton_run
@needs_op
def test_triton_op_meta_shapes():
    op = torch.ops.ppml.anchor_loss_triton
    y = torch.empty(7, dtype=torch.int64, device="meta")
    for dtype, acc in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, torch.float64)):
        f = torch.empty(7, 12, device="meta", dtype=dtype)
        loss, grad = op(f, torch.empty(3, 12, device="meta"), y, "cosine", 1.0, 0.0, True)
        assert loss.shape == (7,) and loss.dtype == acc and loss.device.type == "meta"
        assert grad.shape == (7, 12) and grad.dtype == dtype and grad.is_contiguous()


# ---- GPU lowering -------------------------------------------------------------------------------------------------


def aot_launches(all_cases=ALL_TRITON_CASES):
    """The launches of the tests above through the launcher, on CPU tensors (test_triton_kernel_aot_compiles_for_sm90
    records and compiles them): the GPU set, which is what a GPU run compiles (on a GPU the AOT tests run first, so
    the tests' launches find these compiles in Triton's cache), or with PPML_TRITON_CASES=all every parametrisation
    and, for the fuzz (random shapes), every dtype × metric × setting in each D class it can draw (minutes). A few
    more always: the bfloat16 looped-D kernels and float64 at BLOCK_D = 64 (register pressure, see _BLOCK_B in the
    kernel)."""

    def run(B, C, D, dtype, metric, pull, softmax, scale=SCALE, anchor_dtype=None):
        f, a, y = make_case(B, C, D, dtype, anchor_dtype=anchor_dtype, device="cpu")
        launch(f, a, y, metric, scale, pull, softmax)

    for dtype, metric, pull, softmax in FORMULA_CASES:
        run(5, 20, 12, dtype, metric, pull, softmax)
    for metric, shape in itertools.product(METRICS, BLOCK_EDGE_SHAPES):
        if all_cases or _EDGE_METRIC.get(shape[2], metric) == metric:
            for dtype, pull, softmax in block_edge_runs(metric, *shape, all_cases=all_cases):
                run(*shape, dtype, metric, pull, softmax)
    for dtype, metric, (pull, softmax) in itertools.product(
        [torch.float32, torch.float64, torch.bfloat16], METRICS, SETTINGS
    ):
        run(4, 5, 8, dtype, metric, pull, softmax, scale=4.0)  # edge values
    for dtype, (pull, softmax) in itertools.product([torch.float32, torch.float64], SETTINGS):
        run(5, 3, 1, dtype, "cosine", pull, softmax, scale=19.0)  # one dimension
    for f_dtype, a_dtype in MIXED_DTYPES:
        for metric in mixed_dtype_metrics(f_dtype, a_dtype, all_cases=all_cases):
            run(5, 20, 12, f_dtype, metric, 0.5, True, anchor_dtype=a_dtype)
    for metric in METRICS:
        run(6, 20, 8, torch.float32, metric, 0.0, True, scale=1e4)  # huge logits, strided inputs (same class)
        run(3, 4, 5, torch.float64, metric, 0.3, True)  # the op: opcheck, gradcheck, compile (same class)
    for metric in METRICS:
        run(2, 3, 300, torch.bfloat16, metric, 0.5, True)
    run(2, 3, 64, torch.float64, "euclidean", 0.5, True)
    for dtype, metric, pull, softmax, shape in split_runs(all_cases):  # the split tests' 16-wide tiles
        f, a, y = make_case(*shape[:3], dtype, device="cpu")
        launch(f, a, y, metric, SCALE, pull, softmax, config=small_config(*shape[3:]))
    # The production tiles at the benchmark's D = 768 (block sizes depend on D and the dot mode only; B and C set the
    # split counts, which are not specialised): bfloat16 and float32 in TF32 and IEEE, as the GPU benchmark runs them.
    # At B = 4096, C = 32,000 the tiles are 128 wide (the config forced here; B and C are not specialised).
    from ppml.kernels.anchor_loss import DOT_16, DOT_IEEE, DOT_TF32, launch_config

    for dtype in (torch.bfloat16, torch.float32):
        run(4, 5, 768, dtype, "sqeuclidean", 0.1, True)
        f, a, y = make_case(4, 5, 768, dtype, device="cpu")
        launch(
            f,
            a,
            y,
            "sqeuclidean",
            SCALE,
            0.1,
            True,
            config=launch_config(4096, 32000, 768, DOT_16 if dtype == torch.bfloat16 else DOT_IEEE),
        )
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        run(4, 5, 768, torch.float32, "sqeuclidean", 0.1, True)
        f, a, y = make_case(4, 5, 768, torch.float32, device="cpu")
        launch(f, a, y, "sqeuclidean", SCALE, 0.1, True, config=launch_config(4096, 32000, 768, DOT_TF32))
        for metric in METRICS:  # test_triton_tf32_mode
            run(19, 37, 20, torch.float32, metric, 0.5, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    if all_cases:  # the fuzz's D classes
        fuzz_d = [1, 5, 16, 20, 32, 40, 120, 128, 130]
        for D, dtype, metric, (pull, softmax) in itertools.product(fuzz_d, DTYPES, METRICS, SETTINGS):
            run(3, 7, D, dtype, metric, pull, softmax)


_PTX_CHECKS = """
import re
for (sig, consts), k in ok:
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and len(k.asm["cubin"]) > 0, consts
    if consts["DOT"] == 0:  # IEEE: a TF32 dot would ruin the expanded-form distance ‖f‖² − 2f·a + ‖a‖²
        assert "tf32" not in ptx, (sig, consts)
    elif consts["PHASE"] in (1, 3):  # TF32 and 16-bit: the logits and W·A on tensor cores
        assert re.search(r"^\\s*(wgmma\\.mma_async|mma\\.sync)", ptx, re.M), ("no mma/wgmma", sig, consts)
    if str(consts["ACC"]) == "fp32":  # IEEE square roots where there are any (cosine: ‖f‖; Euclidean: the distances)
        uses_sqrt = consts["METRIC"] == 1 and consts["SOFTMAX"] and consts["PHASE"] == 1
        assert "sqrt.approx" not in ptx and ("sqrt.rn.f32" in ptx or not uses_sqrt), (sig, consts)
    if consts["PHASE"] == 2 and consts["PACKED"]:  # bfloat16 W written over logits other threads still read
        assert re.search(r"^\\s*(bar|barrier)\\.sync", ptx, re.M), ("no barrier before the packed W", sig, consts)
    # scale and pull arrive as float64 (a float32 argument would cap the float64 path at ~1e-8).
    assert ".param .f64" in ptx, (sig, consts)
# The production tiles (D = 768: 64- and 128-wide) run wgmma, Hopper's warpgroup MMA, in TF32 and bfloat16.
big = [(c, k) for (s, c), k in ok if c["BLOCK_N"] == 128 and c["DOT"] in (1, 2) and c["PHASE"] in (1, 3)]
assert {(c["DOT"], c["PHASE"], c["BLOCK_B"]) for c, _ in big} == {
    (d, p, b) for d in (1, 2) for p in (1, 3) for b in (64, 128)}, sorted(map(str, big))
for c, k in big:
    assert "wgmma.mma_async" in k.asm["ptx"], ("no wgmma at the production tiles", c)
"""


@pytest.mark.skipif(INTERPRET, reason="AOT compile runs in the main (non-interpreter) run")
def test_triton_kernel_aot_compiles_for_sm90():
    run_aot_replay("test_anchor_loss_triton", "ppml.kernels.anchor_loss", "_anchor_loss_kernel", _PTX_CHECKS)
