"""The ops: each module defines its schema, checks, fake kernel, autograd, public function and nn.Module twin."""

from . import mix_subpatches, shuffle_patches

__all__ = ["mix_subpatches", "shuffle_patches"]
