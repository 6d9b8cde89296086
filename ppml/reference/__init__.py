"""Reference implementations: plain differentiable PyTorch, one per op."""

from .mix_subpatches import mix_subpatches
from .shuffle_patches import shuffle_patches

__all__ = ["mix_subpatches", "shuffle_patches"]
