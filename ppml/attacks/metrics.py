"""How well an attack recovered the plaintext: jigsaw metrics on permutations, PSNR and SSIM on pixels.

Conventions (those of ``ppml.shuffle_patches``): the key ``perm[b, i]`` is the plaintext cell of ciphertext tile i
(``encrypted tile i = plain tile perm[b, i]``); an attack's estimate ``perm_hat`` has the same meaning, and its
reconstruction is ``unshuffle_patches(encrypted, perm_hat, p)``, which puts ciphertext tile i into cell
``perm_hat[b, i]``. Cells are numbered row-major on the rows×cols grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import describe


def _perm_pair(perm_hat: Tensor, perm: Tensor, op: str) -> tuple[Tensor, Tensor]:
    """Validates two permutation batches of one shape; returns them as ``[B, N]`` int64 on perm's device."""
    for name, t in (("perm_hat", perm_hat), ("perm", perm)):
        if not isinstance(t, Tensor) or t.dim() not in (1, 2) or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{op}: {name} must be an integer tensor [B, N] or [N], got {describe(t)}")
        if t.shape[-1] < 1:
            raise ValueError(f"{op}: {name} must have N >= 1 entries per row, got {describe(t)}")
    if perm_hat.shape != perm.shape:
        raise ValueError(
            f"{op}: perm_hat and perm must have the same shape, got {describe(perm_hat)} and {describe(perm)}"
        )
    ph = perm_hat.reshape(-1, perm_hat.shape[-1]).to(device=perm.device, dtype=torch.int64)
    pk = perm.reshape(-1, perm.shape[-1]).to(torch.int64)
    ar = torch.arange(pk.shape[1], device=pk.device)
    for name, t in (("perm_hat", ph), ("perm", pk)):
        if t.numel() and not torch.equal(t.sort(1).values, ar.expand_as(t)):
            raise ValueError(f"{op}: every row of {name} must be a permutation of 0..{pk.shape[1] - 1}")
    return ph, pk


def _present_mask(present: Tensor | None, like: Tensor, op: str) -> Tensor | None:
    """``present`` (the tiles that were not dropped) as ``[B, N]`` bool on like's device, or None for all."""
    if present is None:
        return None
    if not isinstance(present, Tensor) or present.dtype != torch.bool or present.numel() != like.numel():
        raise ValueError(
            f"{op}: present must be a bool tensor shaped like perm {tuple(like.shape)}, got {describe(present)}"
        )
    return present.reshape(like.shape).to(like.device)


def direct_comparison(perm_hat: Tensor, perm: Tensor, present: Tensor | None = None) -> Tensor:
    """Fraction of pieces the reconstruction puts in their true cell (Cho et al. 2010, "direct comparison").

    The reconstruction holds in cell ``j`` the ciphertext tile ``i = perm_hat⁻¹[j]``, whose true cell is ``perm[i]``;
    cell j is right iff ``perm[perm_hat⁻¹[j]] == j``, i.e. iff ``perm_hat[i] == perm[i]``. So this is
    ``mean_i(perm_hat[b, i] == perm[b, i])`` — the same count whether one walks the cells or the tiles.

    Args:
        perm_hat (Tensor[B, N] or Tensor[N]): the attack's estimate of the key.
        perm (Tensor[B, N] or Tensor[N]): the true key.
        present (Tensor[B, N] or Tensor[N] bool, optional): the ciphertext tiles that carry content (patch-drop
            defence); the fraction is over those only. Default: all.

    Returns:
        Tensor[B] float32 in [0, 1] (B = 1 for 1-D input). Identical-looking pieces count as wrong when swapped.
    """
    op = "ppml.attacks.direct_comparison"
    ph, pk = _perm_pair(perm_hat, perm, op)
    mask = _present_mask(present, pk, op)
    hit = (ph == pk).float()
    if mask is None:
        return hit.mean(1)
    return (hit * mask).sum(1) / mask.sum(1).clamp_min(1)


def perfect_reconstruction(perm_hat: Tensor, perm: Tensor, present: Tensor | None = None) -> Tensor:
    """Whether every (present) piece is in its true cell (``perm_hat == perm`` row-wise).

    Args:
        perm_hat, perm, present: as in :func:`direct_comparison`.

    Returns:
        Tensor[B] bool; its mean over a data set is the perfect reconstruction rate.
    """
    op = "ppml.attacks.perfect_reconstruction"
    ph, pk = _perm_pair(perm_hat, perm, op)
    mask = _present_mask(present, pk, op)
    return ((ph == pk) | (False if mask is None else ~mask)).all(1)


def neighbor_comparison(perm_hat: Tensor, perm: Tensor, grid: tuple[int, int], present: Tensor | None = None) -> Tensor:
    """Fraction of true neighbour pairs that the reconstruction keeps as neighbours in the same relation.

    With ``pos[a] = perm_hat[perm⁻¹[a]]`` the cell to which the reconstruction moves the piece whose true cell is
    ``a``, a true right pair ``(a, a + 1)`` (a not in the last column) is kept iff ``pos[a + 1] == pos[a] + 1`` and
    ``pos[a]`` is not in the last column; a true below pair ``(a, a + cols)`` iff ``pos[a + cols] == pos[a] + cols``.
    The denominator is all ``rows·(cols − 1) + (rows − 1)·cols`` pairs. A reconstruction that is right up to a
    translation (all cells shifted) keeps most pairs and scores high here while scoring 0 in direct comparison.

    Args:
        perm_hat, perm (Tensor[B, N] or Tensor[N]): as in :func:`direct_comparison`.
        grid: ``(rows, cols)`` with rows·cols = N.
        present (Tensor[B, N] or Tensor[N] bool, optional): the ciphertext tiles that carry content; only true pairs
            whose two pieces are both present count. Default: all.

    Returns:
        Tensor[B] float32 in [0, 1] (1 when there are no pairs to count).
    """
    op = "ppml.attacks.neighbor_comparison"
    ph, pk = _perm_pair(perm_hat, perm, op)
    mask = _present_mask(present, pk, op)
    rows, cols, pos, inv = _grid_positions(ph, pk, grid, op)  # pos[b, r, c]: where the piece of true cell (r, c) went
    right = (pos[:, :, 1:] == pos[:, :, :-1] + 1) & (pos[:, :, :-1] % cols != cols - 1)
    below = pos[:, 1:, :] == pos[:, :-1, :] + cols
    if mask is None:
        pairs = torch.full((ph.shape[0],), rows * (cols - 1) + (rows - 1) * cols, device=ph.device)
    else:
        here = torch.gather(mask, 1, inv).reshape(-1, rows, cols)  # here[b, r, c]: the piece of true cell (r, c) exists
        pair_r, pair_b = here[:, :, 1:] & here[:, :, :-1], here[:, 1:, :] & here[:, :-1, :]
        right, below = right & pair_r, below & pair_b
        pairs = pair_r.flatten(1).sum(1) + pair_b.flatten(1).sum(1)
    kept = right.flatten(1).sum(1) + below.flatten(1).sum(1)
    return torch.where(pairs > 0, kept.float() / pairs.clamp_min(1), 1.0)


def _grid_positions(ph: Tensor, pk: Tensor, grid, op: str) -> tuple[int, int, Tensor, Tensor]:
    """``(rows, cols, pos, inv)``: ``pos[b, r, c]`` is the cell to which the estimate moves the piece whose true cell
    is (r, c), ``inv[b, a]`` the ciphertext tile whose true cell is a."""
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: grid must be (rows, cols), got {grid!r}") from None
    n = ph.shape[1]
    if rows < 1 or cols < 1 or rows * cols != n:
        raise ValueError(f"{op}: grid must be (rows, cols) with rows·cols = N = {n}, got {grid!r}")
    inv = torch.empty_like(pk).scatter_(1, pk, torch.arange(n, device=pk.device).expand_as(pk))
    return rows, cols, torch.gather(ph, 1, inv).reshape(-1, rows, cols), inv


def shifted_direct_comparison(
    perm_hat: Tensor, perm: Tensor, grid: tuple[int, int], present: Tensor | None = None
) -> Tensor:
    """Direct comparison up to one translation: the largest fraction of pieces that all sit at the same offset
    (Δrow, Δcol) from their true cell.

    With patch drop the solver cannot know where the holes were, so a reconstruction that is right but shifted by a
    cell scores near 0 in :func:`direct_comparison`; this score counts it as right. Offsets do not wrap around.

    Args:
        perm_hat, perm, present: as in :func:`direct_comparison` (only present pieces count).
        grid: ``(rows, cols)`` with rows·cols = N.

    Returns:
        Tensor[B] float32 in [0, 1], >= :func:`direct_comparison` (the zero offset is one of those tried).
    """
    op = "ppml.attacks.shifted_direct_comparison"
    ph, pk = _perm_pair(perm_hat, perm, op)
    mask = _present_mask(present, pk, op)
    rows, cols, pos, inv = _grid_positions(ph, pk, grid, op)
    n = rows * cols
    true = torch.arange(n, device=pk.device)
    dr = pos.reshape(-1, n) // cols - true // cols + rows - 1  # in [0, 2·rows − 2]
    dc = pos.reshape(-1, n) % cols - true % cols + cols - 1
    offset = dr * (2 * cols - 1) + dc
    weight = torch.ones_like(offset, dtype=torch.float32) if mask is None else torch.gather(mask, 1, inv).float()
    counts = torch.zeros(offset.shape[0], (2 * rows - 1) * (2 * cols - 1), device=pk.device)
    counts.scatter_add_(1, offset, weight)
    return counts.amax(1) / weight.sum(1).clamp_min(1)


def largest_correct_component(
    perm_hat: Tensor, perm: Tensor, grid: tuple[int, int], present: Tensor | None = None
) -> Tensor:
    """Share of the pieces in the largest correctly assembled block: the largest set of pieces connected through
    true neighbour pairs that the reconstruction keeps (the pairs :func:`neighbor_comparison` counts).

    Every piece of such a block sits at the same offset from its true cell, so the block is a correct piece of the
    picture, wherever it was put. A single piece is a block of one.

    Args:
        perm_hat, perm, present: as in :func:`direct_comparison` (only present pieces count, and only pairs of two
            present pieces connect).
        grid: ``(rows, cols)`` with rows·cols = N.

    Returns:
        Tensor[B] float32 in [0, 1] (1: perfect up to a translation).
    """
    op = "ppml.attacks.largest_correct_component"
    ph, pk = _perm_pair(perm_hat, perm, op)
    mask = _present_mask(present, pk, op)
    rows, cols, pos, inv = _grid_positions(ph, pk, grid, op)
    right = (pos[:, :, 1:] == pos[:, :, :-1] + 1) & (pos[:, :, :-1] % cols != cols - 1)
    below = pos[:, 1:, :] == pos[:, :-1, :] + cols
    here = torch.ones_like(pos, dtype=torch.bool) if mask is None else torch.gather(mask, 1, inv).reshape(pos.shape)
    right &= here[:, :, 1:] & here[:, :, :-1]
    below &= here[:, 1:, :] & here[:, :-1, :]
    # Connected components by label propagation: every piece takes the smallest label across its kept pairs until
    # nothing changes (at most one sweep per piece on a path; a few on real reconstructions).
    big = rows * cols
    lab = torch.arange(big, device=pos.device).expand_as(pos.reshape(-1, big)).reshape(pos.shape).clone()
    while True:
        old = lab
        lab = lab.clone()
        lab[:, :, 1:] = torch.where(right, torch.minimum(lab[:, :, 1:], lab[:, :, :-1]), lab[:, :, 1:])
        lab[:, :, :-1] = torch.where(right, torch.minimum(lab[:, :, 1:], lab[:, :, :-1]), lab[:, :, :-1])
        lab[:, 1:, :] = torch.where(below, torch.minimum(lab[:, 1:, :], lab[:, :-1, :]), lab[:, 1:, :])
        lab[:, :-1, :] = torch.where(below, torch.minimum(lab[:, 1:, :], lab[:, :-1, :]), lab[:, :-1, :])
        if torch.equal(lab, old):
            break
    weight = here.reshape(-1, big).float()
    sizes = torch.zeros(lab.shape[0], big, device=pos.device).scatter_add_(1, lab.reshape(-1, big), weight)
    return sizes.amax(1) / weight.sum(1).clamp_min(1)


# ---- pixel metrics -------------------------------------------------------------------------------------------------


def _image_pair(x: Tensor, y: Tensor, op: str) -> tuple[Tensor, Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor) or t.dim() not in (3, 4) or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be a real tensor [B, C, H, W] or [C, H, W], got {describe(t)}")
    if x.shape != y.shape:
        raise ValueError(f"{op}: x and y must have the same shape, got {describe(x)} and {describe(y)}")
    if x.numel() == 0:
        raise ValueError(f"{op}: x and y must not be empty, got {describe(x)}")
    x = x.reshape(-1, *x.shape[-3:]).to(torch.float64)
    y = y.reshape(-1, *y.shape[-3:]).to(device=x.device, dtype=torch.float64)
    return x, y


def _check_range(data_range, op: str) -> float:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or not data_range > 0:
        raise ValueError(f"{op}: data_range must be a positive number, got {data_range!r}")
    return float(data_range)


def psnr(x: Tensor, y: Tensor, data_range: float = 255.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10·log10(data_range² / MSE)`` with the MSE over C, H, W.

    Args:
        x, y (Tensor[B, C, H, W] or Tensor[C, H, W]): any real dtype; computed in float64.
        data_range: the span of possible values (255 for uint8, 1 for images in [0, 1]).

    Returns:
        Tensor[B] float64 (B = 1 for 3-D input), +inf where the images are equal; matches
        ``skimage.metrics.peak_signal_noise_ratio``.
    """
    op = "ppml.attacks.psnr"
    data_range = _check_range(data_range, op)
    x, y = _image_pair(x, y, op)
    mse = (x - y).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """Normalised 1-D Gaussian ``Tensor[size]`` float64 (the taps of scipy's gaussian_filter with truncate 3.5)."""
    g = torch.signal.windows.gaussian(size, std=sigma, dtype=torch.float64)
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 255.0) -> Tensor:
    """Structural similarity per image (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03.

    The local statistics are Gaussian-weighted (population) means, variances and covariance; the SSIM map is
    averaged over the positions where the window lies fully inside the image ((H − 10)×(W − 10)), per channel, and
    the channels are averaged. This is ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=data_range, channel_axis=0)`` for each image.

    Args:
        x, y (Tensor[B, C, H, W] or Tensor[C, H, W]): any real dtype, H and W >= 11; computed in float64.
        data_range: the span of possible values (255 for uint8, 1 for images in [0, 1]).

    Returns:
        Tensor[B] float64 (B = 1 for 3-D input), at most 1 (for equal images).
    """
    op = "ppml.attacks.ssim"
    data_range = _check_range(data_range, op)
    x, y = _image_pair(x, y, op)
    b, c, h, w = x.shape
    size = 11
    if h < size or w < size:
        raise ValueError(f"{op}: H and W must be >= {size} (the Gaussian window), got {describe(x)}")
    g = _gaussian_window(size, 1.5).to(x.device)
    kernel_h = g.reshape(1, 1, size, 1).expand(c, 1, size, 1)
    kernel_w = g.reshape(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(t: Tensor) -> Tensor:  # separable valid convolution per channel, [B, C, H − 10, W − 10]
        return F.conv2d(F.conv2d(t, kernel_h, groups=c), kernel_w, groups=c)

    stats = blur(torch.cat([x, y, x * x, y * y, x * y], 0))
    ux, uy, uxx, uyy, uxy = stats.split(b, 0)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(2).mean(2).mean(1)


__all__ = [
    "direct_comparison",
    "largest_correct_component",
    "neighbor_comparison",
    "perfect_reconstruction",
    "psnr",
    "shifted_direct_comparison",
    "ssim",
]
