"""A built-in COCO-format detection set, made offline and deterministically: filled shapes pasted onto crops of the
photos bundled with scikit-image.

Layout (the same one :func:`ppml.detection.resolve_coco` finds for real COCO)::

    ROOT/train/000000.png ...          ROOT/annotations/instances_train.json
    ROOT/val/000000.png ...            ROOT/annotations/instances_val.json
    ROOT/synthetic.json                 the generator's settings (a second call with the same settings reuses ROOT)

Each image is a random crop of one photo, resized to ``width × height``, with 1..``max_objects`` non-overlapping
objects of three classes (rectangle, ellipse, triangle) in random vivid colours with a dark outline. An object's box
is the bounding box of the pixels drawn for it (exact, in pixels, COCO ``[x, y, w, h]``; objects never overlap, so no
box is occluded) and its ``area`` is that pixel count, so COCO's small / medium / large split applies.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile

import numpy as np

from .._checks import check_int

CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"})
#: scikit-image photos used as backgrounds (bundled, no download); grey ones are converted to RGB.
BACKGROUNDS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "cat", "brick", "camera", "grass",
               "gravel", "moon", "coins", "clock", "page", "text", "hubble_deep_field")
_WHERE = "ppml.detection.make_synthetic_coco"
_FORMAT = 1


def _photos() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(f"{_WHERE}: the built-in data need scikit-image for its bundled photos "
                          f"(pip install scikit-image)") from exc
    out = []
    for name in BACKGROUNDS:
        try:
            a = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo this scikit-image lacks or would download: skip it
            continue
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(a[..., :3].astype(np.uint8)))
    if not out:
        raise ValueError(f"{_WHERE}: scikit-image loaded none of its bundled photos {BACKGROUNDS}")
    return out


def _background(photos: list[np.ndarray], rng: np.random.Generator, width: int, height: int):
    from PIL import Image

    a = photos[int(rng.integers(len(photos)))]
    h, w = a.shape[:2]
    s = rng.uniform(0.35, 1.0)
    ch = int(min(h, w * height / width) * s)
    cw = int(ch * width / height)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(a[y : y + ch, x : x + cw]).resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def _shape_mask(kind: int, w: int, h: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if kind == 1:
        d.rectangle((0, 0, w - 1, h - 1), fill=255)
    elif kind == 2:
        d.ellipse((0, 0, w - 1, h - 1), fill=255)
    else:
        corners = [(w / 2, 0), (w - 1, h - 1), (0, h - 1)]  # apex up; turned by one of four right angles
        k = int(rng.integers(4))
        if k == 1:
            corners = [(w / 2, h - 1), (w - 1, 0), (0, 0)]
        elif k == 2:
            corners = [(0, h / 2), (w - 1, 0), (w - 1, h - 1)]
        elif k == 3:
            corners = [(w - 1, h / 2), (0, 0), (0, h - 1)]
        d.polygon(corners, fill=255)
    return m


def _draw_image(photos, rng, width, height, max_objects, min_size, max_size):
    from PIL import Image, ImageFilter

    img = _background(photos, rng, width, height)
    boxes: list[tuple[int, int, int, int]] = []
    anns = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(50):
            side = float(np.exp(rng.uniform(np.log(min_size), np.log(max_size))))
            aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
            w = int(min(width, max(4, round(side * min(1.0, aspect)))))
            h = int(min(height, max(4, round(side * min(1.0, 1 / aspect)))))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if all(x + w + 2 <= bx or bx + bw + 2 <= x or y + h + 2 <= by or by + bh + 2 <= y
                   for bx, by, bw, bh in boxes):
                break
        else:
            break  # the image is full
        kind = int(rng.integers(1, len(CATEGORIES) + 1))
        mask = _shape_mask(kind, w, h, rng)
        hue, sat, val = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
        fill = tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        edge = tuple(int(c * 0.35) for c in fill)
        inner = mask.filter(ImageFilter.MinFilter(3)) if min(w, h) > 6 else mask
        img.paste(Image.new("RGB", (w, h), edge), (x, y), mask)
        img.paste(Image.new("RGB", (w, h), fill), (x, y), inner)
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        boxes.append((x, y, w, h))
        anns.append({"category_id": kind, "bbox": [x + x0, y + y0, x1 - x0, y1 - y0], "area": int(m.sum()),
                     "iscrowd": 0})
    return img, anns


def _saved_settings(root: str) -> dict | None:
    """The settings a finished set in ``root`` was made with (its ``synthetic.json``), or None."""
    stamp = os.path.join(root, "synthetic.json")
    if not os.path.exists(stamp):
        return None
    with open(stamp) as fh:
        return json.load(fh)


def _same_set(saved: dict, settings: dict) -> bool:
    return {k: saved.get(k) for k in settings} == settings


def make_synthetic_coco(
    root: str,
    num_train: int = 1000,
    num_val: int = 200,
    *,
    width: int = 192,
    height: int = 144,
    max_objects: int = 4,
    min_size: int = 16,
    max_size: int = 128,
    seed: int = 0,
) -> dict:
    """Writes the built-in data set to ``root`` (or reuses it when ``root`` holds one made with the same settings).

    Args:
        root: output folder (created; must be empty or hold a set from this function).
        num_train, num_val: image counts of the ``train`` and ``val`` splits.
        width, height: image size in pixels.
        max_objects: at most this many objects per image (at least one).
        min_size, max_size: range of an object's longer side in pixels (log-uniform).
        seed: everything is drawn from ``numpy.random.default_rng((seed, split, index))``, so a set is the same
            on every machine with the same scikit-image photos.

    Returns:
        The settings dict stored in ``ROOT/synthetic.json`` (plus ``root``).
    """
    settings = dict(format=_FORMAT, num_train=num_train, num_val=num_val, width=width, height=height,
                    max_objects=max_objects, min_size=min_size, max_size=max_size, seed=seed)
    for k, v in settings.items():
        check_int(v, _WHERE, k, 0 if k in ("seed", "num_val") else 1)
    if not 4 <= min_size <= max_size or max_size > min(width, height):
        raise ValueError(f"{_WHERE}: need 4 <= min_size <= max_size <= min(width, height), got min_size={min_size}, "
                         f"max_size={max_size}, image {width}x{height}")
    old = _saved_settings(root)
    if old is not None:
        if _same_set(old, settings):
            return {**settings, "root": root}
        raise FileExistsError(f"{_WHERE}: {root!r} holds a synthetic set made with other settings {old}; "
                              f"wanted {settings}: remove it or choose another folder")
    if os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{_WHERE}: root must be empty or hold a synthetic set, got {root!r} with other files")
    photos = _photos()
    # A folder of its own next to root (one per call, so two at once never share one), renamed into place at the end.
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root.rstrip(os.sep)) + ".tmp", dir=parent)
    os.makedirs(os.path.join(tmp, "annotations"))
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        os.makedirs(os.path.join(tmp, split))
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng((seed, split_id, i))
            img, anns = _draw_image(photos, rng, width, height, max_objects, min_size, max_size)
            name = f"{i:06d}.png"
            img.save(os.path.join(tmp, split, name), compress_level=1)
            images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
            for a in anns:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, **a})
        coco = {"info": {"description": "ppml built-in synthetic shapes", **settings}, "images": images,
                "annotations": annotations, "categories": [dict(c, supercategory="shape") for c in CATEGORIES]}
        with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as fh:
            json.dump(coco, fh)
    with open(os.path.join(tmp, "synthetic.json"), "w") as fh:
        json.dump(settings, fh)
    try:
        if os.path.isdir(root):
            os.rmdir(root)  # empty (checked above), unless another process has filled it since
        os.replace(tmp, root)
    except OSError:
        # Another process (say, a second run started at the same time on the same folder) finished first: its set
        # is the same one when the settings match, so use it.
        shutil.rmtree(tmp, ignore_errors=True)
        theirs = _saved_settings(root)
        if theirs is not None and _same_set(theirs, settings):
            return {**settings, "root": root}
        raise
    return {**settings, "root": root}
