"""Reference implementations: plain differentiable PyTorch, one per op."""

from .anchor_loss import anchor_loss
from .mix_subpatches import mix_subpatches
from .shuffle_patches import shuffle_patches

__all__ = ["anchor_loss", "mix_subpatches", "shuffle_patches"]
