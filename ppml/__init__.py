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
from .ops.patch_tokens import PatchTokens, patch_tokens  # noqa: E402

from . import _timm  # noqa: E402

_timm.install()  # timm.create_model("pevit_...") after `import ppml` without importing timm now (ppml/_timm.py)

__version__ = "0.1.0"

# Subpackages imported on first use (`ppml.models.MixedPatchEmbed(...)` after `import ppml`), so `import ppml` stays
# cheap and works without the extras; the value is the extra that installs what the subpackage needs.
_LAZY_SUBMODULES = {
    "models": "train",
    "data": "train",
    "train": "train",
    "attacks": "attack",
    "detection": "detect",
    "show": "train",
    "cli": "train",
}  # (augment, reference, keys, anchors and ops are imported by `import ppml` itself: they need only torch)


def __getattr__(name: str):
    extra = _LAZY_SUBMODULES.get(name)
    if extra is None:
        raise AttributeError(f"module 'ppml' has no attribute {name!r}")
    import importlib

    try:
        module = importlib.import_module(f"ppml.{name}")
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if not missing or missing == "ppml":
            raise
        raise ImportError(
            f"ppml.{name} needs {missing}, which is not installed: pip install \"ppml[{extra}]\""
        ) from e
    globals()[name] = module
    return module


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = [
    "AnchorLoss",
    "PatchShuffle",
    "PatchTokens",
    "SubpatchMix",
    "anchor_loss",
    "backend_info",
    "invert_permutations",
    "make_anchors",
    "mix_subpatches",
    "nearest_anchor",
    "patch_tokens",
    "random_mixing_weights",
    "random_permutations",
    "shuffle_patches",
    "unshuffle_patches",
]
