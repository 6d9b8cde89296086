"""Box utilities: conversions, areas, IoU and generalized IoU (Rezatofighi et al., 2019).

Boxes are ``xyxy`` (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 unless a name says ``cxcywh`` (centre, width,
height) or ``xywh`` (COCO: top-left corner, width, height). All functions are differentiable and work in any float
dtype on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import describe


def _check_boxes(boxes, where: str, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{where}: {name} must be a float tensor [..., 4], got {describe(boxes)}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) → (x0, y0, x1, y1)."""
    _check_boxes(boxes, "ppml.detection.box_cxcywh_to_xyxy")
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) → (cx, cy, w, h)."""
    _check_boxes(boxes, "ppml.detection.box_xyxy_to_cxcywh")
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``[..., 4]`` (x, y, w, h) → (x0, y0, x1, y1)."""
    _check_boxes(boxes, "ppml.detection.box_xywh_to_xyxy")
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy → ``[...]`` areas (negative extents count as 0)."""
    _check_boxes(boxes, "ppml.detection.box_area")
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _iou_parts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Broadcast ``a`` and ``b`` (xyxy) against each other: (IoU, union, area of the smallest enclosing box)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    iou = inter / union
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    return iou, union, hull[..., 0] * hull[..., 1]


def _check_pair(a, b, where: str) -> None:
    _check_boxes(a, where, "boxes1")
    _check_boxes(b, where, "boxes2")
    # degenerate (inverted) boxes make GIoU meaningless and usually mean a cxcywh/xyxy mix-up
    for name, t in (("boxes1", a), ("boxes2", b)):
        if t.numel() and bool((t[..., 2:] < t[..., :2]).any()):
            raise ValueError(f"{where}: {name} must be xyxy with x1 >= x0 and y1 >= y0, got an inverted box")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): xyxy.

    Returns:
        Tensor[N, M]. 0/0 (two empty boxes) gives NaN, as in torchvision.
    """
    where = "ppml.detection.box_iou"
    _check_pair(boxes1, boxes2, where)
    return _iou_parts(boxes1[:, None, :], boxes2[None, :, :])[0]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, *, pairwise: bool = True) -> Tensor:
    """Generalized IoU: ``IoU − (|C| − |A ∪ B|) / |C|`` with C the smallest box enclosing A and B; in [−1, 1].

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): xyxy.
        pairwise: True (default) → Tensor[N, M] over all pairs (what ``torchvision.ops.generalized_box_iou``
            computes); False → Tensor[N], boxes1[i] against boxes2[i] (needs N == M), the loss's form.

    Gradients flow to both inputs.
    """
    where = "ppml.detection.generalized_box_iou"
    _check_pair(boxes1, boxes2, where)
    if pairwise:
        a, b = boxes1[:, None, :], boxes2[None, :, :]
    else:
        if boxes1.shape != boxes2.shape:
            raise ValueError(
                f"{where}: with pairwise=False boxes1 and boxes2 must have the same shape, got "
                f"{describe(boxes1)} and {describe(boxes2)}"
            )
        a, b = boxes1, boxes2
    iou, union, hull = _iou_parts(a, b)
    return iou - (hull - union) / hull
