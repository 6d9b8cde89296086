"""Anchor-distance losses: ``ppml::anchor_loss`` — schema, checks, fake, autograd, public API, ``AnchorLoss``.

The op returns the per-sample loss and, fused into the same pass, its gradient with respect to the features (rows
are independent, so d(loss_i)/d(f_i) is all a backward needs): the B×C logits are produced and consumed a chunk of
rows at a time and never stored, and the backward is one scaling. Anchors are fixed and get no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _dispatch
from ..anchors import make_anchors
from ..reference import anchor_loss as _reference_loss
from ..reference.anchor_loss import COS_EPS, DIST2_EPS, METRICS, accumulation_dtype, anchor_logits
from ._common import check_values, describe, fallback_kernel, lib

OP = "ppml.anchor_loss"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

lib.define(
    "anchor_loss(Tensor features, Tensor anchors, Tensor labels, str metric, float scale, float pull, bool softmax)"
    " -> (Tensor, Tensor)"
)


def _check(features, anchors, labels, metric, scale, pull, softmax, op: str = OP) -> None:
    """Shapes, dtypes, devices and parameters (no data reads: fake tensors pass; label range is checked by kernels)."""
    if not isinstance(features, Tensor) or features.dim() != 2 or features.dtype not in _FLOATS:
        raise ValueError(f"{op}: features must be a float [B, D] tensor, got {describe(features)}")
    B, D = features.shape
    if not isinstance(anchors, Tensor) or anchors.dim() != 2 or anchors.dtype not in _FLOATS or anchors.shape[1] != D:
        raise ValueError(f"{op}: anchors must be a float [C, D] tensor with D={D}, got {describe(anchors)}")
    if anchors.shape[0] < 1:
        raise ValueError(f"{op}: anchors must hold at least one class, got {describe(anchors)}")
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (B,):
        raise ValueError(f"{op}: labels must be int64 [B] with B={B}, got {describe(labels)}")
    for name, t in (("anchors", anchors), ("labels", labels)):
        if t.device != features.device:
            raise ValueError(f"{op}: {name} must be on the features' device {features.device}, got {describe(t)}")
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {', '.join(map(repr, METRICS))}, got {metric!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale!r}")
    if not (isinstance(pull, (int, float)) and math.isfinite(pull) and pull >= 0):
        raise ValueError(f"{op}: pull must be a finite number >= 0, got {pull!r}")
    if not softmax and not pull:
        raise ValueError(f"{op}: with softmax=False the loss is pull·ρ alone, so pull must be > 0, got {pull!r}")


def _check_labels(labels: Tensor, num_classes: int, op: str = OP) -> None:
    """Labels in [0, C): an error at once on CPU, a device-side assert on a GPU (no host sync)."""
    if not labels.numel():
        return
    outside = (labels < 0) | (labels >= num_classes)

    def message(device_side: bool = False) -> str:
        got = "a label outside it" if device_side else str(labels[outside][0].item())
        return f"{op}: labels must lie in [0, C) with C={num_classes}, got {got}"

    check_values(~outside.any(), message)


@torch.library.register_fake("ppml::anchor_loss")
def _fake(features, anchors, labels, metric, scale, pull, softmax):
    _check(features, anchors, labels, metric, scale, pull, softmax)
    loss = features.new_empty(features.shape[0], dtype=accumulation_dtype(features.dtype))
    return loss, torch.empty_like(features, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    _, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(grad)


def _scale_rows(grad: Tensor, per_row: Tensor) -> Tensor:
    """The chain rule's only step: d(loss_i)/d(f_i), computed in the forward pass, times each row's incoming gradient
    (``per_row`` [B, 1], or 0-d). float32/float64 features: one multiply, no casts (at small B the op is host-bound);
    half features: the product in float32, rounded once."""
    if grad.dtype == per_row.dtype:
        return per_row * grad
    acc = accumulation_dtype(grad.dtype)
    return (per_row.to(acc) * grad.to(acc)).to(grad.dtype)


def _backward(ctx, grad_loss: Tensor, _unused):
    (grad,) = ctx.saved_tensors
    return _scale_rows(grad, grad_loss[:, None]), None, None, None, None, None, None


torch.library.register_autograd("ppml::anchor_loss", _backward, setup_context=_setup_context)


def loss_and_grad(features, anchors, labels, metric, scale, pull, softmax):
    """The fused formulas in plain PyTorch: per-sample loss and d(loss_i)/d(f_i), as the C++ kernels compute them
    (tests check both against autograd through :func:`ppml.reference.anchor_loss`).

    Gradients (A fixed): squared Euclidean, dF = γ·dz·A (the logits drop the ‖f‖² row constant); Euclidean,
    dF = f·Σ_c w_c − w·A with w_c = −γ dz_c/d_c; both + pull·(f − a_y);
    cosine: dF̂ = γ·dz·Â (− pull·â_y), then dF = (dF̂ − (dF̂·f̂)f̂)/‖f‖ (dF̂/ε below the norm floor)."""
    acc = accumulation_dtype(features.dtype)
    f, a = features.to(acc), anchors.to(acc)
    B = f.shape[0]
    ay = a[labels]
    loss = torch.zeros(B, dtype=acc, device=f.device)
    grad = torch.zeros_like(f)
    if metric == "cosine":
        fnorm = f.norm(dim=1, keepdim=True)
        fden = fnorm.clamp_min(COS_EPS)
        fh, ah = f / fden, a / a.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
        ghat = torch.zeros_like(f)
        if softmax:
            z = scale * (fh @ ah.T)
            lse = torch.logsumexp(z, 1)
            loss += lse - z.gather(1, labels[:, None])[:, 0]
            dz = torch.softmax(z, 1)
            dz[torch.arange(B, device=f.device), labels] -= 1
            ghat += scale * (dz @ ah)
        if pull:
            loss += pull * (1 - (fh * ah[labels]).sum(1))
            ghat -= pull * ah[labels]
        radial = (ghat * fh).sum(1, keepdim=True) * fh
        grad = torch.where(fnorm > COS_EPS, (ghat - radial) / fden, ghat / COS_EPS)
        return loss, grad.to(features.dtype)
    diff = f - ay
    dy2 = diff.square().sum(1)
    if softmax and metric == "sqeuclidean":
        # u_c = γ f·a_c − (γ/2)‖a_c‖² (the ‖f‖² row constant cancels): dF = γ·dz·A, with no f·Σ_c dz_c rounding noise
        u = scale * (f @ a.T) - 0.5 * scale * a.square().sum(1)
        loss += torch.logsumexp(u, 1) - u.gather(1, labels[:, None])[:, 0]
        dz = torch.softmax(u, 1)
        dz[torch.arange(B, device=f.device), labels] -= 1
        grad += scale * (dz @ a)
    elif softmax:
        d2 = (f.square().sum(1, keepdim=True) - 2 * f @ a.T + a.square().sum(1)).clamp_min(0)
        d2 = d2.scatter(1, labels[:, None], dy2[:, None])
        d = d2.clamp_min(DIST2_EPS).sqrt()
        z = -scale * d
        lse = torch.logsumexp(z, 1)
        loss += lse - z.gather(1, labels[:, None])[:, 0]
        dz = torch.softmax(z, 1)
        dz[torch.arange(B, device=f.device), labels] -= 1
        # ∂z_c/∂f = −γ(f − a_c)/d_c, 0 where the distance floor is active: dF = f·Σw − w·A with w_c = −γ dz_c/d_c
        w = torch.where(d2 > DIST2_EPS, -scale * dz / d, 0.0)
        grad += f * w.sum(1, keepdim=True) - w @ a
    if pull:
        loss += pull * 0.5 * dy2
        grad += pull * diff
    return loss, grad.to(features.dtype)


@fallback_kernel("anchor_loss")
def _reference_kernel(features, anchors, labels, metric, scale, pull, softmax):
    """The plain-PyTorch fused formulas as the kernel where ppml._C provides none."""
    _check(features, anchors, labels, metric, scale, pull, softmax)
    _check_labels(labels, anchors.shape[0])
    loss, grad = loss_and_grad(features, anchors, labels, metric, scale, pull, softmax)
    return loss, grad.contiguous()


# ---- Triton twin -------------------------------------------------------------------------------------------------


@torch.library.custom_op("ppml::anchor_loss_triton", mutates_args=())
def anchor_loss_triton(
    features: Tensor, anchors: Tensor, labels: Tensor, metric: str, scale: float, pull: float, softmax: bool
) -> tuple[Tensor, Tensor]:
    """Triton kernel of :func:`anchor_loss` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(features, anchors, labels, metric, scale, pull, softmax, op="ppml.anchor_loss_triton")
    _check_labels(labels, anchors.shape[0], op="ppml.anchor_loss_triton")
    from ppml.kernels.anchor_loss import anchor_loss_triton as launch

    return launch(features, anchors, labels, metric, scale, pull, softmax)


@anchor_loss_triton.register_fake
def _fake_triton(features, anchors, labels, metric, scale, pull, softmax):
    _check(features, anchors, labels, metric, scale, pull, softmax, op="ppml.anchor_loss_triton")
    loss = features.new_empty(features.shape[0], dtype=accumulation_dtype(features.dtype))
    return loss, torch.empty_like(features, memory_format=torch.contiguous_format)


anchor_loss_triton.register_autograd(_backward, setup_context=_setup_context)


def _triton_loss(features, anchors, labels, metric, scale, pull, softmax):
    return torch.ops.ppml.anchor_loss_triton(features, anchors, labels, metric, scale, pull, softmax)[0]


def _native_loss(features, anchors, labels, metric, scale, pull, softmax):
    return torch.ops.ppml.anchor_loss(features, anchors, labels, metric, scale, pull, softmax)[0]


def _reference_backend(features, anchors, labels, metric, scale, pull, softmax):
    if not torch.compiler.is_compiling():
        _check_labels(labels, anchors.shape[0])
    return _reference_loss(features, anchors, labels, metric, scale, pull, softmax)


_dispatch.register("anchor_loss", native=_native_loss, triton=_triton_loss, reference=_reference_backend)


class _EagerAnchorLoss(torch.autograd.Function):
    """The public function's training path in eager mode: the op's kernel and the reduction in one autograd node.

    Same kernel, same formulas as the op's registered autograd (both end in ``_scale_rows``), the same roundings (the
    mean's gradient is ``grad_out / B``, then one product per row, as MeanBackward and ``_backward`` give), but at
    small sizes the call is bound by the host, and torch.library's generic autograd wrapper costs more than the kernel
    there (re-reading the schema on every call, a redispatch through Python, a second node for the mean). Here the
    kernel is called below autograd directly and backward is one product. torch.compile traces the registered op
    instead.
    """

    @staticmethod
    def forward(ctx, features, anchors, labels, params, kernel):
        # params: (metric, scale, pull, softmax, reduction), one argument for apply() to walk instead of five
        with torch._C._AutoDispatchBelowAutograd():
            loss, grad = kernel(features, anchors, labels, *params[:4])
        ctx.save_for_backward(grad)
        ctx.reduction = params[4]
        if ctx.reduction == "mean":
            # On CPU, ATen's mean of a float32/float64 tensor is this very sum and division (ReduceOps.cpp, mean_out),
            # at a fifth of its host cost (~5 µs at B = 4, more than the kernel); elsewhere, mean itself.
            return loss.sum().div_(loss.shape[0]) if loss.is_cpu else loss.mean()
        return loss.sum() if ctx.reduction == "sum" else loss

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "mean":
            grad_out = grad_out / grad.shape[0]
        elif ctx.reduction == "none":
            grad_out = grad_out[:, None]
        return _scale_rows(grad, grad_out), None, None, None, None


# Backends whose kernel returns (loss, d loss / d features): the ones _EagerAnchorLoss can call.
_FUSED_KERNELS = {"native": torch.ops.ppml.anchor_loss.default, "triton": torch.ops.ppml.anchor_loss_triton.default}


# ---- public API --------------------------------------------------------------------------------------------------


def anchor_loss(
    features: Tensor,
    anchors: Tensor,
    labels: Tensor,
    *,
    metric: str = "sqeuclidean",
    scale: float = 1.0,
    pull: float = 0.0,
    softmax: bool = True,
    reduction: str = "mean",
    backend: str | None = None,
) -> Tensor:
    """Anchor-distance loss (fixed class-centre anchors).

    Logits z_c = −(γ/2)‖f − a_c‖² (``sqeuclidean``), −γ‖f − a_c‖ (``euclidean``) or γ·cos(f, a_c) (``cosine``), γ =
    ``scale``; loss = cross-entropy of softmax(z) (when ``softmax``) + ``pull``·ρ(f, a_y), ρ = ½‖f − a_y‖² (Euclidean
    metrics) or 1 − cos(f, a_y) (cosine). With equal-norm anchors and no pull, ``sqeuclidean`` equals cross-entropy
    with a frozen linear layer γA: add ``pull`` or use ``euclidean`` to draw features to their anchor.

    Args:
        features (Tensor[B, D]): float16, bfloat16, float32 or float64 (accumulated in float32; float64 stays).
        anchors (Tensor[C, D]): fixed, e.g. from :func:`ppml.make_anchors`; no gradient flows to them.
        labels (Tensor[B] int64): in [0, C).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``[B]``).
        backend: ``None``/``"auto"``, ``"native"`` or ``"reference"`` (default: ``PPML_BACKEND``).

    Returns:
        The loss, float32 (float64 for float64 features). Differentiable in ``features``.

    Precision on CUDA (native backend). The logits' dot products f·a_c run on tensor cores where torch's own matmul
    would: bfloat16/float16 features as a bfloat16/float16 GEMM with float32 accumulation (the anchors rounded once to
    the features' dtype), float32 features as TF32 when ``torch.backends.cuda.matmul.allow_tf32`` (or
    ``torch.set_float32_matmul_precision``) allows it and exact float32 otherwise; float64 stays float64. Everything
    else — ‖a_c‖², ‖f‖², ‖f − a_y‖² from the difference vector, the log-sum-exp, the pull term — is float32 on the
    unrounded inputs. With u the unit roundoff of the GEMM's inputs (TF32 2⁻¹⁰, allowing for truncation; bfloat16
    2⁻⁸; float16 2⁻¹¹; exact float32 D·2⁻²⁴), each logit of row i is off by at most δ_i = 2u·γ·‖f_i‖·max_c‖a_c‖
    (``sqeuclidean``), max_{c≠y} 2u·γ·‖f_i‖‖a_c‖/‖f_i − a_c‖ (``euclidean``; the true class is exact) or 2u·γ
    (``cosine``); the loss by at most 2δ_i, and the gradient row, in ℓ2, by ((e^{2δ_i} − 1) + 4u)·S_i with S_i =
    γ·(max_c‖a_c‖ + ‖f_i‖) (``sqeuclidean``), γ·max_c (‖a_c‖ + ‖f_i‖)/‖f_i − a_c‖ (``euclidean``) or γ/‖f_i‖
    (``cosine``), plus float32's rounding and, for half features, the gradient's rounding to their dtype
    (tests/test_anchor_loss_cuda.py checks these bounds against the float64 reference). For the squared metric at
    γ‖f‖·max‖a‖ ≈ 10 that is a loss within about 0.02 under TF32 and 0.08 under bfloat16, as torch's own TF32 and
    autocast matmuls give.
    """
    _check(features, anchors, labels, metric, scale, pull, softmax)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{OP}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    name, fn = _dispatch.choose("anchor_loss", features.device, backend)
    if name in _FUSED_KERNELS and features.requires_grad and torch.is_grad_enabled():
        if not torch.compiler.is_compiling():
            params = (metric, float(scale), float(pull), bool(softmax), reduction)
            return _EagerAnchorLoss.apply(features, anchors, labels, params, _FUSED_KERNELS[name])
    loss = fn(features, anchors, labels, metric, float(scale), float(pull), bool(softmax))
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def nearest_anchor(features: Tensor, anchors: Tensor, metric: str = "sqeuclidean") -> Tensor:
    """Prediction: the index of each feature's nearest anchor under `metric` (Tensor[B] int64)."""
    if metric not in METRICS:
        raise ValueError(f"ppml.nearest_anchor: metric must be one of {', '.join(map(repr, METRICS))}, got {metric!r}")
    acc = accumulation_dtype(features.dtype)
    return anchor_logits(features.detach().to(acc), anchors.to(acc), metric, 1.0).argmax(1)


class AnchorLoss(nn.Module):
    """The anchor loss as a module holding its fixed anchors as a buffer (saved in state_dict, never trained).

    ``loss = AnchorLoss(10, 64, kind="simplex")(features, labels)``; ``.predict(features)`` = nearest anchor.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        kind: str = "simplex",
        radius: float = 1.0,
        metric: str = "sqeuclidean",
        scale: float = 1.0,
        pull: float = 0.0,
        softmax: bool = True,
        reduction: str = "mean",
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("anchors", make_anchors(num_classes, dim, kind, radius, generator=generator))
        self.kind, self.metric, self.scale, self.pull = kind, metric, scale, pull
        self.softmax, self.reduction, self.backend = softmax, reduction, backend
        _check(torch.empty(0, dim), self.anchors, torch.empty(0, dtype=torch.int64), metric, scale, pull, softmax,
               op="ppml.AnchorLoss")

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return anchor_loss(
            features,
            self.anchors.to(features.device),
            labels,
            metric=self.metric,
            scale=self.scale,
            pull=self.pull,
            softmax=self.softmax,
            reduction=self.reduction,
            backend=self.backend,
        )

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        return nearest_anchor(features, self.anchors.to(features.device), self.metric)

    def extra_repr(self) -> str:
        C, D = self.anchors.shape
        return f"classes={C}, dim={D}, kind={self.kind!r}, metric={self.metric!r}, scale={self.scale}, pull={self.pull}"
