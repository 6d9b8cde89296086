"""The owner's source images: scanning a folder (or the built-in digits) into a fixed item order, decoding and
resizing one image, and the one decode-and-skip rule shared by ``ppml encrypt`` and ``ppml train --data FOLDER``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_ENC = "ppml encrypt"


@dataclass
class SourceItem:
    path: str  # relative to SRC ("<label>/<index>" for the built-in digits)
    label: int
    split: str | None  # "train" / "val" when SRC has train/ and val/, else None


def _scan_tree(
    root: str, prefix: str, split: str | None, classes: list[str] | None, op: str = _ENC
) -> tuple[list[SourceItem], list[str]]:
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    classes = classes if classes is not None else found
    if found != classes:
        raise ValueError(f"{op}: the class folders of {root!r} ({found}) differ from {classes}")
    items = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, cls))):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    items.append(SourceItem(os.path.join(prefix, rel) if prefix else rel, label, split))
    return items, classes


def scan_source(src: str, op: str = _ENC) -> tuple[list[SourceItem], list[str]]:
    """The items of SRC in a fixed order: ``digits``, or an ImageFolder tree (``class/…/image``), or a tree with
    ``train/`` and ``val/`` ImageFolder subtrees (the split is kept). Errors name ``op`` (the command)."""
    if src == "digits":
        from sklearn.datasets import load_digits

        target = load_digits().target
        # "<label>/<index>": decrypted, the digits form an ImageFolder tree
        return [SourceItem(f"{t}/{i:04d}", int(t), None) for i, t in enumerate(target)], [str(c) for c in range(10)]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{op}: {src!r} must be 'digits' or an image folder (it is not a directory)")
    tr, va = os.path.join(src, "train"), os.path.join(src, "val")
    if os.path.isdir(tr) and os.path.isdir(va):
        a, classes = _scan_tree(tr, "train", "train", None, op)
        b, _ = _scan_tree(va, "val", "val", classes, op)
        items = a + b
    else:
        items, classes = _scan_tree(src, "", None, None, op)
    if not items:
        raise ValueError(f"{op}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {src!r}")
    return items, classes


def load_source_image(src: str, item: SourceItem, size: int) -> Tensor:
    """One source image as uint8 [3, size, size]: RGB, shorter side resized to ``size`` (bilinear, antialiased),
    centre-cropped. The digits: the 8×8 image (0..16) bilinearly upscaled, scaled to 0..255 and rounded."""
    if src == "digits":
        x = _digits_images()[int(item.path.split("/")[-1])]
        x = torch.as_tensor(x, dtype=torch.float32)[None, None] / 16.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1).contiguous()
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with Image.open(os.path.join(src, item.path)) as im:
        im = im.convert("RGB")
        im = TF.resize(im, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        im = TF.center_crop(im, size)
        return TF.pil_to_tensor(im).contiguous()


_DIGITS = None


def _digits_images():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        _DIGITS = load_digits().images
    return _DIGITS


def decode_items(
    pool, src: str, items: list[SourceItem], indices, size: int, skipped: list
) -> list[tuple[int, Tensor]]:
    """``(i, uint8 [3, size, size])`` for every readable ``items[i]``, i in ``indices``, in order; each unreadable or
    corrupt one (truncated, not an image, ...) is appended to ``skipped`` as ``{"path", "error"}`` and left out.
    The one decode-and-skip rule of ``ppml encrypt`` and ``ppml train --data FOLDER``. Decoding and resizing release
    the GIL (PIL's C code): ``pool``'s threads scale them; map keeps the order."""
    indices = list(indices)
    out = []
    for i, img in zip(indices, pool.map(_try_load, [(src, items[i], size) for i in indices]), strict=True):
        if isinstance(img, Exception):
            skipped.append({"path": items[i].path, "error": f"{type(img).__name__}: {img}"})
        else:
            out.append((i, img))
    return out


def _try_load(args):
    try:
        return load_source_image(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc
