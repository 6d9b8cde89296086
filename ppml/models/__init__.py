"""Model pieces for learning on encrypted images.

:class:`MixedPatchEmbed` needs only torch. The ViTs (``pevit_*`` for RS, ``mivit_*`` for MI), RPE and
:func:`create_model` need timm; importing this package registers the ViTs with timm when it is installed.
"""

from .mixed_patch_embed import MixedPatchEmbed

try:
    from .vit import MODEL_NAMES, MIViT, PEFreeViT, ReferencePositionalEncoding, create_model
except ModuleNotFoundError as e:  # only a missing timm is tolerated; any other import error is a bug to surface
    if (e.name or "").split(".")[0] != "timm":
        raise

    # Keep in step with vit.MODEL_NAMES (tests check it).
    MODEL_NAMES = tuple(
        f"{kind}_{size}_patch16_224" for kind in ("pevit", "mivit") for size in ("tiny", "small", "base")
    )
    _NEED_TIMM = ("MIViT", "PEFreeViT", "ReferencePositionalEncoding")

    def _timm_missing(what: str) -> ImportError:
        return ImportError(
            f"ppml.models.{what}: the ViTs need timm, which is not installed: pip install timm (or pip install "
            f"'ppml[train]')"
        )

    def create_model(model_name: str, pretrained: bool = False, **kwargs):
        """Needs timm (see ppml.models.vit.create_model); without it, raises ImportError."""
        raise _timm_missing("create_model")

    def __getattr__(name: str):
        if name in _NEED_TIMM:
            raise _timm_missing(name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODEL_NAMES", "MIViT", "MixedPatchEmbed", "PEFreeViT", "ReferencePositionalEncoding", "create_model"]
