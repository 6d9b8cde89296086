"""The ops: each module defines its schema, checks, fake kernel, autograd, public function and nn.Module twin."""

from . import anchor_loss, mix_subpatches, patch_tokens, shuffle_patches

__all__ = ["anchor_loss", "mix_subpatches", "patch_tokens", "shuffle_patches"]
