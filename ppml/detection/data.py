"""COCO-format detection data, DETR-style augmentation and the data owner's encryption.

The owner holds the plain images and their boxes. For every batch it augments the plain images (DETR's recipe:
horizontal flip, a random crop half of the time, a random rescale), pads them onto a square canvas, encrypts the
canvas (RS: a fresh key per image; MI: keyless mixing) and hands the trainer the ciphertext with the targets the
trainer's loss needs (:class:`Owner`). The owner keeps the RS keys; at evaluation it turns the model's per-token
predictions back into boxes with them (:meth:`Owner.detections`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_probability, describe
from .boxes import box_cxcywh_to_xyxy, box_xywh_to_xyxy, box_xyxy_to_cxcywh
from .model import ENCRYPTIONS, HEADS, membership_targets, membership_to_boxes

_WHERE = "ppml.detection"
# ImageNet statistics (timm's IMAGENET_DEFAULT_MEAN / STD), as DETR and YOLOS normalise.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def resolve_coco(root: str, split: str) -> tuple[str, str]:
    """Finds a split of a COCO-layout folder: ``ROOT/<split>/`` with ``ROOT/annotations/instances_<split>.json``,
    also trying ``<split>2017`` (``train`` finds COCO 2017's ``train2017``).

    Returns:
        (images folder, annotation file).
    """
    tried = []
    for name in (split, f"{split}2017"):
        images, ann = os.path.join(root, name), os.path.join(root, "annotations", f"instances_{name}.json")
        if os.path.isdir(images) and os.path.isfile(ann):
            return images, ann
        tried.append(f"{images}/ + {ann}")
    raise FileNotFoundError(f"{_WHERE}.resolve_coco: no COCO split {split!r} under {root!r}; looked for "
                            f"{' or '.join(tried)}")


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO instances file, with their boxes (crowd annotations and empty boxes are left out, as DETR
    does). Every image of the file is an item, also one without objects.

    Args:
        images_dir: folder of the images (``file_name`` is relative to it).
        ann_file: the ``instances_*.json``.
        categories: the category list to use (``[{"id", "name"}, ...]``, label = position); default: the file's,
            sorted by id. Pass the training split's to evaluate another split with the same labels.
        cache: keep decoded images in memory (small sets such as the built-in one).

    Items: ``(image, target)`` — image uint8 Tensor[3, h, w] (RGB); target dict with ``boxes`` float32 Tensor[K, 4]
    (xyxy, pixels), ``labels`` int64 Tensor[K], ``image_id`` int, ``orig_size`` (h, w).
    """

    def __init__(self, images_dir: str, ann_file: str, *, categories: list[dict] | None = None,
                 cache: bool = False) -> None:
        where = f"{_WHERE}.CocoDetection"
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"{where}: ann_file {ann_file!r} does not exist")
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(f"{where}: images_dir {images_dir!r} is not a directory")
        with open(ann_file) as fh:
            coco = json.load(fh)
        missing = [k for k in ("images", "annotations", "categories") if k not in coco]
        if missing:
            raise ValueError(f"{where}: {ann_file!r} is not a COCO instances file: it lacks {missing}")
        self.images_dir, self.ann_file, self.cache = images_dir, ann_file, cache
        cats = categories if categories is not None else sorted(coco["categories"], key=lambda c: c["id"])
        self.categories = [{"id": int(c["id"]), "name": c["name"]} for c in cats]
        self.label_of = {c["id"]: i for i, c in enumerate(self.categories)}
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        index = {im["id"]: i for i, im in enumerate(self.images)}
        self._anns: list[list[dict]] = [[] for _ in self.images]
        for a in coco["annotations"]:
            if a.get("iscrowd", 0) or a["image_id"] not in index:
                continue
            if a["category_id"] not in self.label_of:
                raise ValueError(f"{where}: annotation {a.get('id')} has category_id {a['category_id']}, which is not "
                                 f"among the categories {sorted(self.label_of)}")
            im = self.images[index[a["image_id"]]]
            x0, y0, x1, y1 = box_xywh_to_xyxy(torch.tensor(a["bbox"], dtype=torch.float64)).tolist()
            x0, x1 = min(max(x0, 0.0), im["width"]), min(max(x1, 0.0), im["width"])
            y0, y1 = min(max(y0, 0.0), im["height"]), min(max(y1, 0.0), im["height"])
            if x1 > x0 and y1 > y0:
                self._anns[index[a["image_id"]]].append(
                    {"id": a.get("id"), "bbox": [x0, y0, x1, y1], "category_id": a["category_id"],
                     "area": a.get("area", (x1 - x0) * (y1 - y0))})
        self._cached: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def load_image(self, i: int) -> Tensor:
        """Image ``i`` as uint8 Tensor[3, h, w] (RGB, EXIF orientation ignored as in pycocotools' sizes)."""
        if i in self._cached:
            return self._cached[i]
        from PIL import Image

        info = self.images[i]
        path = os.path.join(self.images_dir, info["file_name"])
        with Image.open(path) as im:
            arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
            img = arr.view(im.height, im.width, 3).permute(2, 0, 1).contiguous()
        if tuple(img.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(f"{_WHERE}.CocoDetection: {path!r} is {img.shape[2]}x{img.shape[1]} but the annotation "
                             f"file says {info['width']}x{info['height']}")
        if self.cache:
            self._cached[i] = img
        return img

    def target(self, i: int) -> dict:
        anns, info = self._anns[i], self.images[i]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        return {"boxes": boxes, "labels": labels, "image_id": int(info["id"]),
                "orig_size": (int(info["height"]), int(info["width"]))}

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        return self.load_image(i), self.target(i)

    def coco_dict(self) -> dict:
        """The loaded data as a COCO instances dict (images, the kept annotations with xywh boxes, categories)."""
        anns = []
        for i, info in enumerate(self.images):
            for a in self._anns[i]:
                x0, y0, x1, y1 = a["bbox"]
                anns.append({"id": a["id"], "image_id": info["id"], "category_id": a["category_id"],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a["area"], "iscrowd": 0})
        return {"images": [dict(im) for im in self.images], "annotations": anns,
                "categories": [dict(c) for c in self.categories]}


@dataclass
class Augment:
    """DETR's training augmentation at a fixed canvas (the plain side, before encryption).

    Attributes:
        hflip: probability of a horizontal flip.
        crop: probability of a random crop (DETR: 0.5, its RandomSelect), whose sides are uniform in
            [crop_min, 1] of the image's.
        crop_min: the smallest crop side, as a fraction.
        scale_min: the longer side is resized to a uniform fraction in [scale_min, 1] of the canvas (DETR's
            multi-scale 480..800 of 800 is 0.6..1).
    """

    hflip: float = 0.5
    crop: float = 0.5
    crop_min: float = 0.5
    scale_min: float = 0.6

    def check(self) -> None:
        for name in ("hflip", "crop"):
            check_probability(getattr(self, name), f"{_WHERE}.Augment", name)
        for name in ("crop_min", "scale_min"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{_WHERE}.Augment: {name} must be in (0, 1], got {v!r}")


def _uniform(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def prepare_image(
    image: Tensor, target: dict, size: int, *, augment: Augment | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, dict]:
    """The owner's plain-side pipeline for one image: (augment), resize the longer side, normalise, pad.

    Args:
        image (Tensor[3, h, w] uint8): the plain image.
        target: ``boxes`` (xyxy pixels) and ``labels`` as :class:`CocoDetection` yields them (plus any other keys).
        size: S, the square canvas side.
        augment: DETR-style training augmentation, or None (evaluation: resize so the longer side is S).
        generator: every random draw of the augmentation.

    Returns:
        (canvas, target): float32 Tensor[3, S, S] (ImageNet-normalised, zero padding right and bottom) and a copy of
        the target with ``boxes`` as cxcywh in [0, 1] of the canvas and ``scale`` = (sx, sy), the canvas pixels per
        original pixel (for mapping predictions back; meaningful without augmentation).
    """
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"{_WHERE}.prepare_image: image must be uint8 [3, h, w], got {describe(image)}")
    boxes, labels = target["boxes"].to(torch.float32).reshape(-1, 4), target["labels"]
    img = image.float()
    h, w = img.shape[1:]
    if augment is not None:
        if _uniform(generator) < augment.hflip:
            img = img.flip(-1)
            boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=1)
        if _uniform(generator) < augment.crop:
            ch = max(1, int(round(h * (augment.crop_min + (1 - augment.crop_min) * _uniform(generator)))))
            cw = max(1, int(round(w * (augment.crop_min + (1 - augment.crop_min) * _uniform(generator)))))
            y0 = int(_uniform(generator) * (h - ch + 1))
            x0 = int(_uniform(generator) * (w - cw + 1))
            img = img[:, y0 : y0 + ch, x0 : x0 + cw]
            # imported here, not at the top: `import ppml.detection` (and so `ppml --help`) needs no torchvision
            from torchvision.ops import clip_boxes_to_image

            boxes = clip_boxes_to_image(boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float32), (ch, cw))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
            h, w = ch, cw
    longest = size if augment is None else size * (augment.scale_min + (1 - augment.scale_min) * _uniform(generator))
    r = longest / max(h, w)
    nh, nw = max(1, min(size, int(round(h * r)))), max(1, min(size, int(round(w * r))))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(MEAN).view(3, 1, 1) * 255
    std = torch.tensor(STD).view(3, 1, 1) * 255
    canvas = torch.zeros(3, size, size)
    canvas[:, :nh, :nw] = (img - mean) / std
    sx, sy = nw / w, nh / h
    xyxy = boxes * torch.tensor([sx, sy, sx, sy]) / size
    out = dict(target, boxes=box_xyxy_to_cxcywh(xyxy.clamp(0, 1)), labels=labels, scale=(sx, sy))
    return canvas, out


class Owner:
    """The data owner: encrypts canvases for the trainer and decodes the model's predictions.

    Args:
        encryption: ``none``, ``mi`` (``ppml.mix_subpatches(x, patch_size, grid)``, keyless) or ``rs``
            (``ppml.shuffle_patches`` with a fresh key per image).
        patch_size, grid: the RS / MI patch and the MI grid (the model's patch size).
        img_size: the canvas side S.
        head: the detector's head, ``box`` or ``membership``; it decides which targets the trainer gets. ``box``
            gets plain-canvas boxes; ``membership`` gets, per object, which tokens of the ciphertext it covers and
            its extent inside each (token order, so no layout leaves the owner).
    """

    def __init__(self, encryption: str, patch_size: int, img_size: int, *, grid: int = 2, head: str = "box") -> None:
        if encryption not in ENCRYPTIONS:
            raise ValueError(f"{_WHERE}.Owner: encryption must be one of {', '.join(ENCRYPTIONS)}, got {encryption!r}")
        if head not in HEADS:
            raise ValueError(f"{_WHERE}.Owner: head must be one of {', '.join(HEADS)}, got {head!r}")
        if img_size % patch_size or (encryption == "mi" and patch_size % grid):
            raise ValueError(f"{_WHERE}.Owner: patch_size must divide img_size (and grid patch_size for mi), got "
                             f"img_size={img_size}, patch_size={patch_size}, grid={grid}")
        self.encryption, self.patch_size, self.grid, self.head = encryption, patch_size, grid, head
        self.grid_size = (img_size // patch_size, img_size // patch_size)

    def encrypt(
        self, canvases: Tensor, targets: list[dict], generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[dict], Tensor | None]:
        """Encrypts a batch.

        Args:
            canvases (Tensor[B, 3, S, S]): from :func:`prepare_image`.
            targets: their targets (``boxes`` cxcywh in [0, 1], ``labels``).
            generator: RS keys from this generator (reproducible, not secret); None: OS entropy.

        Returns:
            (ciphertext, trainer targets, keys): the keys (int64 [B, N], RS only, else None) stay with the owner.
        """
        import ppml

        keys = None
        if self.encryption == "mi":
            x = ppml.mix_subpatches(canvases, self.patch_size, self.grid)
        elif self.encryption == "rs":
            n = self.grid_size[0] * self.grid_size[1]
            keys = ppml.random_permutations(canvases.shape[0], n, generator=generator)
            x = ppml.shuffle_patches(canvases, self.patch_size, keys)[0]
        else:
            x = canvases
        out = []
        for b, t in enumerate(targets):
            if self.head == "box":
                out.append({"labels": t["labels"], "boxes": t["boxes"]})
                continue
            masks, extents = membership_targets(t["boxes"], self.grid_size)
            if keys is not None:  # token i of the ciphertext holds tile keys[b, i]
                masks, extents = masks[:, keys[b]], extents[:, keys[b]]
            out.append({"labels": t["labels"], "masks": masks, "extents": extents})
        return x, out, keys

    @torch.no_grad()
    def detections(self, outputs: dict[str, Tensor], keys: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The model's Q detections per image, in plain-canvas coordinates.

        Returns:
            (scores, labels, boxes): Tensor[B, Q] (the best object class's probability, times the mean membership
            probability for the membership head), Tensor[B, Q] int64, Tensor[B, Q, 4] xyxy in [0, 1] of the canvas.
        """
        prob = outputs["pred_logits"].float().softmax(-1)[..., :-1]
        scores, labels = prob.max(-1)
        if "pred_masks" in outputs:
            boxes, quality = membership_to_boxes(outputs["pred_masks"], outputs["pred_extents"], self.grid_size, keys)
            scores = scores * quality
        else:
            boxes = outputs["pred_boxes"].float()
        return scores, labels, box_cxcywh_to_xyxy(boxes).clamp(0, 1)
