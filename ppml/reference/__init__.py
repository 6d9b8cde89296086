"""Reference implementations: plain differentiable PyTorch, one per op."""

from .anchor_loss import anchor_loss
from .mix_subpatches import mix_subpatches
from .patch_tokens import patch_tokens
from .shuffle_patches import shuffle_patches

__all__ = ["anchor_loss", "mix_subpatches", "patch_tokens", "shuffle_patches"]
