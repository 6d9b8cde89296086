"""Reference implementations: plain differentiable PyTorch, one per op."""

from .shuffle_patches import shuffle_patches

__all__ = ["shuffle_patches"]
