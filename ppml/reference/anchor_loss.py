"""Plain PyTorch anchor-distance losses: the test oracle (run it in float64), the fallback kernel, a baseline."""

from __future__ import annotations

import torch

from .._constants import COS_EPS, DIST2_EPS  # noqa: F401  (re-exported: ops and tests import them from here)

METRICS = ("sqeuclidean", "euclidean", "cosine")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)


def anchor_logits(features: torch.Tensor, anchors: torch.Tensor, metric: str, scale: float) -> torch.Tensor:
    """z[b, c]: −(γ/2)‖f − a_c‖² (sqeuclidean), −γ‖f − a_c‖ (euclidean), γ·cos(f, a_c) (cosine). Shape [B, C]."""
    if metric == "cosine":
        return scale * (_normalize(features) @ _normalize(anchors).T)
    d2 = (features.square().sum(1, keepdim=True) - 2 * features @ anchors.T + anchors.square().sum(1)).clamp_min(0)
    if metric == "sqeuclidean":
        return -0.5 * scale * d2
    return -scale * d2.clamp_min(DIST2_EPS).sqrt()


def anchor_loss(
    features: torch.Tensor,
    anchors: torch.Tensor,
    labels: torch.Tensor,
    metric: str = "sqeuclidean",
    scale: float = 1.0,
    pull: float = 0.0,
    softmax: bool = True,
) -> torch.Tensor:
    """Per-sample anchor loss: softmax cross-entropy over the anchor logits (when ``softmax``) + pull·ρ(f, a_y), with
    ρ = ½‖f − a_y‖² for the Euclidean metrics and 1 − cos(f, a_y) for cosine.

    Distances that matter near the anchor — the true class's in the non-squared metric, and ρ — come from the
    difference vector f − a_y (the expanded form ‖f‖² − 2f·a + ‖a‖² loses precision there); the squared metric's
    softmax drops the ‖f‖² row constant, which cancels exactly. Computed in float32 (float64 for float64 features);
    differentiable in ``features``.

    Args:
        features (Tensor[B, D]), anchors (Tensor[C, D]), labels (Tensor[B] int64 in [0, C)).

    Returns:
        Tensor[B], float32 (float64 for float64 features).
    """
    acc = accumulation_dtype(features.dtype)
    f, a = features.to(acc), anchors.to(acc)
    ay = a[labels]
    loss = torch.zeros(f.shape[0], dtype=acc, device=f.device)
    if softmax and metric == "sqeuclidean":
        # −(γ/2)‖f − a_c‖² = u_c − (γ/2)‖f‖² with u_c = γ f·a_c − (γ/2)‖a_c‖²: the row constant cancels exactly in
        # lse(z) − z_y, so the loss is lse(u) − u_y. Keeping ‖f‖² would leave f·(1 − Σ_c p_c) in the gradient: zero in
        # exact arithmetic, float32 noise along f in practice, which Adam amplifies until the features blow up.
        u = scale * (f @ a.T) - 0.5 * scale * a.square().sum(1)
        loss = loss + (torch.logsumexp(u, dim=1) - u.gather(1, labels[:, None])[:, 0])
    elif softmax:
        z = anchor_logits(f, a, metric, scale)
        if metric == "euclidean":
            dy2 = (f - ay).square().sum(1)
            zy = -scale * dy2.clamp_min(DIST2_EPS).sqrt()
            z = z.scatter(1, labels[:, None], zy[:, None])
        else:
            zy = z.gather(1, labels[:, None])[:, 0]
        loss = loss + (torch.logsumexp(z, dim=1) - zy)
    if pull:
        if metric == "cosine":
            rho = 1 - (_normalize(f) * _normalize(ay)).sum(1)
        else:
            rho = 0.5 * (f - ay).square().sum(1)
        loss = loss + pull * rho
    return loss


def nearest_anchor(features: torch.Tensor, anchors: torch.Tensor, metric: str = "sqeuclidean") -> torch.Tensor:
    """Index of the nearest anchor per sample (largest logit), Tensor[B] int64."""
    acc = accumulation_dtype(features.dtype)
    return anchor_logits(features.to(acc), anchors.to(acc), metric, 1.0).argmax(1)
