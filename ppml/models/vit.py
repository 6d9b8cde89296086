"""ViTs for encrypted images, built on current timm (no fork, nothing downloaded).

* ``pevit_*`` (for RS): timm's VisionTransformer with no position embedding, the class token kept, and optionally the
  paper's reference-based positional encoding (RPE) on the patch tokens. Every layer then treats patch tokens as a
  set, so the logits are exactly invariant to shuffling the patches (``ppml.shuffle_patches`` at the model's patch
  size): training on RS ciphertext equals training on plain images. ``shuffle_input=True`` takes plain images and
  shuffles their patches inside the model with fresh keys every call (the paper's in-model setting).
* ``mivit_*`` (for MI): the MI patch embedding (:class:`~ppml.models.MixedPatchEmbed`) in place of timm's, position
  embedding kept (MI does not move patches). Input: the ciphertext ``[B, C, H/g, W/g]``; ``img_size`` is the plain
  size. ``mix_input=True`` takes plain images and mixes them inside the model (the paper's setting).

The two in-model encryptions are thus options of the model of their scheme, ``shuffle_input`` (RS, keyed: the keys are
drawn by :func:`ppml.shuffle_patches`) and ``mix_input`` (MI, keyless); ``ppml train --mode in-model`` sets them.

Importing this module registers the six models with timm, so ``timm.create_model("pevit_tiny_patch16_224")`` works.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_positive_int, describe
from ..ops.mix_subpatches import mix_subpatches
from ..ops.shuffle_patches import shuffle_patches
from .mixed_patch_embed import MixedPatchEmbed

__all__ = [
    "MODEL_NAMES",
    "MIViT",
    "PEFreeViT",
    "TokenPatchEmbed",
    "ReferencePositionalEncoding",
    "create_model",
]  # register_model appends each model's entrypoint name

# DeiT sizes (the paper's code is a DeiT fork): ViT-Ti/S/B.
_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}
MODEL_NAMES: tuple[str, ...] = tuple(f"{kind}_{size}_patch16_224" for kind in ("pevit", "mivit") for size in _SIZES)


class ReferencePositionalEncoding(nn.Module):
    """Reference-based positional encoding (RPE, from the paper's code): ``x ← x + sigmoid(MLP(x − r))`` per token.

    ``r ∈ R^D`` is learnable and ``MLP = Linear(D, D) → ReLU → Linear(D, D)``. Each token is encoded from its own
    content only, so the module is permutation-equivariant over tokens: a PE-free ViT with RPE stays exactly
    permutation-invariant over patches. The ViTs apply it to the patch tokens only (the class token is untouched).

    Args:
        dim: D, the token width.
        device, dtype: factory kwargs for the parameters.

    Shapes:
        input (Tensor[..., D]): tokens, e.g. ``[B, N, D]`` or ``[B, H/p, W/p, D]``.
        output: same shape and dtype. Differentiable in the tokens, ``reference`` and the MLP's weights.
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        check_positive_int(dim, "ppml.models.ReferencePositionalEncoding", "dim")
        self.dim = dim
        self.reference = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim, device=device, dtype=dtype),
            nn.ReLU(),
            nn.Linear(dim, dim, device=device, dtype=dtype),
        )
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for ``reference`` and the weights, zero biases. (timm calls
        a submodule's ``init_weights`` when the model is re-initialised.)"""
        trunc_normal_(self.reference, std=0.02)
        for layer in (self.mlp[0], self.mlp[2]):
            trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() < 1 or tokens.shape[-1] != self.dim:
            raise ValueError(
                f"ppml.models.ReferencePositionalEncoding: tokens must be [..., D] with D={self.dim}, "
                f"got {describe(tokens)}"
            )
        return tokens + torch.sigmoid(self.mlp(tokens - self.reference))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class TokenPatchEmbed(PatchEmbed):
    """timm's PatchEmbed that also takes patch tokens ``[B, N, C·p·p]`` (from :func:`ppml.patch_tokens`): the conv
    ``[D, C, p, p]`` is then applied as the linear map it is, ``tokens @ weight.view(D, C·p·p).T + bias``. The
    parameters are the conv's (same names, same shapes), so state dicts and the image path are unchanged; tokens and
    images give the same embedding up to float rounding (a matmul sums the same products as the conv, in another
    order)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            return super().forward(x)
        w = self.proj.weight
        k = w[0].numel()
        if x.shape[-1] != k:
            raise ValueError(
                f"ppml.models.PEFreeViT: tokens must be [B, N, C*p*p] with C*p*p={k} (ppml.patch_tokens(images, "
                f"{self.patch_size[0]})), got {describe(x)}"
            )
        if not self.flatten and self.output_fmt.value != "NLC":
            raise ValueError(
                "ppml.models.PEFreeViT: tokens carry no image grid, so dynamic_img_size / a spatial output_fmt needs "
                "images, not tokens"
            )
        if self.img_size is not None and self.strict_img_size and x.shape[1] != self.num_patches:
            raise ValueError(
                f"ppml.models.PEFreeViT: tokens must be {self.num_patches} per image (img_size={self.img_size}, "
                f"patch_size={self.patch_size}), got {describe(x)}"
            )
        return self.norm(F.linear(x.to(w.dtype), w.flatten(1), self.proj.bias))


class PEFreeViT(VisionTransformer):
    """timm's VisionTransformer without a position embedding, with RPE on the patch tokens (the ``pevit_*`` models).

    Exactly invariant to any permutation of the input's patches at ``patch_size`` (eval mode; the class token and
    every pooling timm offers are order-free). Train on RS ciphertext, or on plain images — the same thing.

    Takes images, or their patch tokens ``[B, N, C·p·p]`` straight from :func:`ppml.patch_tokens` (uint8 in, cast,
    normalised and RS-shuffled in one pass): the patch embedding (:class:`TokenPatchEmbed`) applies its conv weight
    as a linear map to them, so the logits equal the image path's up to float rounding.

    Args:
        rpe: add :class:`ReferencePositionalEncoding` after the patch embedding (default True). ``False`` gives the
            bare PE-free ViT.
        shuffle_input: take plain images and RS-encrypt them inside the model: every call (training and evaluation)
            shuffles the input's patches at ``patch_size`` with fresh keys, ``ppml.shuffle_patches(x, p,
            generator=model.shuffle_generator)`` — OS entropy while :attr:`shuffle_generator` is None, a seeded
            stream for reproducible training (``ppml train --mode in-model`` gives it its per-rank generator). The
            paper's in-model setting; default False (the input is used as it comes: plain or RS ciphertext). The
            weights do not depend on it, so state dicts move between both settings.
        *args, **kwargs: any timm ``VisionTransformer`` argument (img_size, patch_size, num_classes, embed_dim,
            depth, num_heads, in_chans, class_token, global_pool, drop_path_rate, dynamic_img_size, ...) except
            ``pos_embed``, which can only be ``'none'``.

    Shapes:
        input (Tensor[B, C, H, W]): plain or RS-encrypted images (float), or Tensor[B, N, C·p·p] patch tokens.
        output: Tensor[B, num_classes] logits (``forward_features``: Tensor[B, prefix + N, D]).
    """

    def __init__(self, *args: Any, rpe: bool = True, shuffle_input: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("embed_layer", TokenPatchEmbed)
        pos_embed = kwargs.pop("pos_embed", "none")
        if pos_embed not in ("none", ""):
            raise ValueError(
                f"ppml.models.PEFreeViT: pos_embed must be 'none' (a position embedding breaks the permutation "
                f"invariance RS relies on), got {pos_embed!r}; use a timm 'vit_*' model for a ViT with one"
            )
        super().__init__(*args, pos_embed="none", **kwargs)
        self.rpe = (
            ReferencePositionalEncoding(self.embed_dim, device=kwargs.get("device"), dtype=kwargs.get("dtype"))
            if rpe
            else None
        )
        self.shuffle_input = bool(shuffle_input)
        self.shuffle_generator: torch.Generator | None = None
        if shuffle_input and self.patch_embed.patch_size[0] != self.patch_embed.patch_size[1]:
            raise ValueError(f"ppml.models.PEFreeViT: shuffle_input needs square patches, got patch_size="
                             f"{tuple(self.patch_embed.patch_size)}")

    @torch.compiler.disable
    def _shuffle(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            raise ValueError(
                f"ppml.models.PEFreeViT: shuffle_input=True shuffles images [B, C, H, W]; for tokens, shuffle them "
                f"when making them (ppml.patch_tokens(images, p, perm)), got {describe(x)}"
            )
        # Outside torch.compile: the keys come from a generator the caller swaps between calls; a compiled graph that
        # guarded on it would recompile for every new one.
        return shuffle_patches(x, self.patch_embed.patch_size[0], generator=self.shuffle_generator)[0]

    def forward_features(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return super().forward_features(self._shuffle(x) if self.shuffle_input else x, *args, **kwargs)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any):
        return super().forward_intermediates(self._shuffle(x) if self.shuffle_input else x, *args, **kwargs)

    def _pos_embed(self, x: Tensor) -> Tensor:
        # x holds the patch tokens only ([B, N, D], or [B, H', W', D] with dynamic_img_size): RPE before timm adds
        # the class/register tokens leaves those untouched.
        if self.rpe is not None:
            x = self.rpe(x)
        # timm 1.0.31 returns early when pos_embed is None and skips pos_drop; apply it so pos_drop_rate still works.
        return self.pos_drop(super()._pos_embed(x))

    def extra_repr(self) -> str:
        return "shuffle_input=True" if self.shuffle_input else ""


def _square(value: Any, name: str) -> int:
    """timm passes sizes as int or (h, w); the MI embedding's patches are square."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"ppml.models.MIViT: {name} must be an int or a square (p, p) pair, got {value!r}")
        value = value[0]
    return value


class _TimmMixedPatchEmbed(MixedPatchEmbed):
    """:class:`MixedPatchEmbed` with timm's ``embed_layer`` signature, the size checks timm's PatchEmbed makes, and
    the optional in-model mixing. Parameter names are MixedPatchEmbed's, so state dicts move between
    ``mix_input=False`` and ``True``."""

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        norm_layer: type[nn.Module] | None = None,
        output_fmt: str | None = None,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        grid: int = 2,
        mix_input: bool = False,
    ) -> None:
        if img_size is None:
            raise ValueError("ppml.models.MIViT: img_size (the plain image size) is required, got None")
        if dynamic_img_pad:
            raise ValueError(
                "ppml.models.MIViT: dynamic_img_pad is not supported (MI needs patch_size to divide the image), "
                "got dynamic_img_pad=True"
            )
        if output_fmt not in (None, "NLC", "NHWC"):
            raise ValueError(f"ppml.models.MIViT: output_fmt must be None, 'NLC' or 'NHWC', got {output_fmt!r}")
        super().__init__(
            patch_size=_square(patch_size, "patch_size"),
            grid=grid,
            in_chans=in_chans,
            embed_dim=embed_dim,
            img_size=img_size,
            flatten=False,
        )
        if not bias:  # timm asks for a bias-free embedding when pre_norm=True (CLIP style)
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.block, stride=self.block, bias=False)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        self.output_fmt = output_fmt or "NLC"
        self.strict_img_size = strict_img_size
        self.mix_input = mix_input
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        """Stride of the token grid w.r.t. the model input: p for plain input, p/g for the ciphertext."""
        r = self.patch_size if self.mix_input else self.block
        return r if as_scalar else (r, r)

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Token grid for a model input of ``img_size`` (used by timm's ``forward_intermediates``)."""
        r = self.feat_ratio()
        return img_size[0] // r, img_size[1] // r

    def set_input_size(
        self, img_size: int | tuple[int, int] | None = None, patch_size: int | tuple[int, int] | None = None
    ) -> None:
        """timm's resize hook: a new plain ``img_size`` is fine (timm then resamples pos_embed); a new patch size
        would need a new mixing grid, so it is refused."""
        if patch_size is not None and _square(patch_size, "patch_size") != self.patch_size:
            raise ValueError(
                f"ppml.models.MIViT.set_input_size: changing patch_size is not supported (the MI embedding is tied "
                f"to p={self.patch_size}, g={self.grid}), got patch_size={patch_size!r}"
            )
        if img_size is None:
            return
        h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"ppml.models.MIViT.set_input_size: patch_size={self.patch_size} must divide img_size, got {(h, w)}"
            )
        self.img_size, self.grid_size = (h, w), (h // self.patch_size, w // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: Tensor) -> Tensor:
        c = self.proj.in_channels
        h, w = self.img_size
        g = self.grid
        tokens = x.dim() == 3 and x.shape[-1] == self.proj.weight[0].numel()  # (an unbatched image is refused below)
        if tokens and not self.mix_input and self.output_fmt == "NLC":  # tokens of the ciphertext
            return self.norm(self.embed_tokens(x))
        if x.dim() != 4 or x.shape[1] != c:
            want = f"[B, {c}, {h}, {w}] plain images" if self.mix_input else f"the MI ciphertext [B, {c}, H/g, W/g]"
            raise ValueError(f"ppml.models.MIViT: input must be {want}, got {describe(x)}")
        if self.mix_input:
            if self.strict_img_size and tuple(x.shape[-2:]) != (h, w):
                raise ValueError(
                    f"ppml.models.MIViT: with mix_input=True the input must be plain images [B, {c}, {h}, {w}] "
                    f"(img_size), got {describe(x)}"
                )
            x = mix_subpatches(x, self.patch_size, g)
        elif self.strict_img_size and tuple(x.shape[-2:]) != (h // g, w // g):
            hint = "; for plain images build the model with mix_input=True" if tuple(x.shape[-2:]) == (h, w) else ""
            raise ValueError(
                f"ppml.models.MIViT: input must be the MI ciphertext [B, {c}, {h // g}, {w // g}] "
                f"(ppml.mix_subpatches of {h}x{w} images with patch_size={self.patch_size}, grid={g}), "
                f"got {describe(x)}{hint}"
            )
        x = super().forward(x)  # [B, D, H/p, W/p]
        x = x.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else x.flatten(2).transpose(1, 2)
        return self.norm(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, img_size={self.img_size}, mix_input={self.mix_input}"


class MIViT(VisionTransformer):
    """timm's VisionTransformer with the MI patch embedding (the ``mivit_*`` models); position embedding kept.

    Args:
        grid: g, the MI grid (2 in the paper); must divide ``patch_size``.
        mix_input: take plain images ``[B, C, H, W]`` and apply ``ppml.mix_subpatches(x, patch_size, grid)`` inside
            the model (the paper's setting). Default False: the input is already the ciphertext.
        *args, **kwargs: any timm ``VisionTransformer`` argument except ``embed_layer``. ``img_size`` is the PLAIN
            image size (224 → a 112×112 ciphertext for g=2).

    Shapes:
        input (Tensor[B, C, H/g, W/g]): the ciphertext from :func:`ppml.mix_subpatches`, or Tensor[B, C, H, W] plain
            images with ``mix_input=True``.
        output: Tensor[B, num_classes] logits.
    """

    def __init__(self, *args: Any, grid: int = 2, mix_input: bool = False, **kwargs: Any) -> None:
        if "embed_layer" in kwargs:
            raise ValueError(
                f"ppml.models.MIViT: embed_layer is fixed to the MI patch embedding, got "
                f"embed_layer={kwargs['embed_layer']!r}"
            )
        embed = partial(_TimmMixedPatchEmbed, grid=grid, mix_input=mix_input)
        super().__init__(*args, embed_layer=embed, **kwargs)

    @property
    def grid(self) -> int:
        return self.patch_embed.grid

    @property
    def mix_input(self) -> bool:
        return self.patch_embed.mix_input


# ----------------------------------------------------------------------------------------------- timm registration


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # DeiT's data config. No url / hf_hub_id: ppml ships no weights. input_size is the plain image (for mivit too:
    # the data pipeline resizes plain images, then encrypts them).
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_NAMES})


def _create(model_cls: type[VisionTransformer], variant: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(
            f"ppml.models: {variant} has no pretrained weights (ppml ships none and downloads nothing), got "
            f"pretrained=True; build it with pretrained=False and train it, or load your own checkpoint "
            f"(checkpoint_path=... or model.load_state_dict)"
        )
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        False,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _model(model_cls: type[VisionTransformer], variant: str, size: str, pretrained: bool, kwargs: dict[str, Any]):
    args = dict(patch_size=16, **_SIZES[size])
    return _create(model_cls, variant, pretrained, **dict(args, **kwargs))


@register_model
def pevit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> PEFreeViT:
    """PE-free ViT-Ti/16 with RPE (``rpe=False`` to drop it); for RS ciphertext."""
    return _model(PEFreeViT, "pevit_tiny_patch16_224", "tiny", pretrained, kwargs)


@register_model
def pevit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> PEFreeViT:
    """PE-free ViT-S/16 with RPE (``rpe=False`` to drop it); for RS ciphertext."""
    return _model(PEFreeViT, "pevit_small_patch16_224", "small", pretrained, kwargs)


@register_model
def pevit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> PEFreeViT:
    """PE-free ViT-B/16 with RPE (``rpe=False`` to drop it); for RS ciphertext."""
    return _model(PEFreeViT, "pevit_base_patch16_224", "base", pretrained, kwargs)


@register_model
def mivit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> MIViT:
    """ViT-Ti/16 with the MI patch embedding (grid 2: input [B, 3, 112, 112]); for MI ciphertext."""
    return _model(MIViT, "mivit_tiny_patch16_224", "tiny", pretrained, kwargs)


@register_model
def mivit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MIViT:
    """ViT-S/16 with the MI patch embedding (grid 2: input [B, 3, 112, 112]); for MI ciphertext."""
    return _model(MIViT, "mivit_small_patch16_224", "small", pretrained, kwargs)


@register_model
def mivit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> MIViT:
    """ViT-B/16 with the MI patch embedding (grid 2: input [B, 3, 112, 112]); for MI ciphertext."""
    return _model(MIViT, "mivit_base_patch16_224", "base", pretrained, kwargs)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Builds one of ppml's ViTs (a thin wrapper over ``timm.create_model`` restricted to :data:`MODEL_NAMES`).

    Args:
        model_name: one of ``MODEL_NAMES`` (``pevit_{tiny,small,base}_patch16_224``,
            ``mivit_{tiny,small,base}_patch16_224``).
        pretrained: must stay False: ppml ships no weights.
        **kwargs: ``rpe`` and ``shuffle_input`` (pevit), ``grid`` and ``mix_input`` (mivit), and any timm
            VisionTransformer or ``timm.create_model`` argument (img_size, patch_size, num_classes, embed_dim, depth,
            num_heads, ...).

    Returns:
        The model (randomly initialised, train mode).
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(
            f"ppml.models.create_model: model_name must be one of {', '.join(MODEL_NAMES)}, got {model_name!r} "
            f"(for other timm models use timm.create_model)"
        )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
