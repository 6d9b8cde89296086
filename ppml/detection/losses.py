"""The set loss of DETR / YOLOS: Hungarian matching, then cross-entropy with a down-weighted "no object" class and,
on the matched pairs, L1 + GIoU on boxes (box head) or BCE + dice on patch memberships and L1 on in-patch extents
(membership head, the RS variant)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import HungarianMatcher


def _num_objects(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    """Objects per process, averaged over the DDP world (DETR's normaliser), at least 1."""
    n = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n /= dist.get_world_size()
    return max(float(n.item()), 1.0)


class SetCriterion(nn.Module):
    """Loss of a set-prediction detector.

    Args:
        num_classes: C object classes; the logits have C + 1 entries, the last one is "no object".
        matcher: the :class:`HungarianMatcher` (default: one with DETR's costs 1 / 5 / 2).
        eos_coef: weight of the "no object" class in the cross-entropy (DETR: 0.1).
        weight_ce, weight_bbox, weight_giou: weights of CE, L1 and 1 − GIoU (box head; DETR: 1 / 5 / 2).
        weight_mask, weight_dice, weight_extent: weights of membership BCE, dice and the L1 on in-patch extents
            (membership head).

    Call with the model's ``outputs`` and the ``targets`` the matcher takes; returns a dict with each term
    (``loss_ce``, ``loss_bbox``, ``loss_giou`` or ``loss_mask``, ``loss_dice``, ``loss_extent``) and their weighted
    sum ``loss``. Box and mask terms are sums over matched objects divided by the number of objects per process.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        *,
        eos_coef: float = 0.1,
        weight_ce: float = 1.0,
        weight_bbox: float = 5.0,
        weight_giou: float = 2.0,
        weight_mask: float = 5.0,
        weight_dice: float = 2.0,
        weight_extent: float = 5.0,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ppml.detection.SetCriterion: num_classes must be an int >= 1, got {num_classes!r}")
        if not 0 < eos_coef <= 1:
            raise ValueError(f"ppml.detection.SetCriterion: eos_coef must be in (0, 1], got {eos_coef!r}")
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.weights = dict(loss_ce=weight_ce, loss_bbox=weight_bbox, loss_giou=weight_giou, loss_mask=weight_mask,
                            loss_dice=weight_dice, loss_extent=weight_extent)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"ppml.detection.SetCriterion: pred_logits must end in num_classes + 1 = {self.num_classes + 1} "
                f"(the last is 'no object'), got {list(logits.shape)}"
            )
        matches = self.matcher(outputs, targets)
        batch_idx = torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(matches)]).to(logits.device)
        pred_idx = torch.cat([p for p, _ in matches]).to(logits.device)
        n_obj = _num_objects(targets, logits.device)

        def matched(key: str) -> Tensor:  # the matched targets' `key`, in the order of (batch_idx, pred_idx)
            return torch.cat([t[key][j] for t, (_, j) in zip(targets, matches, strict=True)])

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, pred_idx] = matched("labels")
        losses = {"loss_ce": F.cross_entropy(logits.float().transpose(1, 2), target_classes, self.empty_weight)}
        if "pred_masks" in outputs:
            pred = outputs["pred_masks"][batch_idx, pred_idx].float()  # [M, N]
            tgt = matched("masks").float()
            losses["loss_mask"] = F.binary_cross_entropy_with_logits(pred, tgt, reduction="none").mean(1).sum() / n_obj
            s = pred.sigmoid()
            dice = 1 - (2 * (s * tgt).sum(1) + 1) / (s.sum(1) + tgt.sum(1) + 1)
            losses["loss_dice"] = dice.sum() / n_obj
            ext = outputs["pred_extents"][batch_idx, pred_idx].float()  # [M, N, 4]
            text = matched("extents").float()
            per_obj = ((ext - text).abs().sum(-1) * tgt).sum(1) / tgt.sum(1).clamp(min=1)
            losses["loss_extent"] = per_obj.sum() / n_obj
        else:
            pred = outputs["pred_boxes"][batch_idx, pred_idx].float()  # [M, 4] cxcywh
            tgt = matched("boxes").float()
            losses["loss_bbox"] = F.l1_loss(pred, tgt, reduction="sum") / n_obj
            giou = generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt), pairwise=False)
            losses["loss_giou"] = (1 - giou).sum() / n_obj
        losses["loss"] = sum(self.weights[k] * v for k, v in losses.items())
        return losses
