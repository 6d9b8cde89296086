"""ppml::anchor_loss on CUDA, on tensor cores: exact fp32 (allow_tf32 off), TF32, bfloat16 and float16 features
against the float64 reference, within the mixed-precision bounds the op's docstring states (ppml/ops/anchor_loss.py);
every metric, pull on and off, C = 3 and chunked C; no host sync; a bad label stops the stream with a named assert.
Skipped without CUDA; benchmarks/gpu_check.sh runs them on the lent GPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import anchor_loss_ref64

import ppml
from ppml.reference.anchor_loss import COS_EPS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

METRICS = ["sqeuclidean", "euclidean", "cosine"]
SETTINGS = [(0.0, True), (0.3, True), (0.7, False)]  # (pull, softmax)
# Unit roundoff of the GEMM's inputs (the docstring's u): TF32 2^-10 (allowing for truncation), bfloat16 2^-8,
# float16 2^-11; exact fp32 has only its accumulation error, which the D·2^-24 term below covers for every mode.
MODES = {"fp32": 0.0, "tf32": 2.0**-10, "bf16": 2.0**-8, "fp16": 2.0**-11}
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _case(B, D, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, D, generator=g, dtype=torch.float64) / math.sqrt(D) * 2  # ‖f‖ ≈ 2
    a = ppml.make_anchors(C, D, "simplex" if D >= C - 1 else "random", 1.5, generator=g).double()
    y = torch.randint(0, C, (B,), generator=g)
    return f, a, y


def _bounds(f, a, y, metric, scale, pull, softmax, u):
    """The docstring's bounds per row, from float64 data: δ_i (logit error), the loss bound 2δ_i and the ℓ2 gradient
    bound ((e^{2δ_i} − 1) + 4u)·S_i, plus float32's own rounding (relative 1e-5 loss, 1e-4 gradient)."""
    f, a = f.double(), a.double()
    fn = f.norm(dim=1)
    an = a.norm(dim=1)
    d = torch.cdist(f, a)
    if metric == "sqeuclidean":
        delta = 2 * u * scale * fn * an.max()
        S = scale * (an.max() + fn)
    elif metric == "euclidean":
        off = d.scatter(1, y[:, None], math.inf)  # the true class's distance comes from the difference vector: exact
        delta = (2 * u * scale * fn[:, None] * an[None, :] / off.clamp_min(1e-6)).amax(1)
        S = scale * ((an[None, :] + fn[:, None]) / d.clamp_min(1e-6)).amax(1)
    else:
        delta = torch.full_like(fn, 2 * u * scale)
        S = scale / fn.clamp_min(COS_EPS)
    if not softmax:
        delta, S = torch.zeros_like(delta), torch.zeros_like(S)
    return delta, 2 * delta, (torch.expm1(2 * delta) + 4 * u) * S


def _run(mode, f, a, y, metric, scale, pull, softmax, anchors_dtype=None):
    dtype = _DTYPES[mode]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    try:
        x = f.to(dtype).cuda().requires_grad_(True)
        loss = ppml.anchor_loss(x, a.to(anchors_dtype or dtype).cuda(), y.cuda(), metric=metric, scale=scale,
                                pull=pull, softmax=softmax, reduction="none", backend="native")
        loss.sum().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    return x.detach().double().cpu(), loss.detach().double().cpu(), x.grad.double().cpu()


def _check(mode, f, a, y, metric, scale, pull, softmax, anchors_dtype=None):
    xin, loss, grad = _run(mode, f, a, y, metric, scale, pull, softmax, anchors_dtype)
    # the reference on the inputs as the op saw them: features (and anchors) rounded to the dtype they were given in
    a_seen = a.to(anchors_dtype or _DTYPES[mode]).double()
    ref_l, ref_g = anchor_loss_ref64(xin, a_seen, y, metric, scale, pull, softmax)
    u = MODES[mode] + f.shape[1] * 2.0**-24
    _, loss_tol, grad_tol = _bounds(xin, a_seen, y, metric, scale, pull, softmax, u)
    out_u = {"bf16": 2.0**-8, "fp16": 2.0**-11}.get(mode, 0.0)  # the gradient is returned in the features' dtype
    l_err = (loss - ref_l).abs()
    l_ok = l_err <= loss_tol + 1e-5 * (1 + ref_l.abs())
    assert l_ok.all(), f"{mode} {metric}: loss off by {float(l_err.max()):.3g}"
    g_err = (grad - ref_g).norm(dim=1)
    g_tol = grad_tol + (1e-4 + out_u) * (1 + ref_g.norm(dim=1))
    assert (g_err <= g_tol).all(), f"{mode} {metric}: grad off by {float((g_err - g_tol).max()):.3g} beyond the bound"
    return l_err, g_err


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("pull,softmax", SETTINGS)
@pytest.mark.parametrize("C", [3, 1000])
def test_tensor_core_modes_within_documented_bounds(mode, metric, pull, softmax, C):
    f, a, y = _case(B=37, D=96, C=C, seed=C)
    _check(mode, f, a, y, metric, 4.0, pull, softmax)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_half_features_with_fp32_anchors(mode):
    # the GEMMs take the anchors rounded to the features' dtype; the exact terms (‖a‖², ‖f − a_y‖², pull) the fp32 ones
    f, a, y = _case(B=20, D=64, C=50, seed=3)
    for metric in METRICS:
        xin, loss, grad = _run(mode, f, a, y, metric, 2.0, 0.2, True, anchors_dtype=torch.float32)
        ref_l, ref_g = anchor_loss_ref64(xin, a.float().double(), y, metric, 2.0, 0.2, True)
        u = MODES[mode] + 64 * 2.0**-24
        _, loss_tol, grad_tol = _bounds(xin, a, y, metric, 2.0, 0.2, True, u)
        assert ((loss - ref_l).abs() <= loss_tol + 1e-5 * (1 + ref_l.abs())).all(), metric
        g_tol = grad_tol + (1e-4 + MODES[mode]) * (1 + ref_g.norm(dim=1))
        assert ((grad - ref_g).norm(dim=1) <= g_tol).all(), metric


@pytest.mark.parametrize("mode", list(MODES))
def test_several_chunks_of_rows(mode, monkeypatch):
    # a 4,096-element budget at C = 1,500: 2 rows per chunk, so B = 9 runs 5 chunks (the buffer reused, W over Z)
    monkeypatch.setenv("PPML_ANCHOR_CHUNK_ELEMENTS", "4096")
    f, a, y = _case(B=9, D=40, C=1500, seed=5)
    for metric in METRICS:
        _check(mode, f, a, y, metric, 3.0, 0.1, True)
    # and the chunked result is the unchunked one up to the GEMMs' own blocking
    chunked = _run(mode, f, a, y, "euclidean", 3.0, 0.1, True)
    monkeypatch.delenv("PPML_ANCHOR_CHUNK_ELEMENTS")
    whole = _run(mode, f, a, y, "euclidean", 3.0, 0.1, True)
    tol = 1e-5 if mode == "fp32" else 1e-2
    assert torch.allclose(chunked[1], whole[1], rtol=tol, atol=tol)


def test_exact_fp32_matches_the_cpu_kernel():
    # allow_tf32 off: no tensor-core rounding, so the CUDA result is the CPU kernel's up to summation order
    f, a, y = _case(B=33, D=48, C=200, seed=7)
    for metric in METRICS:
        for pull, softmax in SETTINGS:
            _, loss, grad = _run("fp32", f, a, y, metric, 2.0, pull, softmax)
            l2, g2 = torch.ops.ppml.anchor_loss(f.float(), a.float(), y, metric, 2.0, pull, softmax)
            assert torch.allclose(loss, l2.double(), rtol=1e-5, atol=1e-5), (metric, pull, softmax)
            assert torch.allclose(grad, g2.double(), rtol=1e-4, atol=1e-5), (metric, pull, softmax)


def test_tf32_follows_torch_setting():
    # Large-ish dot products, where TF32's 10-bit mantissa shows: with allow_tf32 off the result is exact fp32, with
    # it on the logits move by far more than fp32 rounding (the op honours the flag, as torch.mm does).
    f, a, y = _case(B=64, D=512, C=256, seed=11)
    f = f * 8
    _, exact, _ = _run("fp32", f, a, y, "sqeuclidean", 8.0, 0.0, True)
    _, tf32, _ = _run("tf32", f, a, y, "sqeuclidean", 8.0, 0.0, True)
    ref_l, _ = anchor_loss_ref64(f.float().double(), a.float().double(), y, "sqeuclidean", 8.0, 0.0, True)
    assert (exact - ref_l).abs().max() < 1e-3 * (1 + ref_l.abs().max())
    if torch.cuda.get_device_capability() >= (8, 0):
        assert (tf32 - ref_l).abs().max() > (exact - ref_l).abs().max()


def test_no_host_sync():
    f, a, y = _case(B=64, D=32, C=100)
    f32, a32, yc = f.float().cuda(), a.float().cuda(), y.cuda()

    def calls():
        for dtype in (torch.float32, torch.bfloat16):
            x = f32.to(dtype).requires_grad_(True)
            loss = sum(ppml.anchor_loss(x, a32.to(dtype), yc, metric=m, scale=4.0, pull=0.1, backend="native")
                       for m in METRICS)
            loss.backward()
        return x.grad

    calls()  # cuBLAS handle and workspace outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad = calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(grad.float()).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bad_label_is_a_named_device_side_assert(dtype):
    # In a child process: a device-side assert leaves the CUDA context unusable.
    code = (
        "import torch, ppml\n"
        f"f = torch.randn(4, 8, device='cuda', dtype=torch.{dtype}); a = torch.randn(3, 8, device='cuda')\n"
        "torch.ops.ppml.anchor_loss(f, a, torch.tensor([0, 1, 3, 0], device='cuda'), 'euclidean', 1.0, 0.0, True)\n"
        "torch.cuda.synchronize()\n"
        "print('NO ERROR')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    text = out.stdout + out.stderr
    assert out.returncode > 0 and "NO ERROR" not in text, text[-3000:]
    assert "device-side assert" in text and "ppml.anchor_loss" in text, text[-3000:]
