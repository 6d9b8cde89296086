"""Attacks on the encryptions and the metrics that score them.

- :func:`solve_jigsaw`: a jigsaw-puzzle solver against RS (random patch shuffling) on the known grid.
- :func:`train_position_attacker`, :func:`solve_with_attacker`: a learned attack on RS — a PE-free ViT trained on
  public images to predict each shuffled patch's original cell, decoded into a key by the Hungarian algorithm
  (:func:`assign_positions`).
- :func:`unmix_thumbnail`, :func:`unmix_least_norm`, :func:`unmix_smooth`, :func:`train_unmix_decoder`: attacks on
  MI (mixing sub-patches) — exact patch means, the least-norm and the smoothest consistent images, a learned decoder.
- :func:`reidentify`, :func:`index_gallery`: gallery linkage — which candidate image (a public collection, a leaked
  original) a ciphertext was made from, by matching RS tile multisets or recomputing MI; no key recovered.
- :func:`direct_comparison`, :func:`neighbor_comparison`, :func:`perfect_reconstruction`,
  :func:`position_accuracy`: how much of the key an attack recovered; :func:`psnr`, :func:`ssim`: how close a
  reconstruction is to the plaintext.

The learned attacks train with :mod:`ppml.attacks.kit` (the public corpus, their shared settings and a resumable,
cacheable training loop). They need timm, scipy and scikit-image (``ppml[train]``); those are imported when first used.
"""

from .jigsaw import solve_jigsaw
from .kit import HELD_OUT, PUBLIC_PHOTOS, cache_dir, evaluation_images, load_photo, public_images, sample_crops
from .learned import (
    PositionAttacker,
    assign_positions,
    load_position_attacker,
    position_accuracy,
    predict_position_logits,
    solve_with_attacker,
    train_position_attacker,
)
from .metrics import (
    direct_comparison,
    largest_correct_component,
    neighbor_comparison,
    perfect_reconstruction,
    psnr,
    shifted_direct_comparison,
    ssim,
)
from .mi_inversion import (
    UnmixDecoder,
    load_unmix_decoder,
    train_unmix_decoder,
    unmix,
    unmix_least_norm,
    unmix_smooth,
    unmix_thumbnail,
    unmix_with_decoder,
)
from .reidentify import GalleryIndex, Reidentification, index_gallery, reidentify
from .semantic import load_semantic_classifier, semantic_inference, train_semantic_classifier

__all__ = [
    "GalleryIndex",
    "HELD_OUT",
    "PUBLIC_PHOTOS",
    "PositionAttacker",
    "Reidentification",
    "UnmixDecoder",
    "assign_positions",
    "cache_dir",
    "direct_comparison",
    "evaluation_images",
    "index_gallery",
    "largest_correct_component",
    "load_photo",
    "load_position_attacker",
    "load_semantic_classifier",
    "load_unmix_decoder",
    "neighbor_comparison",
    "perfect_reconstruction",
    "position_accuracy",
    "predict_position_logits",
    "psnr",
    "public_images",
    "reidentify",
    "sample_crops",
    "semantic_inference",
    "shifted_direct_comparison",
    "solve_jigsaw",
    "solve_with_attacker",
    "ssim",
    "train_position_attacker",
    "train_semantic_classifier",
    "train_unmix_decoder",
    "unmix",
    "unmix_least_norm",
    "unmix_smooth",
    "unmix_thumbnail",
    "unmix_with_decoder",
]
