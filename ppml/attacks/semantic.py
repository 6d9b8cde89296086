"""Semantic inference on RS ciphertext without the key: the attacker trains its own classifier.

The PE-free ViT (``ppml.models.PEFreeViT``) that makes learning on RS ciphertext possible is exactly invariant to
the order of its input's patches. So its predictions on ciphertext do not depend on the key at all: anyone who can
label some images of the same kind can train one (on their own ciphertext with their own keys, or on plain images:
the same thing) and read the *content* of the owner's ciphertext — its class — as well as the owner's model does,
without recovering any key. The jigsaw and position attacks try to undo the encryption; this one does not need to.

- :func:`train_semantic_classifier`: trains a classifier on RS ciphertext of labelled images under keys drawn from
  ``key_seed`` (one fixed key per image, as a data owner would store them), or on plain images (``key_seed=None``).
  ``arch="pevit"`` is ``pevit_tiny_patch16_224`` at the images' size and patch size; ``arch="vit"`` is the same
  ViT with a learned position embedding (timm's), the plaintext baseline. Training runs on the kit's loop
  (:func:`ppml.attacks.kit.fit`): seeded, resumable, cached with ``checkpoint="auto"``.
- :func:`semantic_inference`: the predicted class of each image of a batch of ciphertext (made with any keys).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, describe
from .kit import TrainSettings, fit, load_trained, standardize

__all__ = ["ARCHS", "encrypt_with_seed", "load_semantic_classifier", "semantic_inference", "train_semantic_classifier"]

ARCHS = ("pevit", "vit")
_KIND = "semantic-classifier"
_OP_TRAIN = "ppml.attacks.train_semantic_classifier"


def encrypt_with_seed(images: Tensor, patch_size: int, key_seed: int) -> tuple[Tensor, Tensor]:
    """RS ciphertext of ``images`` with one key per image drawn from ``key_seed``: ``(encrypted, perm)``."""
    from .. import shuffle_patches

    return shuffle_patches(images, patch_size, generator=torch.Generator().manual_seed(key_seed))


def _build(config: dict[str, Any]) -> nn.Module:
    common = dict(img_size=config["img_size"], patch_size=config["patch_size"], num_classes=config["num_classes"],
                  embed_dim=config["dim"], depth=config["depth"], num_heads=config["heads"])  # fmt: skip
    if config["arch"] == "pevit":
        from ..models.vit import create_model

        return create_model("pevit_tiny_patch16_224", **common)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**common)


def _fingerprint(images: Tensor, labels: Tensor) -> str:
    """A short hash of the training set, so a cached classifier is reused only for the same data."""
    h = hashlib.sha256()
    h.update(str((tuple(images.shape), str(images.dtype))).encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def train_semantic_classifier(
    images: Tensor,
    labels: Tensor,
    patch_size: int,
    *,
    key_seed: int | None = 0,
    arch: str = "pevit",
    num_classes: int | None = None,
    dim: int = 192,
    depth: int = 12,
    heads: int = 3,
    **settings: Any,
) -> nn.Module:
    """Trains a classifier on RS ciphertext (or plain images) of labelled images.

    Args:
        images (Tensor[N, C, H, W]): plain images, float in [0, 1] or uint8; square, p dividing the side.
        labels (Tensor[N]): int class labels in [0, num_classes).
        patch_size: p of the RS encryption (and the ViT's patch size).
        key_seed: the keys: ``shuffle_patches(images, p, generator=torch.Generator().manual_seed(key_seed))``, one
            per image, fixed for the whole training; None trains on the plain images.
        arch: ``"pevit"`` (PE-free, RPE, permutation-invariant) or ``"vit"`` (learned position embedding: the
            plaintext baseline; meaningless on ciphertext).
        num_classes: default ``labels.max() + 1``.
        dim, depth, heads: the ViT's width, blocks and heads (default: ViT-Ti, i.e. ``pevit_tiny``'s).
        **settings: the kit's training settings (:class:`~ppml.attacks.kit.TrainSettings`): steps (default 300),
            batch_size (64), lr (1e-3), weight_decay (0.05), seed, checkpoint (None, a path or ``"auto"``),
            progress, threads, ...; ``data``/``digits_fraction`` are unused.

    Returns:
        The model in eval mode, with ``train_info`` (see :func:`ppml.attacks.kit.fit`) and ``config``.
    """
    op = _OP_TRAIN
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{op}: images must be square [N, C, H, W], got {describe(images)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{op}: labels must be [N] with N = {images.shape[0]}, got {describe(labels)}")
    if labels.is_floating_point() or labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError(f"{op}: labels must be non-negative integers, got {describe(labels)}")
    check_positive_int(patch_size, op, "patch_size")
    if images.shape[-1] % patch_size:
        raise ValueError(f"{op}: patch_size {patch_size} must divide the image side, got {describe(images)}")
    if arch not in ARCHS:
        raise ValueError(f"{op}: arch must be one of {ARCHS}, got {arch!r}")
    if key_seed is not None and (isinstance(key_seed, bool) or not isinstance(key_seed, int) or key_seed < 0):
        raise ValueError(f"{op}: key_seed must be an int >= 0 or None (plain images), got {key_seed!r}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    check_positive_int(num_classes, op, "num_classes")
    if int(labels.max()) >= num_classes:
        raise ValueError(f"{op}: labels must be < num_classes = {num_classes}, got max {int(labels.max())}")
    for name, v in (("dim", dim), ("depth", depth), ("heads", heads)):
        check_positive_int(v, op, name)
    s = TrainSettings.from_kwargs(op, settings, steps=300, batch_size=64, lr=1e-3, weight_decay=0.05,
                                  digits_fraction=0.0)  # fmt: skip
    s.check(op)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if key_seed is not None:
        x = encrypt_with_seed(x, patch_size, key_seed)[0]
    x = standardize(x)[0]
    y = labels.to(torch.int64)
    model_config = dict(arch=arch, img_size=int(images.shape[-1]), patch_size=patch_size, num_classes=num_classes,
                        dim=dim, depth=depth, heads=heads, key_seed=key_seed,
                        train_set=_fingerprint(images, labels))  # fmt: skip

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, x.shape[0], (s.batch_size,), generator=gen)
        return x[idx], y[idx]

    model = fit(op=op, kind=_KIND, stem=f"semantic-{arch}-p{patch_size}", model_config=model_config, settings=s,
                build=_build, make_batch=make_batch,
                loss_fn=lambda m, xb, yb: F.cross_entropy(m(xb), yb))  # fmt: skip
    model.config = {**model_config, **s.config()}
    return model


def load_semantic_classifier(path: str | os.PathLike) -> nn.Module:
    """A classifier saved by :func:`train_semantic_classifier` (its checkpoint file), in eval mode."""
    return load_trained(path, _KIND, _build, "ppml.attacks.load_semantic_classifier")


@torch.no_grad()
def semantic_inference(model: nn.Module, encrypted: Tensor, *, batch_size: int = 256) -> Tensor:
    """The class a classifier from :func:`train_semantic_classifier` predicts for each image.

    Args:
        model: the classifier (put in eval mode here).
        encrypted (Tensor[B, C, H, W]): RS ciphertext made with any keys (or plain images), uint8 or float; the
            classifier's image size. Standardised per image like the training images (RS keeps the mean and spread).
        batch_size: images per forward pass.

    Returns:
        Tensor[B] int64 predicted labels.
    """
    op = "ppml.attacks.semantic_inference"
    if not isinstance(encrypted, Tensor) or encrypted.dim() != 4:
        raise ValueError(f"{op}: encrypted must be [B, C, H, W], got {describe(encrypted)}")
    check_positive_int(batch_size, op, "batch_size")
    model.eval()
    x = encrypted.float() / 255 if encrypted.dtype == torch.uint8 else encrypted.float()
    out = [model(standardize(x[k : k + batch_size])[0]).argmax(1) for k in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)
