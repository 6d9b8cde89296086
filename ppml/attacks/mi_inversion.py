"""Attacks on MI (mixing sub-patches): reconstruct the plain image from ``Y = ppml.mix_subpatches(X, p, g)``.

MI maps each p×p patch to the mean of its g×g sub-patches, a q×q block (q = p/g): a linear map ``A`` with g² unknown
pixels per known one. What the attacker can do without learning:

* :func:`unmix_thumbnail` — the mean of a block is the mean of its patch, exactly: a (H/p)×(W/p) thumbnail,
  upsampled (nearest, bilinear or bicubic) to H×W.
* :func:`unmix_least_norm` — the minimum-norm solution of ``A X = Y``, ``A⁺ Y``. The rows of A have disjoint
  supports, so ``A Aᵀ`` is diagonal and ``A⁺ = Aᵀ (A Aᵀ)⁻¹`` is explicit: with weights w (the plain mean has
  w_k = 1/g²) sub-patch k of a patch is ``w_k / Σ_j w_j² · block``; for the mean, every sub-patch is a copy of the
  block. Exactly consistent: ``mix_subpatches(A⁺ Y) == Y``.
* :func:`unmix_smooth` — the least-norm solution plus a smoothness prior: ``min ‖∇X‖²`` subject to ``A X = Y``
  (forward differences, all image pixels), solved by conjugate gradients on the null space of A
  (``X = A⁺ Y + z``, ``z ← z − A⁺ A z``), so the answer stays exactly consistent.

And with learning (:class:`UnmixDecoder`, :func:`train_unmix_decoder`): a small dilated conv net, trained on the
same public images and with the same settings and resumable, cacheable training loop as the RS position attacker
(:mod:`ppml.attacks.kit`), predicts at every ciphertext pixel a correction of the g² plain pixels averaged into
it, starting from the smooth solution and centred so that the result stays exactly on ``A X = Y``.

Every function takes the ciphertext ``[B, C, H/g, W/g]`` (or one ``[C, H/g, W/g]``) and returns ``[B, C, H, W]`` in
the ciphertext's dtype and value scale (the plain image's: MI is a mean, so a 0..255 image gives a 0..255
ciphertext); ``value_range=(lo, hi)`` clamps the reconstruction to the range pixels are known to lie in (which can
break exact consistency). Score with :func:`ppml.attacks.psnr` / :func:`ppml.attacks.ssim`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, describe
from ..ops.mix_subpatches import mix_subpatches
from .kit import TrainSettings, fit, load_trained, standardize

METHODS = ("thumbnail", "least_norm", "smooth", "decoder")
# The decoder's training budget in `ppml attack` and benchmarks/attack_learned.py (one cache entry per p, g, size).
DECODER_SETTINGS: dict = dict(steps=150, batch_size=16, lr=2e-3)
_MODES = ("nearest", "bilinear", "bicubic")


# ---- checks ----------------------------------------------------------------------------------------------------------


def _check_mixed(mixed, patch_size, grid, op: str, weights=None) -> tuple[Tensor, bool]:
    """Validates the ciphertext (and optional MI weights); returns it as ``[B, C, H/g, W/g]`` and whether it was one
    image."""
    check_positive_int(patch_size, op, "patch_size")
    check_positive_int(grid, op, "grid")
    if patch_size % grid:
        raise ValueError(f"{op}: grid must divide patch_size, got grid={grid}, patch_size={patch_size}")
    if not isinstance(mixed, Tensor) or mixed.dim() not in (3, 4):
        raise ValueError(f"{op}: mixed must be the MI ciphertext [B, C, H/g, W/g] or [C, H/g, W/g], got "
                         f"{describe(mixed)}")  # fmt: skip
    if not mixed.is_floating_point():
        raise ValueError(f"{op}: mixed must be floating point (ppml.mix_subpatches returns float), got "
                         f"{describe(mixed)}")  # fmt: skip
    single = mixed.dim() == 3
    y = mixed.unsqueeze(0) if single else mixed
    q = patch_size // grid
    h, w = y.shape[-2:]
    if h == 0 or w == 0 or h % q or w % q or y.shape[1] == 0:
        raise ValueError(f"{op}: mixed's H and W must be positive multiples of patch_size/grid = {q} (one q×q block "
                         f"per patch), got {describe(mixed)}")  # fmt: skip
    if weights is not None:
        n = (h // q) * (w // q)
        want = (y.shape[0], n, grid * grid)
        if not isinstance(weights, Tensor) or not weights.is_floating_point() or tuple(weights.shape) != want:
            raise ValueError(f"{op}: weights must be float [B, N, g*g] = {list(want)} (N patches), got "
                             f"{describe(weights)}")  # fmt: skip
    return y, single


def _check_range(value_range, op: str):
    if value_range is None:
        return None
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: value_range must be None or (lo, hi) with lo < hi, got {value_range!r}") from None
    if not lo < hi:
        raise ValueError(f"{op}: value_range must be None or (lo, hi) with lo < hi, got {value_range!r}")
    return lo, hi


def _finish(x: Tensor, like: Tensor, single: bool, value_range) -> Tensor:
    if value_range is not None:
        x = x.clamp(*value_range)
    x = x.to(like.dtype)
    return x[0] if single else x


# ---- closed forms ----------------------------------------------------------------------------------------------------


def _spread(y: Tensor, patch_size: int, grid: int, coef: Tensor | None = None) -> Tensor:
    """``Tensor[B, C, H/g, W/g] -> Tensor[B, C, H, W]``: sub-patch k of each patch = ``coef[b, n, k]`` × the patch's
    block (a copy of the block when ``coef`` is None). Row-major patches n and sub-patches k = i·g + j, as in
    :func:`ppml.mix_subpatches`."""
    b, c, h, w = y.shape
    g, q = grid, patch_size // grid
    th, tw = h // q, w // q
    blocks = y.reshape(b, c, th, 1, q, tw, 1, q)
    if coef is None:
        out = blocks.expand(b, c, th, g, q, tw, g, q)
    else:
        k = coef.to(y.dtype).reshape(b, 1, th, tw, g, g).permute(0, 1, 2, 4, 3, 5).reshape(b, 1, th, g, 1, tw, g, 1)
        out = blocks * k
    return out.reshape(b, c, th * patch_size, tw * patch_size)


def _pinv_coef(weights: Tensor | None) -> Tensor | None:
    """``w_k / Σ_j w_j²`` per patch (0 where all weights are 0): the coefficients of ``A⁺``; None for the mean."""
    if weights is None:
        return None
    w = weights.double()
    s = w.square().sum(-1, keepdim=True)
    return torch.where(s > 0, w / s.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(w))


def unmix_least_norm(mixed: Tensor, patch_size: int = 16, grid: int = 2, weights: Tensor | None = None) -> Tensor:
    """The minimum-norm solution ``A⁺ Y`` of ``mix_subpatches(X, p, g, weights) = Y``.

    Args:
        mixed (Tensor[B, C, H/g, W/g] or Tensor[C, H/g, W/g]): the MI ciphertext (float).
        patch_size, grid: p and g of the encryption.
        weights (Tensor[B, N, g*g], optional): the mixing weights if known (keyed MI); None is the plain mean.

    Returns:
        Tensor[B, C, H, W] (Tensor[C, H, W] for one image) of ``mixed``'s dtype: for the mean every sub-patch is a
        copy of its block; with weights, sub-patch k is ``w_k / Σ w² ×`` the block. ``mix_subpatches`` of it gives
        back ``mixed`` (up to rounding). Linear, so differentiable in ``mixed``.
    """
    y, single = _check_mixed(mixed, patch_size, grid, "ppml.attacks.unmix_least_norm", weights)
    out = _spread(y.double(), patch_size, grid, _pinv_coef(weights))
    return _finish(out, mixed, single, None)


def unmix_thumbnail(
    mixed: Tensor, patch_size: int = 16, grid: int = 2, *, mode: str = "bicubic", value_range=None
) -> Tensor:
    """Upsampled patch means: the mean of each q×q block of the ciphertext is (for the plain mean MI) exactly the mean
    of its p×p patch.

    Args:
        mixed (Tensor[B, C, H/g, W/g] or Tensor[C, H/g, W/g]): the MI ciphertext (float).
        patch_size, grid: p and g.
        mode: ``"nearest"`` (each patch filled with its mean), ``"bilinear"`` or ``"bicubic"`` (``F.interpolate``,
            ``align_corners=False``) from the (H/p)×(W/p) thumbnail to H×W.
        value_range: optional ``(lo, hi)`` clamp (bicubic overshoots at edges).

    Returns:
        Tensor[B, C, H, W] of ``mixed``'s dtype. With keyed weights the block mean is a weighted mix of sub-patch
        means, not the patch mean.
    """
    op = "ppml.attacks.unmix_thumbnail"
    y, single = _check_mixed(mixed, patch_size, grid, op)
    if mode not in _MODES:
        raise ValueError(f"{op}: mode must be one of {_MODES}, got {mode!r}")
    value_range = _check_range(value_range, op)
    q = patch_size // grid
    thumb = F.avg_pool2d(y.double(), q)  # [B, C, H/p, W/p]
    size = (thumb.shape[-2] * patch_size, thumb.shape[-1] * patch_size)
    kw = {} if mode == "nearest" else {"align_corners": False}
    return _finish(F.interpolate(thumb, size=size, mode=mode, **kw), mixed, single, value_range)


def _laplacian(x: Tensor) -> Tensor:
    """``Dᵀ D x`` for D the forward differences along H and W inside the image (the gradient of ½‖∇x‖²)."""
    out = torch.zeros_like(x)
    dx = x[..., :, 1:] - x[..., :, :-1]
    out[..., :, 1:] += dx
    out[..., :, :-1] -= dx
    dy = x[..., 1:, :] - x[..., :-1, :]
    out[..., 1:, :] += dy
    out[..., :-1, :] -= dy
    return out


def unmix_smooth(
    mixed: Tensor,
    patch_size: int = 16,
    grid: int = 2,
    weights: Tensor | None = None,
    *,
    iters: int = 300,
    tol: float = 1e-6,
    value_range=None,
) -> Tensor:
    """The smoothest consistent image: ``argmin ‖∇X‖²`` subject to ``mix_subpatches(X, p, g, weights) = Y``.

    Conjugate gradients (float64, per image) on ``X = A⁺Y + z`` with z in the null space of A (``P z = z − A⁺A z``):
    solves ``P L P z = −P L A⁺Y`` with L = DᵀD (forward differences along H and W). The constraint pins each
    patch's block means, the prior chooses how each block's values split among its sub-patches.

    Args:
        mixed (Tensor[B, C, H/g, W/g] or Tensor[C, H/g, W/g]): the MI ciphertext (float).
        patch_size, grid, weights: as in :func:`unmix_least_norm`.
        iters: at most this many CG iterations (each: one mix, one spread, one Laplacian on the full image).
        tol: stop when every image's residual norm has dropped by this factor.
        value_range: optional ``(lo, hi)`` clamp (the solution can overshoot; clamping breaks exact consistency).

    Returns:
        Tensor[B, C, H, W] of ``mixed``'s dtype.
    """
    op = "ppml.attacks.unmix_smooth"
    y, single = _check_mixed(mixed, patch_size, grid, op, weights)
    check_positive_int(iters, op, "iters")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"{op}: tol must be a positive number, got {tol!r}")
    value_range = _check_range(value_range, op)
    return _finish(_smooth(y, patch_size, grid, weights, iters, tol), mixed, single, value_range)


def _smooth(y: Tensor, patch_size: int, grid: int, weights: Tensor | None, iters: int, tol: float) -> Tensor:
    """The CG solve of :func:`unmix_smooth` on a checked ``y`` (Tensor[B, C, H/g, W/g]); float64 result."""
    y = y.double()
    coef = _pinv_coef(weights)
    w = None if weights is None else weights.double()

    def project(v: Tensor) -> Tensor:  # onto the null space of A
        return v - _spread(mix_subpatches(v, patch_size, grid, w), patch_size, grid, coef)

    def dot(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum((1, 2, 3), keepdim=True)

    x0 = _spread(y, patch_size, grid, coef)
    z = torch.zeros_like(x0)
    r = -project(_laplacian(x0))
    d = r.clone()
    rs = dot(r, r)
    stop = rs * tol**2
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(iters):
        if bool((rs <= stop).all()):
            break
        ad = project(_laplacian(d))
        dad = dot(d, ad)
        alpha = torch.where(dad > tiny, rs / dad.clamp_min(tiny), torch.zeros_like(rs))
        z = z + alpha * d
        r = r - alpha * ad
        rs_new = dot(r, r)
        beta = torch.where(rs > tiny, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        d = r + beta * d
        rs = rs_new
    return x0 + project(z)  # re-projected: rounding drifts z off the null space


# ---- the learned decoder ---------------------------------------------------------------------------------------------


def _to_sources(x: Tensor, patch_size: int, grid: int) -> Tensor:
    """``Tensor[B, C, H, W] -> Tensor[B, C, g², H/g, W/g]``: entry k at a ciphertext pixel is the pixel of sub-patch k
    that MI averages into it (k = i·g + j, row-major, as in :func:`ppml.mix_subpatches`)."""
    b, c, h, w = x.shape
    g, q = grid, patch_size // grid
    th, tw = h // patch_size, w // patch_size
    x = x.reshape(b, c, th, g, q, tw, g, q).permute(0, 1, 3, 6, 2, 4, 5, 7)
    return x.reshape(b, c, g * g, th * q, tw * q)


def _from_sources(s: Tensor, patch_size: int, grid: int) -> Tensor:
    """The inverse of :func:`_to_sources`."""
    b, c, _, h, w = s.shape
    g, q = grid, patch_size // grid
    th, tw = h // q, w // q
    s = s.reshape(b, c, g, g, th, q, tw, q).permute(0, 1, 4, 2, 5, 6, 3, 7)
    return s.reshape(b, c, th * patch_size, tw * patch_size)


class UnmixDecoder(nn.Module):
    """A small dilated conv net that reconstructs plain images from the (plain-mean) MI ciphertext.

    It works at the ciphertext's resolution: each ciphertext pixel is the mean of g² plain pixels (one per sub-patch),
    and the net predicts those g² values as a correction of :func:`unmix_smooth`. Forward: standardise the
    ciphertext per image (MI keeps the mean, so the plain image is standardised by the same numbers); the base is the
    smooth solution (no gradient flows through the solve); the net (3×3 convs, dilations 1, 2, 4, 8, 1, ..., ReLU)
    sees the ciphertext and the base (3 + 3g² channels) and outputs 3g² corrections, centred over the g² values so
    the result stays exactly consistent (``mix_subpatches(out) == mixed`` up to rounding). The last conv starts at
    zero: an untrained decoder returns :func:`unmix_smooth`'s answer, and training can only start from there.

    Args:
        patch_size, grid: p and g of the encryption.
        width: channels of the hidden convs.
        depth: number of convs (>= 2).
        smooth_iters: CG iterations of the base (tolerance 1e-6; converged in ~50-100 on a 64² crop).

    Shapes:
        input (Tensor[B, C, H/g, W/g]): the MI ciphertext, C = 1 or 3, any value scale.
        output: Tensor[B, C, H, W] float32. Differentiable.
    """

    def __init__(self, patch_size: int, grid: int, *, width: int = 64, depth: int = 5, smooth_iters: int = 300) -> None:
        super().__init__()
        self.patch_size, self.grid, self.smooth_iters = patch_size, grid, smooth_iters
        k = grid * grid
        layers: list[nn.Module] = []
        chans = 3 + 3 * k
        for i in range(depth - 1):
            dil = 2 ** (i % 4)
            layers += [nn.Conv2d(chans, width, 3, padding=dil, dilation=dil), nn.ReLU()]
            chans = width
        last = nn.Conv2d(chans, 3 * k, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, mixed: Tensor) -> Tensor:
        p, g = self.patch_size, self.grid
        c = mixed.shape[1]
        y, mu, sd = standardize(mixed.expand(-1, 3, -1, -1) if c == 1 else mixed)
        b, _, h, w = y.shape
        with torch.no_grad():  # a fixed linear function of the input
            base = _to_sources(_smooth(y, p, g, None, self.smooth_iters, 1e-6).float(), p, g)  # [B, 3, g², h, w]
        d = self.net(torch.cat([y, base.flatten(1, 2)], 1)).reshape(b, 3, g * g, h, w) + base
        x = _from_sources(d - d.mean(2, keepdim=True) + y[:, :, None], p, g)
        x = x * sd + mu
        return x.mean(1, keepdim=True) if c == 1 else x


def _build_decoder(cfg: dict) -> UnmixDecoder:
    return UnmixDecoder(cfg["patch_size"], cfg["grid"], width=cfg["width"], depth=cfg["depth"])


def _decoder_loss(model: UnmixDecoder, mixed: Tensor, plain: Tensor) -> Tensor:
    return F.mse_loss(model(mixed), plain)


# The defaults of the settings the decoder chooses for itself (the others are TrainSettings').
_DEFAULTS = dict(steps=300, batch_size=16, lr=2e-3, weight_decay=0.0, digits_fraction=0.1)


def train_unmix_decoder(
    patch_size: int = 16,
    grid: int = 2,
    *,
    img_size: int = 224,
    crop: int | None = None,
    width: int = 64,
    depth: int = 5,
    **settings: Any,
) -> UnmixDecoder:
    """Trains an :class:`UnmixDecoder` on public images (the corpus of :func:`ppml.attacks.sample_crops`), MSE to the
    plain crop; same optimiser, schedule, checkpoint/resume/cache and ``threads`` semantics as
    :func:`ppml.attacks.train_position_attacker`.

    The net is convolutional, so it trains on ``crop``×``crop`` crops (default 4p) and runs on any size. Photo crops
    are taken at the scale of whole photos resized to ``img_size`` (a crop covers crop/img_size of the photo's height,
    ×0.7-1.4), the scale of the images it will attack; digits are used whole.

    Args:
        patch_size, grid: p and g of the MI encryption attacked (plain mean).
        img_size: the side of the images to be attacked (sets the zoom of the training crops).
        crop: side of the training crops, a multiple of p (default 4p).
        width, depth: see :class:`UnmixDecoder`.
        **settings: the fields of :class:`ppml.attacks.kit.TrainSettings`, as for
            :func:`ppml.attacks.train_position_attacker`, with the decoder's defaults: steps 300, batch_size 16,
            lr 2e-3, weight_decay 0, digits_fraction 0.1.

    Returns:
        The decoder in eval mode, with ``train_info``.
    """
    op = "ppml.attacks.train_unmix_decoder"
    run = TrainSettings.from_kwargs(op, settings, **_DEFAULTS)
    check_positive_int(patch_size, op, "patch_size")
    check_positive_int(grid, op, "grid")
    if patch_size % grid:
        raise ValueError(f"{op}: grid must divide patch_size, got grid={grid}, patch_size={patch_size}")
    check_positive_int(img_size, op, "img_size")
    crop = 4 * patch_size if crop is None else crop
    check_positive_int(crop, op, "crop")
    if crop % patch_size:
        raise ValueError(f"{op}: crop must be a multiple of patch_size={patch_size}, got {crop}")
    check_positive_int(width, op, "width")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"{op}: depth must be an int >= 2, got {depth!r}")
    run.check(op)
    model_config = dict(patch_size=patch_size, grid=grid, img_size=img_size, crop=crop, width=width, depth=depth)
    frac = crop / img_size

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = run.crops(crop, gen, photo_side=(0.7 * frac, 1.4 * frac))
        return mix_subpatches(x, patch_size, grid), x

    return fit(op=op, kind="unmix_decoder", stem=f"mi-decoder-p{patch_size}-g{grid}", model_config=model_config,
               settings=run, build=_build_decoder, make_batch=make_batch, loss_fn=_decoder_loss)


def load_unmix_decoder(path: str | os.PathLike) -> UnmixDecoder:
    """Loads an :class:`UnmixDecoder` from a checkpoint written by :func:`train_unmix_decoder`, in eval mode."""
    return load_trained(path, "unmix_decoder", _build_decoder, "ppml.attacks.load_unmix_decoder")


@torch.no_grad()
def unmix_with_decoder(
    model: UnmixDecoder, mixed: Tensor, patch_size: int = 16, grid: int = 2, *, value_range=None, batch_size: int = 8
) -> Tensor:
    """Reconstructs plain images with a trained :class:`UnmixDecoder`.

    Args:
        model: the decoder; its p and g must be ``patch_size`` and ``grid`` (a check).
        mixed (Tensor[B, C, H/g, W/g] or Tensor[C, H/g, W/g]): plain-mean MI ciphertext, C = 1 or 3.
        value_range: optional ``(lo, hi)`` clamp.
        batch_size: images per forward pass.

    Returns:
        Tensor[B, C, H, W] of ``mixed``'s dtype, on its device. Not differentiable (no_grad).
    """
    op = "ppml.attacks.unmix_with_decoder"
    if not isinstance(model, UnmixDecoder):
        raise ValueError(f"{op}: model must be a ppml.attacks.UnmixDecoder, got {type(model).__name__}")
    y, single = _check_mixed(mixed, patch_size, grid, op)
    if (patch_size, grid) != (model.patch_size, model.grid):
        raise ValueError(f"{op}: patch_size and grid must be the decoder's ({model.patch_size}, {model.grid}), got "
                         f"({patch_size}, {grid})")  # fmt: skip
    if y.shape[1] not in (1, 3):
        raise ValueError(f"{op}: mixed must have 1 or 3 channels, got {describe(mixed)}")
    value_range = _check_range(value_range, op)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(c.to(dev, torch.float32)).to(mixed.device) for c in y.split(batch_size)])
    finally:
        model.train(was_training)
    return _finish(out, mixed, single, value_range)


def unmix(
    mixed: Tensor,
    patch_size: int = 16,
    grid: int = 2,
    method: str = "smooth",
    *,
    decoder: UnmixDecoder | None = None,
    value_range=None,
) -> Tensor:
    """One entry point for the MI attacks: ``method`` is ``"thumbnail"`` (bicubic), ``"least_norm"``, ``"smooth"``
    or ``"decoder"`` (needs ``decoder``). Plain-mean MI; returns ``Tensor[B, C, H, W]`` like the functions it calls."""
    op = "ppml.attacks.unmix"
    if method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS}, got {method!r}")
    if method == "decoder":
        if decoder is None:
            raise ValueError(f"{op}: method 'decoder' needs decoder= (from train_unmix_decoder), got None")
        return unmix_with_decoder(decoder, mixed, patch_size, grid, value_range=value_range)
    if method == "thumbnail":
        return unmix_thumbnail(mixed, patch_size, grid, value_range=value_range)
    if method == "smooth":
        return unmix_smooth(mixed, patch_size, grid, value_range=value_range)
    out = unmix_least_norm(mixed, patch_size, grid)
    rng = _check_range(value_range, op)
    return out if rng is None else out.clamp(*rng)


__all__ = [
    "METHODS",
    "UnmixDecoder",
    "load_unmix_decoder",
    "train_unmix_decoder",
    "unmix",
    "unmix_least_norm",
    "unmix_smooth",
    "unmix_thumbnail",
    "unmix_with_decoder",
]
