"""The ops: each module defines its schema, checks, fake kernel, autograd, public function and nn.Module twin."""

from . import shuffle_patches

__all__ = ["shuffle_patches"]
