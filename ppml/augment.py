"""Encrypted-domain augmentation: transforms of a ciphertext batch that equal plaintext augmentation.

The trainer only ever sees ciphertext (the data owner encrypts before training), so augmentation has to happen there. For a model that is
invariant to the order of its patch tokens (a ViT without position embedding), the transforms below are exact
equivalents of their plaintext counterparts:

- **Flips and 90° rotations, patch by patch** (:func:`hflip_patches`, :func:`vflip_patches`, :func:`rot90_patches`):
  flipping every patch of an RS ciphertext in place gives exactly the RS encryption of the flipped plain image under
  another (equally valid) key — the plain flip moves tile (r, c) to (r, W/p−1−c) and flips its content. A *whole*
  image flip of the ciphertext (``per_patch=False``) is also an RS encryption of the flipped image, and it is the
  one to use for MI ciphertexts seen by a model with position embeddings: ``flip(mix(x)) == mix(flip(x))``, while
  the per-patch flip of an MI ciphertext equals ``mix(flip(x))`` only up to a permutation of its blocks.
- **Photometric ops** (brightness, contrast, saturation, grayscale): per-pixel maps with per-image constants, so they
  commute with RS bit for bit. Contrast blends with the per-image mean of the grayscale, a permutation-invariant
  statistic computed here in an order-independent way (sorted, in float64) so that the commutation is exact. For MI
  the maps are linear before clamping, so they commute with the mean of sub-patches up to rounding — and exactly
  only while nothing is clamped (clamping a mean is not the mean of clamped values).
- **CutMix at patch granularity** (:func:`cutmix_patches`): swapping a random subset of patch cells is, for an RS
  ciphertext, the encryption of a plaintext patch-CutMix with a (different) random subset of cells — an exact
  equivalent in distribution.
- **Patch drop** (:func:`patch_drop`): random erasing at patch granularity; erasing k random cells of the ciphertext
  is erasing k random cells of the plain image.
- **Mixup** (:func:`mixup`): *not* an exact equivalent for RS with per-image keys. Pixel Mixup of two ciphertexts
  blends patch i of one image with patch i of the other, and those sit at unrelated plain positions: for a
  permutation-invariant model it is a Mixup of *randomly paired* patches, not the plaintext Mixup (which pairs the
  patches at the same position). It is the plaintext Mixup only when both images were shuffled with the same key.

Random-resized-crop has no exact equivalent.

Every random choice is drawn on the CPU from the optional ``generator`` (a CPU ``torch.Generator``; torch's global CPU
generator when ``None``) and then moved to the images' device, so a training run is reproducible and resumable from
the generator's state; the number of draws depends only on the batch size, the image size and the configuration,
never on the data. Everything is batched and vectorised, with per-*sample* random choices.

Photometric ops follow ``torchvision.transforms.v2.functional`` for float images in [0, 1] (results clamped to
[0, 1]), so apply them before normalising. With per-sample factors they reproduce torch's roundings, including the
fused multiply-add of ``add_(other, alpha=1 − f)`` (AVX2/AVX-512 CPUs, CUDA): float32 results equal torchvision's bit
for bit (contrast: up to its mean, see :func:`adjust_contrast`); float64, float16 and bfloat16 ones are within an ulp
(torch's own half-precision kernels round differently in the scalar tail of each thread's chunk).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int, check_probability, describe, is_real

__all__ = [
    "EncryptedAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "cutmix_patches",
    "hflip_patches",
    "mixed_cross_entropy",
    "mixup",
    "patch_drop",
    "random_patch_flip",
    "random_photometric",
    "rot90_patches",
    "to_grayscale",
    "vflip_patches",
]

_NS = "ppml.augment"

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_GRAY = (0.2989, 0.587, 0.114)


# ---- argument checks -----------------------------------------------------------------------------------------------


def _check_x(x, op: str, uint8_ok: bool = False) -> None:
    # uint8_ok: the op only moves pixels (flips, rotations), so uint8 ciphertext goes through unchanged in type; the
    # trainer keeps streamed uint8 batches uint8 up to ppml.patch_tokens, which casts and normalises in its one pass.
    ok = isinstance(x, Tensor) and x.dim() == 4 and (x.is_floating_point() or (uint8_ok and x.dtype == torch.uint8))
    if not ok:
        kind = "floating-point or uint8" if uint8_ok else "floating-point"
        raise ValueError(f"{_NS}.{op}: x must be a {kind} [B, C, H, W] tensor, got {describe(x)}")


def _check_patch(x: Tensor, patch_size, op: str) -> tuple[int, int]:
    """Returns the tile grid (H/p, W/p)."""
    check_positive_int(patch_size, f"{_NS}.{op}", "patch_size")
    H, W = x.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(f"{_NS}.{op}: patch_size must divide H and W, got patch_size={patch_size} for H={H}, W={W}")
    return H // patch_size, W // patch_size


def _check_prob(v, op: str, name: str) -> float:
    return check_probability(v, f"{_NS}.{op}", name)


def _check_nonneg(v, op: str, name: str) -> float:
    if not is_real(v) or v < 0:
        raise ValueError(f"{_NS}.{op}: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_labels(labels, batch: int, op: str) -> None:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or tuple(labels.shape) != (batch,):
        raise ValueError(f"{_NS}.{op}: labels must be int64 [B] with B={batch}, got {describe(labels)}")


def _check_generator(generator, op: str) -> None:
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        got = f"a generator on {generator.device}" if isinstance(generator, torch.Generator) else repr(generator)
        raise ValueError(f"{_NS}.{op}: generator must be None or a CPU torch.Generator, got {got}")


def _check_channels(x: Tensor, op: str) -> None:
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{_NS}.{op}: x must have 1 or 3 channels, got {describe(x)}")


def _factors(factor, x: Tensor, op: str, name: str = "factor") -> Tensor:
    """A float or a [B] tensor of factors >= 0 as float64 [B] on x's device (1 − factor is taken in float64, as
    torchvision takes it in Python)."""
    B = x.shape[0]
    if isinstance(factor, Tensor):
        if factor.dim() != 1 or factor.shape[0] != B or not factor.is_floating_point():
            raise ValueError(f"{_NS}.{op}: {name} must be a float or a floating-point [B] tensor with B={B}, "
                             f"got {describe(factor)}")
        f = factor.detach().to(device=x.device, dtype=torch.float64)
        if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise ValueError(f"{_NS}.{op}: {name} must be finite and >= 0, got a [B] tensor with min "
                             f"{float(f.min()) if B else 0.0!r}")
        return f
    return torch.full((B,), _check_nonneg(factor, op, name), dtype=torch.float64, device=x.device)


# ---- random draws (CPU, then moved) ---------------------------------------------------------------------------------


def _rand(shape, generator) -> Tensor:
    """Uniform [0, 1) float64 on the CPU."""
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def _beta(alpha: float, n: int, generator) -> Tensor:
    """n draws of Beta(alpha, alpha), float64 on the CPU (first coordinate of a 2-D Dirichlet)."""
    conc = torch.full((n, 2), alpha, dtype=torch.float64)
    lam = torch._sample_dirichlet(conc, generator=generator)[:, 0]
    return lam.nan_to_num(0.5).clamp(0.0, 1.0)


def _random_cells(keys: Tensor, count: Tensor) -> Tensor:
    """Bool [B, N]: in each row, the ``count[b]`` cells with the smallest keys (a uniform random subset)."""
    B, n = keys.shape
    order = keys.argsort(dim=1)
    chosen = torch.arange(n).expand(B, n) < count[:, None]
    return torch.zeros(B, n, dtype=torch.bool).scatter_(1, order, chosen)


# ---- geometric -----------------------------------------------------------------------------------------------------


def _tiles(x: Tensor, ph: int, pw: int) -> Tensor:
    B, C, H, W = x.shape
    return x.reshape(B, C, H // ph, ph, W // pw, pw)


def hflip_patches(x: Tensor, patch_size: int) -> Tensor:
    """Flips every p×p patch left–right in place (patches keep their positions).

    For an RS ciphertext ``shuffle_patches(x, p, perm)`` the result is exactly ``shuffle_patches(hflip(x), p, perm')``
    with ``perm'[b, i] = σ(perm[b, i])``, σ the tile move of the plain flip, (r, c) → (r, W/p−1−c): a plaintext flip
    under another valid key, bit for bit.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertext; ``patch_size`` divides H and W.
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).

    Returns:
        Tensor[B, C, H, W], a new contiguous tensor. Differentiable (a permutation of pixels).
    """
    _check_x(x, "hflip_patches", uint8_ok=True)
    _check_patch(x, patch_size, "hflip_patches")
    return _tiles(x, patch_size, patch_size).flip(5).reshape(x.shape)


def vflip_patches(x: Tensor, patch_size: int) -> Tensor:
    """Flips every p×p patch upside down in place; the plain vflip's tile move is (r, c) → (H/p−1−r, c).

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertext; ``patch_size`` divides H and W.
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).

    Returns:
        Tensor[B, C, H, W]. Differentiable.
    """
    _check_x(x, "vflip_patches", uint8_ok=True)
    _check_patch(x, patch_size, "vflip_patches")
    return _tiles(x, patch_size, patch_size).flip(3).reshape(x.shape)


def rot90_patches(x: Tensor, patch_size: int, k: int = 1) -> Tensor:
    """Rotates every p×p patch by k·90° in place, in ``torch.rot90(img, k, dims=(-2, -1))``'s direction
    (counter-clockwise for k = 1).

    For a square image, the plain rotation moves tile (r, c) to (W/p−1−c, r) for k = 1; the per-patch rotation of an
    RS ciphertext is the RS encryption of the rotated image under the correspondingly re-indexed key. For a
    non-square image the result keeps [H, W] (each patch rotates) and equals, for a permutation-invariant model, the
    rotated image's tokens — but there is no [W, H] plain image with the same tile grid.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertext; ``patch_size`` divides H and W.
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).
        k: number of quarter turns (any int; taken mod 4).

    Returns:
        Tensor[B, C, H, W]. Differentiable.
    """
    _check_x(x, "rot90_patches", uint8_ok=True)
    _check_patch(x, patch_size, "rot90_patches")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{_NS}.rot90_patches: k must be an int, got {k!r}")
    return torch.rot90(_tiles(x, patch_size, patch_size), k % 4, dims=(3, 5)).reshape(x.shape)


@functools.lru_cache(maxsize=32)
def _dihedral_maps(H: int, W: int, tile: int | None, device: str) -> Tensor:
    """Int64 [16, H*W]: row ``h + 2v + 4k`` holds, for every output pixel, the flat input pixel it takes when each
    tile (the whole image when ``tile`` is None) is flipped left–right (h), then upside down (v), then rotated k
    quarter turns."""
    ph, pw = (H, W) if tile is None else (tile, tile)
    grid = torch.arange(H * W, dtype=torch.int64).reshape(1, 1, H, W)
    rows = []
    for code in range(16):
        h, v, k = code & 1, (code >> 1) & 1, code >> 2
        t = _tiles(grid, ph, pw)
        if h:
            t = t.flip(5)
        if v:
            t = t.flip(3)
        if k and ph == pw:
            t = torch.rot90(t, k, dims=(3, 5))
        rows.append(t.reshape(H * W))  # (k with ph != pw never selected: checked by the caller)
    return torch.stack(rows).to(device)


def random_patch_flip(
    x: Tensor,
    patch_size: int,
    p_h: float = 0.5,
    p_v: float = 0.0,
    p_rot90: float = 0.0,
    *,
    per_patch: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random flips and quarter turns, chosen per sample (the same transform for all patches of one image).

    Each image is flipped left–right with probability ``p_h``, then upside down with probability ``p_v``, then, with
    probability ``p_rot90``, rotated by k quarter turns with k uniform in {1, 2, 3}. One gather over the batch.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertext; ``patch_size`` divides H and W.
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).
        p_h, p_v, p_rot90: probabilities in [0, 1].
        per_patch: transform every patch in place (default; exact for a permutation-invariant model on RS or MI
            ciphertexts). ``False`` transforms the whole ciphertext instead (patches move too): exact for RS, and for
            MI ciphertexts fed to a model *with* position embeddings; rotations then need H == W.
        generator: CPU generator for the draws (torch's global CPU generator when None).

    Returns:
        Tensor[B, C, H, W] (``x`` itself when all probabilities are 0). Differentiable.
    """
    op = "random_patch_flip"
    _check_x(x, op, uint8_ok=True)
    _check_patch(x, patch_size, op)
    p_h, p_v, p_rot90 = (_check_prob(v, op, n) for v, n in ((p_h, "p_h"), (p_v, "p_v"), (p_rot90, "p_rot90")))
    _check_generator(generator, op)
    B, C, H, W = x.shape
    if not per_patch and p_rot90 > 0 and H != W:
        raise ValueError(f"{_NS}.{op}: whole-image rotations (per_patch=False, p_rot90 > 0) need H == W, "
                         f"got H={H}, W={W}")
    if p_h == p_v == p_rot90 == 0.0:
        return x
    u = _rand((B, 3), generator)
    k = torch.randint(1, 4, (B,), generator=generator) if p_rot90 > 0 else torch.zeros(B, dtype=torch.int64)
    code = (u[:, 0] < p_h).long() + 2 * (u[:, 1] < p_v).long() + 4 * torch.where(u[:, 2] < p_rot90, k, 0)
    if not bool(code.any()):
        return x
    maps = _dihedral_maps(H, W, patch_size if per_patch else None, str(x.device))
    idx = maps[code.to(x.device)]  # [B, H*W]
    return x.reshape(B, C, H * W).gather(2, idx[:, None, :].expand(B, C, H * W)).reshape(B, C, H, W)


# ---- photometric ---------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fma(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """``a·b + c`` with one rounding, as torch's ``c.add(a, alpha=b)`` computes it on FMA CPUs (AVX2/AVX-512) and on
    CUDA, for per-sample ``b`` (``alpha`` must be a scalar).

    float32: the product of two float32 values is exact in float64; the float64 sum is made round-to-odd (TwoSum
    error, then a one-ulp nudge off an even result), and rounding that to float32 is the correctly rounded result
    (53 ≥ 24 + 2 bits). float64: an unfused multiply-add (can differ from a fused one by 1 ulp).
    """
    if a.dtype == torch.float64:
        return c + a * b
    p = a.double() * b.double()
    c = c.double()
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    nudge = (err != 0) & ((s.view(torch.int64) & 1) == 0) & s.isfinite()
    toward = torch.where(err > 0, math.inf, -math.inf).to(s.dtype)
    return torch.where(nudge, torch.nextafter(s, toward), s).float()


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend`` for float images with per-sample ratios: ``(x·r + other·(1 − r)).clamp(0, 1)``, with
    torch's roundings: ``x·r`` rounded to x's dtype, then a fused multiply-add in float32 (float64 for float64).

    As torch's CPU kernels do, ``r`` enters the product as a float32 but ``1 − r`` (the ``alpha`` of ``add_``) is
    first rounded to x's dtype — which matters for float16/bfloat16 only."""
    acc = _acc(x.dtype)
    r = factor.view(-1, 1, 1, 1)
    t = (x.to(acc) * r.to(acc)).to(x.dtype)
    out = _fma(other.to(acc), (1.0 - r).to(x.dtype).to(acc), t.to(acc))
    return out.to(x.dtype).clamp_(0.0, 1.0)


def _gray(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma in x's dtype, with torchvision's exact op sequence (same roundings)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return r.mul(_GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def _invariant_mean(gray: Tensor) -> Tensor:
    """Per-image mean of ``gray`` [B, 1, H, W] as [B] in its dtype, independent of the order of the pixels: the values
    are sorted and summed in float64, so any permutation of pixels (RS) gives the same bits."""
    B = gray.shape[0]
    flat = gray.reshape(B, -1).double()
    n = flat.shape[1]
    return (flat.sort(dim=1).values.sum(dim=1) / max(n, 1)).to(gray.dtype)


def adjust_brightness(x: Tensor, factor: float | Tensor) -> Tensor:
    """``(x·factor).clamp(0, 1)`` per image — torchvision's ``adjust_brightness`` for float images, bit for bit.

    Args:
        x (Tensor[B, C, H, W]): floating-point images or ciphertexts in [0, 1] (any C).
        factor: a float >= 0, or Tensor[B] of per-image factors.

    Returns:
        Tensor[B, C, H, W]. Commutes with RS exactly (a per-pixel map). Differentiable in x.
    """
    _check_x(x, "adjust_brightness")
    f = _factors(factor, x, "adjust_brightness")
    acc = _acc(x.dtype)
    return (x.to(acc) * f.view(-1, 1, 1, 1).to(acc)).to(x.dtype).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    """Blends each image with the mean of its grayscale: ``(x·f + mean(gray(x))·(1 − f)).clamp(0, 1)``, as
    torchvision's ``adjust_contrast`` for float images.

    The mean is computed order-independently (sorted, float64), so the op commutes with RS bit for bit; torchvision's
    float32 mean depends on the summation order, so the two can differ by an ulp of the mean (and then the result by
    ≈ |1 − f| of that). Everything else has torchvision's roundings.

    Args:
        x (Tensor[B, C, H, W]): floating-point images or ciphertexts in [0, 1], C in {1, 3}.
        factor: a float >= 0, or Tensor[B].

    Returns:
        Tensor[B, C, H, W]. Differentiable in x (through the mean too).
    """
    _check_x(x, "adjust_contrast")
    _check_channels(x, "adjust_contrast")
    f = _factors(factor, x, "adjust_contrast")
    return _blend(x, _invariant_mean(_gray(x)).view(-1, 1, 1, 1), f)


def adjust_saturation(x: Tensor, factor: float | Tensor) -> Tensor:
    """Blends each pixel with its own luma: ``(x·f + gray(x)·(1 − f)).clamp(0, 1)`` — torchvision's
    ``adjust_saturation`` for float images (float32: bit for bit on FMA CPUs and CUDA). Single-channel images are
    returned as they are.

    Args:
        x (Tensor[B, C, H, W]): floating-point images or ciphertexts in [0, 1], C in {1, 3}.
        factor: a float >= 0, or Tensor[B].

    Returns:
        Tensor[B, C, H, W]. Commutes with RS exactly (a per-pixel map). Differentiable in x.
    """
    _check_x(x, "adjust_saturation")
    _check_channels(x, "adjust_saturation")
    f = _factors(factor, x, "adjust_saturation")
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x), f)


def to_grayscale(x: Tensor, num_output_channels: int = 1) -> Tensor:
    """ITU-R 601-2 luma ``0.2989·R + 0.587·G + 0.114·B`` — torchvision's ``rgb_to_grayscale``, bit for bit.

    Args:
        x (Tensor[B, C, H, W]): floating-point images or ciphertexts, C in {1, 3}.
        num_output_channels: 1 or 3 (3 repeats the luma, keeping an RGB model's input shape).

    Returns:
        Tensor[B, num_output_channels, H, W]. Commutes with RS exactly. Differentiable in x.
    """
    _check_x(x, "to_grayscale")
    _check_channels(x, "to_grayscale")
    if num_output_channels not in (1, 3):
        raise ValueError(f"{_NS}.to_grayscale: num_output_channels must be 1 or 3, got {num_output_channels!r}")
    g = _gray(x)
    if num_output_channels == 1:
        return g.clone() if g is x else g
    return g.expand(-1, 3, -1, -1).contiguous()


def _jitter(strength: float, B: int, generator) -> Tensor:
    """ColorJitter's range: factors uniform in [max(0, 1 − s), 1 + s], float64 [B] on the CPU."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return lo + (hi - lo) * _rand((B,), generator)


def random_photometric(
    x: Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    grayscale_p: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample colour jitter (like torchvision's ``ColorJitter`` without hue) then random grayscale.

    Each enabled op draws one factor per image, uniform in [max(0, 1 − s), 1 + s]. The order is fixed — brightness,
    contrast, saturation, grayscale — where ``ColorJitter`` shuffles it per call (a per-sample order would cost one
    pass per candidate order). Grayscale keeps C channels.

    Args:
        x (Tensor[B, C, H, W]): floating-point images or ciphertexts in [0, 1]; C in {1, 3} when contrast,
            saturation or grayscale is on.
        brightness, contrast, saturation: jitter strengths s >= 0 (0 = off).
        grayscale_p: probability in [0, 1] that an image is turned to grayscale.
        generator: CPU generator for the draws.

    Returns:
        Tensor[B, C, H, W] (``x`` itself when everything is off). Commutes with RS exactly. Differentiable in x.
    """
    op = "random_photometric"
    _check_x(x, op)
    brightness = _check_nonneg(brightness, op, "brightness")
    contrast = _check_nonneg(contrast, op, "contrast")
    saturation = _check_nonneg(saturation, op, "saturation")
    grayscale_p = _check_prob(grayscale_p, op, "grayscale_p")
    _check_generator(generator, op)
    if contrast or saturation or grayscale_p:
        _check_channels(x, op)
    B = x.shape[0]
    if brightness:
        x = adjust_brightness(x, _jitter(brightness, B, generator).to(x.device))
    if contrast:
        x = adjust_contrast(x, _jitter(contrast, B, generator).to(x.device))
    if saturation:
        x = adjust_saturation(x, _jitter(saturation, B, generator).to(x.device))
    if grayscale_p:
        pick = (_rand((B,), generator) < grayscale_p).to(x.device)
        x = torch.where(pick.view(-1, 1, 1, 1), to_grayscale(x, x.shape[1]), x)
    return x


# ---- mixing --------------------------------------------------------------------------------------------------------


def _no_mix(x: Tensor, labels: Tensor):
    return x, labels, labels, torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


def mixup(
    x: Tensor, labels: Tensor, alpha: float, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel Mixup with a per-sample weight: ``x_b ← lam_b·x_b + (1 − lam_b)·x_{π(b)}``, lam_b ~ Beta(alpha, alpha),
    π a random permutation of the batch (an image may be paired with itself; then ``labels_b == labels_a``).

    Not an exact equivalent for RS with per-image keys: it blends patch i of one ciphertext with patch i of another,
    which sit at unrelated plain positions — for a permutation-invariant model a Mixup of randomly paired patches,
    not the plaintext Mixup (which pairs patches at the same position). Exact only for images shuffled with one key.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertexts.
        labels (Tensor[B] int64).
        alpha: Beta parameter >= 0 (0: no mixing).
        generator: CPU generator (draws lam, then π).

    Returns:
        ``(x_mixed, labels_a, labels_b, lam)``: Tensor[B, C, H, W], Tensor[B] int64 (= labels), Tensor[B] int64
        (partners' labels), Tensor[B] float32 in [0, 1] (weight of labels_a), all on x's device. Train with
        :func:`mixed_cross_entropy`.
    """
    op = "mixup"
    _check_x(x, op)
    _check_labels(labels, x.shape[0], op)
    alpha = _check_nonneg(alpha, op, "alpha")
    _check_generator(generator, op)
    B = x.shape[0]
    if alpha == 0 or B == 0:
        return _no_mix(x, labels)
    lam = _beta(alpha, B, generator).float().to(x.device)
    partner = torch.randperm(B, generator=generator).to(x.device)
    acc = _acc(x.dtype)
    w = lam.to(acc).view(-1, 1, 1, 1)
    mixed = (x.to(acc) * w + x[partner].to(acc) * (1 - w)).to(x.dtype)
    return mixed, labels, labels[partner], lam


def cutmix_patches(
    x: Tensor, labels: Tensor, alpha: float, patch_size: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CutMix at patch granularity: a random subset of each image's patch cells is replaced by the same cells of a
    partner image (π, a random permutation of the batch).

    The number of replaced cells is ``round((1 − λ)·N)`` with λ ~ Beta(alpha, alpha) per sample and N = (H/p)·(W/p);
    the cells are a uniform random subset. For an RS ciphertext this is exactly (in distribution) the encryption of a
    plaintext patch-CutMix with a random cell subset, so for a permutation-invariant model it is an exact equivalent.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertexts; ``patch_size`` divides H and W.
        labels (Tensor[B] int64).
        alpha: Beta parameter >= 0 (0: no mixing).
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).
        generator: CPU generator (draws λ, the cells, then π).

    Returns:
        ``(x_mixed, labels_a, labels_b, lam)`` as :func:`mixup`, with lam (float32 [B]) the exact fraction of cells
        kept from the image itself, ``(N − replaced) / N``.
    """
    op = "cutmix_patches"
    _check_x(x, op)
    th, tw = _check_patch(x, patch_size, op)
    _check_labels(labels, x.shape[0], op)
    alpha = _check_nonneg(alpha, op, "alpha")
    _check_generator(generator, op)
    B, C, H, W = x.shape
    if alpha == 0 or B == 0:
        return _no_mix(x, labels)
    n = th * tw
    replaced = torch.round((1.0 - _beta(alpha, B, generator)) * n).long().clamp_(0, n)
    cells = _random_cells(_rand((B, n), generator), replaced)
    partner = torch.randperm(B, generator=generator).to(x.device)
    lam = ((n - replaced).double() / n).float().to(x.device)
    mask = cells.to(x.device).view(B, 1, th, 1, tw, 1)
    p = patch_size
    mixed = torch.where(mask, _tiles(x[partner], p, p), _tiles(x, p, p)).reshape(B, C, H, W)
    return mixed, labels, labels[partner], lam


def patch_drop(
    x: Tensor, patch_size: int, ratio: float, *, fill: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Random erasing at patch granularity: ``round(ratio·N)`` random patch cells of each image (Python's ``round``,
    half to even) are set to ``fill``.

    Args:
        x (Tensor[B, C, H, W]): floating-point ciphertexts; ``patch_size`` divides H and W.
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).
        ratio: share of cells to drop, in [0, 1].
        fill: the value written (0.0 is black for images in [0, 1]).
        generator: CPU generator for the cell choice.

    Returns:
        Tensor[B, C, H, W] (``x`` itself when no cell is dropped). Differentiable in x (zero gradient at dropped cells).
    """
    op = "patch_drop"
    _check_x(x, op)
    th, tw = _check_patch(x, patch_size, op)
    ratio = _check_prob(ratio, op, "ratio")
    if not is_real(fill):
        raise ValueError(f"{_NS}.{op}: fill must be a finite number, got {fill!r}")
    _check_generator(generator, op)
    B, C, H, W = x.shape
    n = th * tw
    k = round(ratio * n)
    if k == 0 or B == 0:
        return x
    cells = _random_cells(_rand((B, n), generator), torch.full((B,), k, dtype=torch.int64))
    mask = cells.to(x.device).view(B, 1, th, 1, tw, 1)
    return _tiles(x, patch_size, patch_size).masked_fill(mask, float(fill)).reshape(B, C, H, W)


def mixed_cross_entropy(
    logits: Tensor, labels_a: Tensor, labels_b: Tensor, lam: Tensor | float, label_smoothing: float = 0.0
) -> Tensor:
    """Mean over the batch of ``lam·CE(logits, labels_a) + (1 − lam)·CE(logits, labels_b)``.

    Args:
        logits (Tensor[B, K]).
        labels_a, labels_b (Tensor[B] int64): as returned by :func:`mixup` / :func:`cutmix_patches` /
            :class:`EncryptedAugment`.
        lam (Tensor[B] or float): weight of ``labels_a``.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        A scalar tensor (float32 for float32 logits). Differentiable in logits.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"{_NS}.mixed_cross_entropy: logits must be [B, K], got {describe(logits)}")
    B = logits.shape[0]
    _check_labels(labels_a, B, "mixed_cross_entropy")
    _check_labels(labels_b, B, "mixed_cross_entropy")
    ce_a = F.cross_entropy(logits, labels_a, reduction="none", label_smoothing=label_smoothing)
    ce_b = F.cross_entropy(logits, labels_b, reduction="none", label_smoothing=label_smoothing)
    if isinstance(lam, Tensor):
        if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] != B):
            raise ValueError(f"{_NS}.mixed_cross_entropy: lam must be a float or [B] with B={B}, got {describe(lam)}")
        lam = lam.to(device=ce_a.device, dtype=ce_a.dtype)
    return (lam * ce_a + (1 - lam) * ce_b).mean()


# ---- composed ------------------------------------------------------------------------------------------------------


class EncryptedAugment(nn.Module):
    """The encrypted-domain augmentation pipeline, per batch: random flips/rotations → colour jitter and grayscale →
    patch drop → Mixup or patch-CutMix.

    Mixing follows timm's ``Mixup``: with probability ``mix_prob`` a batch is mixed; when both alphas are > 0 it uses
    CutMix with probability ``switch_prob`` and Mixup otherwise (lam per sample). It has no parameters and applies in
    train and eval mode alike: call it on training batches only.

    Args:
        patch_size: the ciphertext's patch size (RS: p; MI: p/g).
        hflip, vflip, rot90: per-sample probabilities of a left–right flip, an upside-down flip and a k·90° rotation
            (k uniform in {1, 2, 3}); see :func:`random_patch_flip`.
        brightness, contrast, saturation: ColorJitter strengths (0 = off); grayscale: its probability.
        mixup_alpha, cutmix_alpha: Beta parameters (0 = off).
        mix_prob: probability that a batch is mixed; switch_prob: probability of CutMix when both are on.
        patch_drop: share of patch cells dropped per image; drop_fill: the value they get.
        per_patch: flip/rotate every patch in place (default) or the whole ciphertext (MI with position embeddings).

    Shapes:
        forward(x (Tensor[B, C, H, W]) float, labels (Tensor[B]) int64, generator=None) →
        ``(x, labels_a, labels_b, lam)`` with lam float32 [B]; without mixing, labels_b = labels_a and lam = 1.
    """

    def __init__(
        self,
        patch_size: int,
        *,
        hflip: float = 0.5,
        vflip: float = 0.0,
        rot90: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        grayscale: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        switch_prob: float = 0.5,
        patch_drop: float = 0.0,
        drop_fill: float = 0.0,
        per_patch: bool = True,
    ) -> None:
        super().__init__()
        op = "EncryptedAugment"
        check_positive_int(patch_size, f"{_NS}.{op}", "patch_size")
        self.patch_size = patch_size
        self.hflip = _check_prob(hflip, op, "hflip")
        self.vflip = _check_prob(vflip, op, "vflip")
        self.rot90 = _check_prob(rot90, op, "rot90")
        self.brightness = _check_nonneg(brightness, op, "brightness")
        self.contrast = _check_nonneg(contrast, op, "contrast")
        self.saturation = _check_nonneg(saturation, op, "saturation")
        self.grayscale = _check_prob(grayscale, op, "grayscale")
        self.mixup_alpha = _check_nonneg(mixup_alpha, op, "mixup_alpha")
        self.cutmix_alpha = _check_nonneg(cutmix_alpha, op, "cutmix_alpha")
        self.mix_prob = _check_prob(mix_prob, op, "mix_prob")
        self.switch_prob = _check_prob(switch_prob, op, "switch_prob")
        self.patch_drop = _check_prob(patch_drop, op, "patch_drop")
        if not is_real(drop_fill):
            raise ValueError(f"{_NS}.{op}: drop_fill must be a finite number, got {drop_fill!r}")
        self.drop_fill = float(drop_fill)
        self.per_patch = bool(per_patch)

    def forward(
        self, x: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        op = "EncryptedAugment"
        _check_x(x, op, uint8_ok=self.moves_pixels_only)
        _check_patch(x, self.patch_size, op)
        _check_labels(labels, x.shape[0], op)
        _check_generator(generator, op)
        p = self.patch_size
        x = random_patch_flip(x, p, self.hflip, self.vflip, self.rot90, per_patch=self.per_patch, generator=generator)
        if x.dtype != torch.uint8:  # uint8 only gets here when both are off (moves_pixels_only)
            x = random_photometric(x, self.brightness, self.contrast, self.saturation, self.grayscale,
                                   generator=generator)  # fmt: skip
            x = patch_drop(x, p, self.patch_drop, fill=self.drop_fill, generator=generator)
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            u = _rand((2,), generator)
            if u[0] < self.mix_prob:
                use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or u[1] < self.switch_prob)
                if use_cutmix:
                    return cutmix_patches(x, labels, self.cutmix_alpha, p, generator=generator)
                return mixup(x, labels, self.mixup_alpha, generator=generator)
        return _no_mix(x, labels)

    @property
    def moves_pixels_only(self) -> bool:
        """True when every active step is a flip or rotation (no colour, drop or mixing): uint8 input is then
        accepted and returned uint8."""
        return not (self.brightness or self.contrast or self.saturation or self.grayscale or self.patch_drop
                    or self.mixup_alpha or self.cutmix_alpha)  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"patch_size={self.patch_size}"]
        for name in ("hflip", "vflip", "rot90", "brightness", "contrast", "saturation", "grayscale", "mixup_alpha",
                     "cutmix_alpha", "patch_drop"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        if self.mixup_alpha or self.cutmix_alpha:
            parts.append(f"mix_prob={self.mix_prob}")
            if self.mixup_alpha and self.cutmix_alpha:
                parts.append(f"switch_prob={self.switch_prob}")
        if self.patch_drop and self.drop_fill:
            parts.append(f"drop_fill={self.drop_fill}")
        if not self.per_patch:
            parts.append("per_patch=False")
        return ", ".join(parts)
