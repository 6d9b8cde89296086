"""Model pieces for learning on encrypted images."""

from .mixed_patch_embed import MixedPatchEmbed

__all__ = ["MixedPatchEmbed"]
