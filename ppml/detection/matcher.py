"""Hungarian matching of predictions to ground-truth objects (DETR / YOLOS) with
``scipy.optimize.linear_sum_assignment``.

Two cost families, chosen by what the model predicts:

- boxes (``pred_boxes``): ``cost_class · (−p[class]) + cost_bbox · L1(cxcywh) + cost_giou · (−GIoU)``;
- patch membership (``pred_masks``, the RS head): ``cost_class · (−p[class]) + cost_mask · BCE + cost_dice · dice``,
  both over the tokens, so the cost does not depend on the token order (the trainer never needs the RS key).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import describe
from .boxes import box_cxcywh_to_xyxy, generalized_box_iou


def linear_assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
    """The minimum-cost assignment of rows to columns (each used at most once; min(Q, K) pairs).

    Args:
        cost (Tensor[Q, K]): finite costs, any float dtype and device.

    Returns:
        (rows, cols): int64 Tensor[min(Q, K)] each, on the CPU, rows ascending; ``cost[rows, cols].sum()`` is minimal.
    """
    from scipy.optimize import linear_sum_assignment

    if not isinstance(cost, Tensor) or cost.dim() != 2 or not cost.is_floating_point():
        raise ValueError(f"ppml.detection.linear_assignment: cost must be a float tensor [Q, K], got {describe(cost)}")
    c = cost.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(c).all()):
        raise ValueError("ppml.detection.linear_assignment: cost must be finite, got NaN or inf entries")
    rows, cols = linear_sum_assignment(c.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def pairwise_mask_costs(logits: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Mean binary cross-entropy and dice loss of every predicted mask against every target mask.

    Args:
        logits (Tensor[Q, N]): predicted membership logits over N tokens.
        masks (Tensor[K, N]): target memberships in [0, 1].

    Returns:
        (bce, dice): Tensor[Q, K] each; ``bce[q, k]`` equals
        ``F.binary_cross_entropy_with_logits(logits[q], masks[k])`` and ``dice[q, k]`` the dice loss
        ``1 − (2·Σσ·t + 1) / (Σσ + Σt + 1)``.
    """
    x, t = logits.float(), masks.float()
    n = max(x.shape[-1], 1)
    bce = (F.softplus(-x) @ t.T + F.softplus(x) @ (1 - t).T) / n
    s = x.sigmoid()
    dice = 1 - (2 * s @ t.T + 1) / (s.sum(-1)[:, None] + t.sum(-1)[None, :] + 1)
    return bce, dice


class HungarianMatcher(nn.Module):
    """One-to-one matching of the model's Q slots to each image's K objects (unmatched slots learn "no object").

    Args:
        cost_class: weight of −p(target class) (softmax over classes + no-object).
        cost_bbox: weight of the L1 distance between cxcywh boxes (box head).
        cost_giou: weight of −GIoU (box head).
        cost_mask: weight of the mean BCE between membership masks (membership head).
        cost_dice: weight of the dice loss between membership masks (membership head).

    Call with ``outputs`` (``pred_logits`` [B, Q, C+1] and ``pred_boxes`` [B, Q, 4] cxcywh in [0, 1], or
    ``pred_masks`` [B, Q, N] logits) and ``targets`` (one dict per image with ``labels`` [K] int64 and ``boxes``
    [K, 4] cxcywh, or ``masks`` [K, N]). Returns one ``(pred_idx, target_idx)`` pair of int64 CPU tensors per image.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 2.0,
    ) -> None:
        super().__init__()
        costs = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, cost_mask=cost_mask,
                     cost_dice=cost_dice)
        for name, v in costs.items():
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"ppml.detection.HungarianMatcher: {name} must be a number >= 0, got {v!r}")
        self.cost_class, self.cost_bbox, self.cost_giou = float(cost_class), float(cost_bbox), float(cost_giou)
        self.cost_mask, self.cost_dice = float(cost_mask), float(cost_dice)

    def cost_matrix(self, outputs: dict[str, Tensor], b: int, target: dict[str, Tensor]) -> Tensor:
        """The [Q, K] cost of image ``b`` of the batch."""
        prob = outputs["pred_logits"][b].float().softmax(-1)
        labels = target["labels"]
        cost = -prob[:, labels] * self.cost_class
        if "pred_masks" in outputs:
            bce, dice = pairwise_mask_costs(outputs["pred_masks"][b], target["masks"])
            return cost + self.cost_mask * bce + self.cost_dice * dice
        pred, tgt = outputs["pred_boxes"][b].float(), target["boxes"].float()
        cost = cost + self.cost_bbox * torch.cdist(pred, tgt, p=1)
        return cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt))

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        logits = outputs.get("pred_logits")
        if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[0] != len(targets):
            raise ValueError(
                f"ppml.detection.HungarianMatcher: outputs['pred_logits'] must be [B, Q, C+1] with B={len(targets)} "
                f"(one target dict per image), got {describe(logits)}"
            )
        out = []
        for b, target in enumerate(targets):
            if target["labels"].numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            out.append(linear_assignment(self.cost_matrix(outputs, b, target)))
        return out
