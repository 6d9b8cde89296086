"""ppml: privacy-preserving vision learning on encrypted images.

Import order matters: the op modules define the schemas first, then ppml._C (if built for this torch) registers its
C++ kernels, and only for the ops it did not cover is the reference registered as the kernel.
"""

from . import _extension
from .ops import _common  # defines the ppml op library, then each op module its schema

_extension.load()
_common.register_fallback_kernels()

from . import _dispatch  # noqa: E402

_dispatch.refresh()

from . import augment  # noqa: E402  (encrypted-domain augmentation; ppml.models, ppml.data, ppml.train need timm)
from ._dispatch import backend_info  # noqa: E402
from .anchors import make_anchors  # noqa: E402
from .ops.anchor_loss import AnchorLoss, anchor_loss, nearest_anchor  # noqa: E402
from .keys import invert_permutations, random_permutations  # noqa: E402
from .ops.mix_subpatches import SubpatchMix, mix_subpatches, random_mixing_weights  # noqa: E402
from .ops.shuffle_patches import PatchShuffle, shuffle_patches, unshuffle_patches  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AnchorLoss",
    "PatchShuffle",
    "SubpatchMix",
    "anchor_loss",
    "backend_info",
    "invert_permutations",
    "make_anchors",
    "mix_subpatches",
    "nearest_anchor",
    "random_mixing_weights",
    "random_permutations",
    "shuffle_patches",
    "unshuffle_patches",
]
