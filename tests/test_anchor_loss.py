"""Anchors and ppml::anchor_loss: both anchor principles, every backend vs the float64 reference (ARCHITECTURE.md's loss
tolerance rule), the CE identity, gradcheck, opcheck, compile, meta, chunking, edge cases, bad input and fuzzing."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import anchor_loss_ref64, backends_for
from hypothesis import given, settings
from hypothesis import strategies as st

import ppml
from ppml.ops.anchor_loss import loss_and_grad
from ppml.reference import anchor_loss as ref_loss

METRICS = ["sqeuclidean", "euclidean", "cosine"]
SETTINGS = [(0.0, True), (0.5, True), (0.7, False)]  # (pull, softmax)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# ---- anchors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,C,D,expected_cos",
    [("simplex", 10, 9, -1 / 9), ("simplex", 2, 5, -1.0), ("simplex", 100, 128, -1 / 99), ("onehot", 10, 12, 0.0),
     ("hadamard", 10, 16, 0.0), ("hadamard", 64, 64, 0.0)],
)
@pytest.mark.parametrize("radius", [1.0, 4.5])
def test_anchor_principles(kind, C, D, expected_cos, radius):
    a = ppml.make_anchors(C, D, kind, radius, dtype=torch.float64)
    assert a.shape == (C, D)
    norms = a.norm(dim=1)
    assert torch.allclose(norms, torch.full((C,), radius, dtype=torch.float64), atol=1e-12), "equal norm"
    cos = (a @ a.T) / (norms[:, None] * norms[None, :])
    off = cos[~torch.eye(C, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, expected_cos), atol=1e-12), "equal, maximal separation"


def test_random_anchors_equal_norm_and_seeded():
    a = ppml.make_anchors(50, 256, "random", 2.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a.norm(dim=1), torch.full((50,), 2.0), atol=1e-5)
    assert torch.equal(a, ppml.make_anchors(50, 256, "random", 2.0, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    "args,pattern",
    [((10, 8, "simplex"), r"kind='simplex' needs dim >= num_classes - 1 = 9, got dim=8"),
     ((10, 9, "onehot"), r"kind='onehot' needs dim >= num_classes = 10, got dim=9"),
     ((10, 12, "hadamard"), r"kind='hadamard' needs dim >= 16 \(the power of two >= num_classes=10\), got dim=12"),
     ((10, 12, "spiral"), r"kind must be one of .*got 'spiral'"),
     ((0, 12, "onehot"), r"num_classes must be an int >= 1, got 0"),
     ((1, 12, "simplex"), r"kind='simplex' needs num_classes >= 2, got 1"),
     ((3, 12, "onehot", -1.0), r"radius must be a finite number > 0, got -1.0")],
)
def test_make_anchors_errors(args, pattern):
    with pytest.raises(ValueError, match=r"ppml\.make_anchors: " + pattern):
        ppml.make_anchors(*args)


# ---- the loss vs the float64 reference ----------------------------------------------------------------------------


def _case(B=33, D=16, C=10, dtype=torch.float32, seed=0, radius=3.0):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(B, D, generator=g, dtype=torch.float64) * 2).to(dtype)
    a = ppml.make_anchors(C, D, "simplex" if D >= C - 1 else "random", radius, generator=g).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    return f, a, y


def assert_loss_tolerance(ours, torch_same, ref64, atol):
    """ARCHITECTURE.md: |ours − ref_fp64| <= 2·|torch_same_dtype − ref_fp64| + atol (elementwise), with atol relative to the
    loss's size (the logits are sums of terms as large as γ·(‖f‖² + r²), rounded in the input's precision)."""
    ours, torch_same = ours.detach(), torch_same.detach()
    err = (ours.double() - ref64).abs()
    bound = 2 * (torch_same.double() - ref64).abs() + atol * (1 + ref64.abs())
    assert (err <= bound).all(), f"max excess {float((err - bound).max()):.3g}"


ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("pull,softmax", SETTINGS)
def test_backends_match_float64_reference(dtype, metric, pull, softmax):
    f, a, y = _case(dtype=dtype)
    ref_l, ref_g = anchor_loss_ref64(f, a, y, metric, 2.0, pull, softmax)
    # the same computation done by plain PyTorch in the input dtype: the yardstick of the tolerance
    x = f.detach().requires_grad_(True)
    same_l = ref_loss(x, a, y, metric, 2.0, pull, softmax)
    same_l.sum().backward()
    for backend in backends_for("cpu", "anchor_loss"):
        x = f.detach().requires_grad_(True)
        loss = ppml.anchor_loss(x, a, y, metric=metric, scale=2.0, pull=pull, softmax=softmax, reduction="none", backend=backend)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        loss.sum().backward()
        assert x.grad.dtype == dtype
        assert_loss_tolerance(loss, same_l, ref_l, ATOL[dtype])
        g_err = (x.grad.double() - ref_g).abs()
        assert (g_err <= 4 * (ATOL[dtype] * 10) * (1 + ref_g.abs())).all(), f"{backend}: grad off by {float(g_err.max()):.3g}"


def test_op_gradient_matches_plain_formulas_and_autograd():
    f, a, y = _case(dtype=torch.float64)
    for metric in METRICS:
        for pull, softmax in SETTINGS:
            loss, grad = torch.ops.ppml.anchor_loss(f, a, y, metric, 1.5, pull, softmax)
            l2, g2 = loss_and_grad(f, a, y, metric, 1.5, pull, softmax)
            ref_l, ref_g = anchor_loss_ref64(f, a, y, metric, 1.5, pull, softmax)
            for l_, g_ in ((loss, grad), (l2, g2)):
                assert torch.allclose(l_, ref_l, rtol=1e-12, atol=1e-12)
                assert torch.allclose(g_, ref_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_sqeuclidean_equals_cross_entropy_with_frozen_linear_layer(scale):
    # Equal-norm anchors: −(γ/2)‖f − a_c‖² = γ f·a_c − (γ/2)(‖f‖² + r²), and the per-row constant cancels in softmax.
    f, a, y = _case(B=64, D=32, C=20, dtype=torch.float64)
    expected = F.cross_entropy(f @ (scale * a).T, y)
    for backend in backends_for("cpu", "anchor_loss"):
        got = ppml.anchor_loss(f, a, y, metric="sqeuclidean", scale=scale, backend=backend)
        assert abs(float(got) - float(expected)) <= 1e-6
    f32, a32 = f.float(), a.float()
    got32 = ppml.anchor_loss(f32, a32, y, metric="sqeuclidean", scale=scale)
    ce32 = float(F.cross_entropy(f32 @ (scale * a32).T, y))
    assert abs(float(got32) - ce32) <= 1e-6 * (1 + abs(ce32))  # float32: relative (a few ulps of the loss)


def test_many_chunks_of_rows(monkeypatch):
    # A 4M-element buffer budget and C = 2^20 anchors: 4 rows at a time, so B = 10 takes 3 chunks
    # (float64, so that a softmax over a million classes is compared at full precision).
    monkeypatch.setenv("PPML_ANCHOR_CHUNK_ELEMENTS", str(1 << 22))
    f, a, y = _case(B=10, D=4, C=1 << 20, dtype=torch.float64)
    for metric in METRICS:
        loss, grad = torch.ops.ppml.anchor_loss(f, a, y, metric, 3.0, 0.1, True)
        l2, g2 = loss_and_grad(f, a, y, metric, 3.0, 0.1, True)
        assert torch.allclose(loss, l2, rtol=1e-10, atol=1e-10)
        assert torch.allclose(grad, g2, rtol=1e-8, atol=1e-10)


def test_sqeuclidean_gradient_has_no_rounding_drift_along_the_features():
    # Regression: with the ‖f‖² row constant kept in the logits, float32 left f·(1 − Σp) in the gradient — noise
    # along f that Adam turns into runaway feature norms. Far from the anchors (‖f‖ ~ 1e4) it is plain to see.
    f, a, y = _case(B=64, D=32, C=10, dtype=torch.float32, radius=1.0)
    f = f / f.norm(dim=1, keepdim=True) * 1e4
    _, grad = torch.ops.ppml.anchor_loss(f, a, y, "sqeuclidean", 1e-4, 0.0, True)
    _, g64 = loss_and_grad(f.double(), a.double(), y, "sqeuclidean", 1e-4, 0.0, True)
    assert torch.allclose(grad.double(), g64, rtol=1e-4, atol=1e-6 * float(g64.abs().max()))


def test_edge_cases_stay_finite():
    f, a, y = _case(B=4, D=8, C=5, dtype=torch.float32)
    f[0] = 0  # zero-norm feature (cosine divides by its norm)
    f[1] = a[y[1]]  # exactly on its anchor (the non-squared distance has an infinite slope there)
    for metric in METRICS:
        for pull, softmax in SETTINGS:
            loss, grad = torch.ops.ppml.anchor_loss(f, a, y, metric, 4.0, pull, softmax)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), metric
    # stable log-sum-exp: huge scales do not overflow
    loss, grad = torch.ops.ppml.anchor_loss(f * 100, a, y, "sqeuclidean", 1e4, 0.0, True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


# ---- torch.library integration --------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("pull,softmax", SETTINGS)
def test_gradcheck(metric, pull, softmax):
    f, a, y = _case(B=6, D=5, C=4, dtype=torch.float64)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ppml.anchor_loss(t, a, y, metric, 2.0, pull, softmax)[0], (f,))
    for backend in backends_for("cpu", "anchor_loss"):
        fn = lambda t, b=backend: ppml.anchor_loss(t, a, y, metric=metric, scale=2.0, pull=pull, softmax=softmax, backend=b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (f,))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck(metric, dtype):
    f, a, y = _case(B=5, D=6, C=4, dtype=dtype)
    torch.library.opcheck(torch.ops.ppml.anchor_loss, (f.requires_grad_(True), a, y, metric, 2.0, 0.3, True))


def test_torch_compile():
    f, a, y = _case(B=8, D=6, C=5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(t):
        return ppml.anchor_loss(t, a, y, metric="euclidean", scale=2.0, pull=0.1)

    @torch.compile(fullgraph=True)
    def step2(t):
        return torch.ops.ppml.anchor_loss(t, a, y, "cosine", 4.0, 0.0, True)[0].mean() * 2

    x = f.clone().requires_grad_(True)
    step(x).backward()
    x2 = f.clone().requires_grad_(True)
    ppml.anchor_loss(x2, a, y, metric="euclidean", scale=2.0, pull=0.1).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6)
    x3 = f.clone().requires_grad_(True)
    step2(x3).backward()
    assert x3.grad is not None and torch.isfinite(x3.grad).all()


def test_meta_shapes():
    loss, grad = torch.ops.ppml.anchor_loss(
        torch.empty(7, 12, device="meta", dtype=torch.bfloat16), torch.empty(3, 12, device="meta"),
        torch.empty(7, dtype=torch.int64, device="meta"), "cosine", 1.0, 0.0, True,
    )
    assert loss.shape == (7,) and loss.dtype == torch.float32 and grad.shape == (7, 12) and grad.dtype == torch.bfloat16


# ---- bad input -----------------------------------------------------------------------------------------------------

_F, _A, _Y = torch.zeros(4, 8), torch.eye(3, 8), torch.zeros(4, dtype=torch.int64)
BAD = [
    ((torch.zeros(4), _A, _Y, "cosine", 1.0, 0.0, True), r"features must be a float \[B, D\] tensor, got float32 \[4\]"),
    ((_F.long(), _A, _Y, "cosine", 1.0, 0.0, True), r"features must be a float \[B, D\] tensor, got int64"),
    ((_F, torch.eye(3, 7), _Y, "cosine", 1.0, 0.0, True), r"anchors must be a float \[C, D\] tensor with D=8, got float32 \[3, 7\]"),
    ((_F, _A, _Y.int(), "cosine", 1.0, 0.0, True), r"labels must be int64 \[B\] with B=4, got int32 \[4\]"),
    ((_F, _A, _Y[:3], "cosine", 1.0, 0.0, True), r"labels must be int64 \[B\] with B=4, got int64 \[3\]"),
    ((_F, _A, _Y, "manhattan", 1.0, 0.0, True), r"metric must be one of .*got 'manhattan'"),
    ((_F, _A, _Y, "cosine", 0.0, 0.0, True), r"scale must be a finite number > 0, got 0"),
    ((_F, _A, _Y, "cosine", 1.0, -1.0, True), r"pull must be a finite number >= 0, got -1"),
    ((_F, _A, _Y, "cosine", 1.0, 0.0, False), r"with softmax=False the loss is pull·ρ alone, so pull must be > 0"),
    ((_F, _A, torch.tensor([0, 1, 3, 0]), "cosine", 1.0, 0.0, True), r"labels must lie in \[0, C\) with C=3, got 3"),
    ((_F, _A, torch.tensor([0, -1, 2, 0]), "euclidean", 1.0, 0.0, True), r"labels must lie in \[0, C\) with C=3, got -1"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    args, pattern = BAD[case]
    with pytest.raises(ValueError, match=r"ppml\.anchor_loss: " + pattern):
        torch.ops.ppml.anchor_loss(*args)
    f, a, y, metric, scale, pull, softmax = args
    for backend in backends_for("cpu", "anchor_loss"):
        with pytest.raises(ValueError, match=r"ppml\.anchor_loss: " + pattern):
            ppml.anchor_loss(f, a, y, metric=metric, scale=scale, pull=pull, softmax=softmax, backend=backend)


def test_reduction_and_backend_errors():
    f, a, y = _case(B=4, D=8, C=3)
    with pytest.raises(ValueError, match=r"reduction must be 'mean', 'sum' or 'none', got 'max'"):
        ppml.anchor_loss(f, a, y, reduction="max")
    if not os.environ.get("TRITON_INTERPRET"):
        with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run on cpu: "):
            ppml.anchor_loss(f, a, y, backend="triton")
    per = ppml.anchor_loss(f, a, y, reduction="none")
    assert torch.allclose(ppml.anchor_loss(f, a, y), per.mean()) and torch.allclose(ppml.anchor_loss(f, a, y, reduction="sum"), per.sum())


# ---- module and prediction -----------------------------------------------------------------------------------------


def test_anchor_loss_module_and_prediction():
    crit = ppml.AnchorLoss(5, 8, kind="onehot", radius=2.0, metric="euclidean", scale=3.0, pull=0.1)
    assert "anchors" in crit.state_dict() and not list(crit.parameters())
    f, _, y = _case(B=12, D=8, C=5)
    loss = crit(f.requires_grad_(True), y)
    loss.backward()
    assert f.grad is not None and loss.shape == ()
    # features sitting on an anchor are predicted as that anchor's class, for every metric
    labels = torch.arange(5).repeat(2)
    on_anchor = crit.anchors[labels] * 1.01
    assert torch.equal(crit.predict(on_anchor), labels)
    for metric in METRICS:
        assert torch.equal(ppml.nearest_anchor(on_anchor, crit.anchors, metric), labels)
    assert "kind='onehot'" in repr(crit)
    with pytest.raises(ValueError, match=r"ppml\.AnchorLoss: metric must be one of"):
        ppml.AnchorLoss(5, 8, kind="onehot", metric="l1")


# ---- fuzzing: >= 200 cases per backend ----------------------------------------------------------------------------


@st.composite
def loss_cases(draw):
    return (draw(st.integers(1, 6)), draw(st.integers(1, 9)), draw(st.integers(1, 7)), draw(st.sampled_from(METRICS)),
            draw(st.sampled_from(SETTINGS)), draw(st.floats(0.1, 20.0)), draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", ["native", "reference"])
@settings(max_examples=200, deadline=None)
@given(case=loss_cases())
def test_fuzz_vs_float64_reference(backend, case):
    if backend not in backends_for("cpu", "anchor_loss"):
        pytest.skip(f"{backend} unavailable")
    B, D, C, metric, (pull, softmax), scale, seed = case
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64)
    a = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = f.clone().requires_grad_(True)
    loss = ppml.anchor_loss(x, a, y, metric=metric, scale=scale, pull=pull, softmax=softmax, reduction="none", backend=backend)
    loss.sum().backward()
    ref_l, ref_g = anchor_loss_ref64(f, a, y, metric, scale, pull, softmax)
    assert torch.allclose(loss, ref_l, rtol=1e-9, atol=1e-9)
    assert torch.allclose(x.grad, ref_g, rtol=1e-7, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("C", [10, 1000, 1 << 20])
def test_cuda_matches_cpu_formulas(dtype, C):
    f, a, y = _case(B=9, D=8, C=C, dtype=dtype)
    for metric in METRICS:
        for pull, softmax in SETTINGS:
            loss, grad = torch.ops.ppml.anchor_loss(f.cuda(), a.cuda(), y.cuda(), metric, 2.0, pull, softmax)
            l2, g2 = loss_and_grad(f.double(), a.double(), y, metric, 2.0, pull, softmax)
            tol = 1e-9 if dtype == torch.float64 else (1e-3 if dtype == torch.float32 else 5e-2)
            assert torch.allclose(loss.cpu().double(), l2, rtol=tol, atol=tol), (metric, pull, softmax)
            assert torch.allclose(grad.cpu().double(), g2, rtol=tol * 10, atol=tol), (metric, pull, softmax)
    # A label outside [0, C) is a device-side assert on CUDA (no host sync), which leaves the context unusable: it is
    # checked in a child process by tests/test_anchor_loss_cuda.py and tests/test_cuda_runtime.py.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_training_path_matches_the_registered_op(dtype, reduction):
    # In eager mode the public function runs the kernel in its own lean autograd node (host cost at small B); its loss
    # and gradient must be the registered op's, bit for bit, reduction and dtype casts included.
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(5, 6, generator=gen).to(dtype)
    a, y = torch.randn(4, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)
    upstream = torch.rand(5 if reduction == "none" else (), generator=gen)
    for backend in set(backends_for("cpu")) - {"reference"}:  # the reference is plain autograd, not the fused kernel
        x1, x2 = f.clone().requires_grad_(True), f.clone().requires_grad_(True)
        ours = ppml.anchor_loss(x1, a, y, metric="euclidean", pull=0.2, reduction=reduction, backend=backend)
        per = torch.ops.ppml.anchor_loss(x2, a, y, "euclidean", 1.0, 0.2, True)[0]
        theirs = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
        (ours * upstream).sum().backward()
        (theirs * upstream).sum().backward()
        assert torch.equal(ours.detach(), theirs.detach()), backend
        assert x1.grad.dtype == dtype and torch.equal(x1.grad, x2.grad), backend
