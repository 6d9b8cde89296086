"""Object detection on encrypted images: a YOLOS-style ViT detector, COCO-format data, pycocotools evaluation.

- :func:`build_detector` / :class:`YOLOS`: a timm ViT (``vit_*`` plain, ``mivit_*`` MI, ``pevit_*`` RS) with learnable
  detection tokens and MLP heads — boxes (YOLOS) or, for RS, per-token membership that the owner decodes to boxes
  with the keys (:func:`membership_to_boxes`); the box head on plain / MI gets a spatial prior by default
  (``det_prior="gaussian"``: reference points and a distance bias on the [DET] attention) so it trains from scratch.
- :class:`HungarianMatcher`, :class:`SetCriterion`: DETR's matching and loss (CE with a no-object weight, L1, GIoU).
- :class:`CocoDetection`, :func:`resolve_coco`, :func:`prepare_image`, :class:`Augment`, :class:`Owner`: data,
  DETR-style augmentation on the owner's side, encryption and decoding.
- :func:`make_synthetic_coco`: the built-in data (shapes on scikit-image photos), offline and deterministic.
- :func:`train`, :func:`evaluate_run`, :func:`coco_evaluate`, :class:`DetectConfig`: ``ppml detect train|eval``.

Needs timm, scipy and pycocotools (and scikit-image for the built-in data).
"""

from .boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
)
from .data import Augment, CocoDetection, Owner, prepare_image, resolve_coco
from .engine import AP_NAMES, DetectConfig, coco_evaluate, evaluate, evaluate_run, train
from .losses import SetCriterion
from .matcher import HungarianMatcher, linear_assignment, pairwise_mask_costs
from .model import (
    PRIORS,
    YOLOS,
    build_detector,
    default_backbone,
    default_det_prior,
    membership_targets,
    membership_to_boxes,
)
from .synthetic import make_synthetic_coco

__all__ = [
    "AP_NAMES",
    "Augment",
    "CocoDetection",
    "DetectConfig",
    "HungarianMatcher",
    "Owner",
    "PRIORS",
    "SetCriterion",
    "YOLOS",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "build_detector",
    "coco_evaluate",
    "default_backbone",
    "default_det_prior",
    "evaluate",
    "evaluate_run",
    "generalized_box_iou",
    "linear_assignment",
    "make_synthetic_coco",
    "membership_targets",
    "membership_to_boxes",
    "pairwise_mask_costs",
    "prepare_image",
    "resolve_coco",
    "train",
]
