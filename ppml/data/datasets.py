"""Train/validation splits: in memory as float tensors in [0, 1] — ``load_digits`` (scikit-learn's 1,797 digits,
nothing downloaded) and ``load_image_folder`` (an ImageFolder tree, decoded once with a progress bar) — or, for
streaming (:mod:`ppml.data.stream`), ``folder_index``: a folder's files, labels and split, without decoding them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .._progress import progress

_OP = "ppml.data"


@dataclass
class TensorSplit:
    """A labelled train/validation split held in memory.

    Attributes:
        train_x (Tensor[N, C, H, W]): float32 images in [0, 1] (or ciphertext, after encryption).
        train_y (Tensor[N]): int64 labels in [0, num_classes).
        val_x (Tensor[M, C, H, W]), val_y (Tensor[M]): the validation split, likewise.
        classes: class names, index = label.
        skipped: the source images left out because they could not be read (``{"path", "error"}``, path relative
            to the folder), as ``ppml encrypt`` reports them.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices of a fixed stratified split: per class, a seeded shuffle, the first round(fraction·n) go to val."""
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        k = round(val_fraction * idx.numel())
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def load_digits(img_size: int = 32, channels: int = 3, val_fraction: float = 0.2, split_seed: int = 0) -> TensorSplit:
    """scikit-learn's 1,797 labelled 8×8 digits, bilinearly upscaled to ``img_size`` and repeated over ``channels``.

    The split is fixed (stratified, seeded by ``split_seed``): 1,437 train / 360 validation images by default.

    Args:
        img_size: output side (>= 8).
        channels: 1 or 3 (grey repeated, so RGB models and colour augmentations apply unchanged).
        val_fraction: share of each class held out.
        split_seed: seed of the split (not of training).

    Returns:
        TensorSplit with float32 images [N, channels, img_size, img_size] in [0, 1].
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_OP}.load_digits needs scikit-learn: pip install scikit-learn (or ppml[train])") from exc
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"{_OP}.load_digits: img_size must be an int >= 8, got {img_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"{_OP}.load_digits: channels must be 1 or 3, got {channels!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{_OP}.load_digits: val_fraction must lie in (0, 1), got {val_fraction!r}")
    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, channels, -1, -1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    tr, va = stratified_split(y, val_fraction, split_seed)
    return TensorSplit(x[tr], y[tr], x[va], y[va], [str(c) for c in range(10)])


def load_image_folder(path: str, img_size: int = 224, val_fraction: float = 0.2, split_seed: int = 0,
                      workers: int | None = None) -> TensorSplit:
    """An ImageFolder tree (``class_name/image.jpg``) decoded into memory: resized (shorter side), centre-cropped to
    ``img_size``, RGB float in [0, 1] — the images ``ppml encrypt`` would encrypt, by the same code.

    If ``path`` holds ``train/`` and ``val/`` subfolders they are the split (their class lists must agree); otherwise
    one tree is split like :func:`load_digits` (fixed, stratified). Unreadable or corrupt images (truncated, not an
    image) are left out and listed in ``skipped``, exactly as ``ppml encrypt`` skips them; if none is readable,
    ValueError names them.

    Returns:
        TensorSplit with float32 images [N, 3, img_size, img_size].
    """
    from .encrypted import decode_items, scan_source

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{_OP}.load_image_folder: {path!r} is not a directory")
    items, classes = scan_source(path, f"{_OP}.load_image_folder")
    skipped: list[dict] = []
    xs, ys, split = [], [], []
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    bar = progress(total=len(items), desc="decode images", leave=False)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for b0 in range(0, len(items), 256):
            batch = range(b0, min(len(items), b0 + 256))
            for i, img in decode_items(pool, path, items, batch, img_size, skipped):
                xs.append(img)
                ys.append(items[i].label)
                split.append(items[i].split)
            bar.update(len(batch))
    bar.close()
    if not xs:
        names = ", ".join(f"{s['path']} ({s['error']})" for s in skipped[:5])
        raise ValueError(f"{_OP}.load_image_folder: none of the {len(items)} images under {path!r} could be read: "
                         f"{names}{', ...' if len(skipped) > 5 else ''}")
    x = torch.stack(xs).float().div_(255.0)
    y = torch.as_tensor(ys, dtype=torch.int64)
    if any(s is not None for s in split):  # the source had train/ and val/
        is_val = torch.tensor([s == "val" for s in split])
        tr, va = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    else:
        tr, va = stratified_split(y, val_fraction, split_seed)
    return TensorSplit(x[tr], y[tr], x[va], y[va], classes, skipped)


def folder_index(path: str, val_fraction: float = 0.2, split_seed: int = 0):
    """An ImageFolder tree's files for streaming, in :func:`load_image_folder`'s order and split rule (train/ and
    val/ subfolders, else the fixed stratified split — over all files, since none is decoded here).

    Returns:
        ``(paths, labels, is_val, classes)``: paths relative to ``path`` as a NumPy bytes array (compact: about the
        paths' length per image), int64 labels, a bool mask of the validation files, the class names.
    """
    import numpy as np

    from .encrypted import scan_source

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{_OP}.folder_index: {path!r} is not a directory")
    items, classes = scan_source(path, f"{_OP}.folder_index")
    paths = np.array([it.path.encode() for it in items])
    labels = np.array([it.label for it in items], dtype=np.int64)
    if any(it.split is not None for it in items):
        is_val = np.array([it.split == "val" for it in items])
    else:
        _, va = stratified_split(torch.from_numpy(labels), val_fraction, split_seed)
        is_val = np.zeros(len(items), dtype=bool)
        is_val[va.numpy()] = True
    return paths, labels, is_val, classes


def load_dataset(data: str, img_size: int) -> TensorSplit:
    """``"digits"`` (built in) or a folder path."""
    if data == "digits":
        return load_digits(img_size)
    return load_image_folder(data, img_size)
