"""The MI patch embedding: a ViT's patch embedding adapted to images whose p×p patches were mixed to q×q blocks."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from .._checks import check_positive_int


class MixedPatchEmbed(nn.Module):
    """Embeds each q×q mixed block (q = p/g) of an MI-encrypted image: linear (a q×q convolution with stride q) →
    GELU → 1×1 linear D→D, as in the paper's code. Position embeddings stay with the model: MI does not move patches.

    Why a q×q linear embedding: for the plain-mean MI, ``proj(mix(x))`` equals a q×q stride-q convolution of the plain
    image averaged over each g×g group — the first layer sees the average of what a plain ViT's embedding would see
    for the patch's sub-patches.

    Args:
        patch_size: p, the patch size of the plain image (16 in the paper).
        grid: g (2 in the paper); the mixed image is [B, C, H/g, W/g].
        in_chans: C.
        embed_dim: D.
        img_size: plain-image size (int or (H, W)), to expose ``num_patches`` and ``grid_size`` like timm's PatchEmbed.
        flatten: return tokens ``[B, N, D]`` (default) instead of a map ``[B, D, H/p, W/p]``.

    Shapes:
        input (Tensor[B, C, H/g, W/g]): the ciphertext from :func:`ppml.mix_subpatches` (float), or its tokens
            Tensor[B, N, C·q·q] (``ppml.patch_tokens(mixed, p // g)``; tokens only with ``flatten=True``).
        output: Tensor[B, N, D] with N = (H/p)·(W/p), or Tensor[B, D, H/p, W/p] when ``flatten=False``.
    """

    def __init__(
        self,
        patch_size: int = 16,
        grid: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        img_size: int | tuple[int, int] | None = None,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("patch_size", patch_size), ("grid", grid), ("in_chans", in_chans), ("embed_dim", embed_dim)):
            check_positive_int(value, "ppml.models.MixedPatchEmbed", name)
        if patch_size % grid:
            raise ValueError(
                f"ppml.models.MixedPatchEmbed: grid must divide patch_size, got grid={grid} for patch_size={patch_size}"
            )
        self.patch_size, self.grid, self.block = patch_size, grid, patch_size // grid
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.block, stride=self.block)
        self.act = nn.GELU()
        self.fc = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)
        self.img_size = self.grid_size = self.num_patches = None
        if img_size is not None:
            h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            if h % patch_size or w % patch_size:
                raise ValueError(
                    f"ppml.models.MixedPatchEmbed: patch_size must divide img_size, got patch_size={patch_size} "
                    f"for img_size={(h, w)}"
                )
            self.img_size, self.grid_size = (h, w), (h // patch_size, w // patch_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """The embedding of the ciphertext's q×q blocks given as tokens [B, N, C·q·q] (:func:`ppml.patch_tokens` at
        q = p/g): both convolutions applied as the linear maps they are. Returns Tensor[B, N, D]."""
        w = self.proj.weight
        k = w[0].numel()
        if tokens.dim() != 3 or tokens.shape[-1] != k:
            raise ValueError(
                f"ppml.models.MixedPatchEmbed: tokens must be [B, N, C*q*q] with C*q*q={k} (ppml.patch_tokens(mixed, "
                f"{self.block})), got {list(tokens.shape)}"
            )
        x = self.act(F.linear(tokens.to(w.dtype), w.flatten(1), self.proj.bias))
        return F.linear(x, self.fc.weight.flatten(1), self.fc.bias)

    def forward(self, mixed: Tensor) -> Tensor:
        if mixed.dim() == 3 and self.flatten and mixed.shape[-1] == self.proj.weight[0].numel():
            return self.embed_tokens(mixed)
        if mixed.dim() != 4 or mixed.shape[1] != self.proj.in_channels:
            raise ValueError(
                f"ppml.models.MixedPatchEmbed: input must be [B, {self.proj.in_channels}, H/g, W/g], got "
                f"{list(mixed.shape)}"
            )
        h, w = mixed.shape[-2:]
        if h % self.block or w % self.block:
            raise ValueError(
                f"ppml.models.MixedPatchEmbed: the mixed image's H/g and W/g must be multiples of p/g={self.block}, "
                f"got {h}x{w}"
            )
        x = self.fc(self.act(self.proj(mixed.to(self.proj.weight.dtype))))
        return x.flatten(2).transpose(1, 2) if self.flatten else x

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid={self.grid}"
