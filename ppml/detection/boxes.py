"""Box utilities: conversions, areas, IoU and generalized IoU (Rezatofighi et al., 2019).

Boxes are ``xyxy`` (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 unless a name says ``cxcywh`` (centre, width,
height) or ``xywh`` (COCO: top-left corner, width, height). All functions are differentiable and work in any float
dtype on any device.

The conversions, the IoU and the pairwise GIoU are ``torchvision.ops`` (``box_convert``, ``box_iou``,
``generalized_box_iou``); this module keeps ppml's names, its input checks and errors, the inputs' dtype in the
result (torchvision computes half-precision IoUs in float32), :func:`box_area`, whose negative extents count as 0
(torchvision's multiplies them), and the elementwise GIoU the set loss uses (see :func:`generalized_box_iou`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import describe


def _tv_ops():
    # imported on first use: `import ppml.detection` (and so `ppml --help`) must not need torchvision
    try:
        import torchvision.ops as ops
    except ModuleNotFoundError as e:
        raise ImportError(f'ppml.detection box ops need torchvision, which is not installed ({e}): '
                          'pip install "ppml[detect]"') from e
    return ops


def _check_boxes(boxes, where: str, name: str = "boxes") -> None:
    if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.shape[-1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{where}: {name} must be a float tensor [..., 4], got {describe(boxes)}")


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) → (x0, y0, x1, y1)."""
    _check_boxes(boxes, "ppml.detection.box_cxcywh_to_xyxy")
    return _tv_ops().box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) → (cx, cy, w, h)."""
    _check_boxes(boxes, "ppml.detection.box_xyxy_to_cxcywh")
    return _tv_ops().box_convert(boxes, "xyxy", "cxcywh")


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO ``[..., 4]`` (x, y, w, h) → (x0, y0, x1, y1)."""
    _check_boxes(boxes, "ppml.detection.box_xywh_to_xyxy")
    return _tv_ops().box_convert(boxes, "xywh", "xyxy")


def box_area(boxes: Tensor) -> Tensor:
    """``[..., 4]`` xyxy → ``[...]`` areas (negative extents count as 0)."""
    _check_boxes(boxes, "ppml.detection.box_area")
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _check_pair(a, b, where: str, pairwise: bool = True) -> None:
    _check_boxes(a, where, "boxes1")
    _check_boxes(b, where, "boxes2")
    if pairwise:
        # torchvision 0.26 takes [N, 4] only, later versions also [..., N, 4]: accept what all of them take alike
        for name, t in (("boxes1", a), ("boxes2", b)):
            if t.dim() != 2:
                raise ValueError(f"{where}: {name} must be a float tensor [N, 4], got {describe(t)}")
    # degenerate (inverted) boxes make GIoU meaningless and usually mean a cxcywh/xyxy mix-up
    for name, t in (("boxes1", a), ("boxes2", b)):
        if t.numel() and bool((t[..., 2:] < t[..., :2]).any()):
            raise ValueError(f"{where}: {name} must be xyxy with x1 >= x0 and y1 >= y0, got an inverted box")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU.

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): xyxy.

    Returns:
        Tensor[N, M] in the promoted dtype of the inputs. 0/0 (two empty boxes) gives NaN, as in torchvision.
    """
    _check_pair(boxes1, boxes2, "ppml.detection.box_iou")
    # torchvision upcasts float16/bfloat16 to float32 before multiplying; the result keeps the inputs' dtype
    return _tv_ops().box_iou(boxes1, boxes2).to(torch.promote_types(boxes1.dtype, boxes2.dtype))


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, *, pairwise: bool = True) -> Tensor:
    """Generalized IoU: ``IoU − (|C| − |A ∪ B|) / |C|`` with C the smallest box enclosing A and B; in [−1, 1].

    Args:
        boxes1 (Tensor[N, 4]), boxes2 (Tensor[M, 4]): xyxy.
        pairwise: True (default) → Tensor[N, M] over all pairs (``torchvision.ops.generalized_box_iou``);
            False → Tensor[N], boxes1[i] against boxes2[i] (needs equal shapes ``[..., 4]``), the loss's form.

    Gradients flow to both inputs.
    """
    where = "ppml.detection.generalized_box_iou"
    _check_pair(boxes1, boxes2, where, pairwise)
    if pairwise:
        return _tv_ops().generalized_box_iou(boxes1, boxes2).to(torch.promote_types(boxes1.dtype, boxes2.dtype))
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"{where}: with pairwise=False boxes1 and boxes2 must have the same shape, got "
            f"{describe(boxes1)} and {describe(boxes2)}"
        )
    # torchvision's elementwise form is generalized_box_iou_loss: it adds eps=1e-7 to the divisors and masks the
    # intersection with boolean indexing (a host sync on CUDA; about 2x slower here on the CPU), so it stays here
    a, b = boxes1, boxes2
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull_area = hull[..., 0] * hull[..., 1]
    return inter / union - (hull_area - union) / hull_area
