"""Fixed class-centre anchors for the anchor-distance losses (Hao et al., "Anchor-based Nearest Class Mean Loss").

Two principles, both checked by the tests: every anchor has the same norm (all on one sphere of radius r), and the
anchors are maximally and equally separated — the simplex equiangular tight frame (pairwise cosine −1/(C−1)) or an
orthogonal set (one-hot, Hadamard; cosine 0). ``random`` (normalised Gaussian) keeps only the equal norm.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_int

KINDS = ("simplex", "onehot", "hadamard", "random")


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two): ±1 entries, orthogonal rows."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def make_anchors(
    num_classes: int,
    dim: int,
    kind: str = "simplex",
    radius: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C anchors in R^D, all of norm ``radius``.

    Args:
        num_classes: C (>= 2 for simplex, >= 1 otherwise).
        dim: D. ``simplex`` needs D >= C−1, ``onehot`` D >= C, ``hadamard`` D >= C (rows of the Hadamard matrix of the
            smallest power-of-two order >= C, placed in the first coordinates).
        kind: ``"simplex"`` (pairwise cosine −1/(C−1)), ``"onehot"`` and ``"hadamard"`` (pairwise cosine 0),
            ``"random"`` (normalised Gaussian; pairwise cosines near 0 only when D >> C).
        radius: the common norm r > 0.
        generator: seeds ``random`` anchors.
        dtype: result dtype (computed in float64).

    Returns:
        Tensor[C, D].
    """
    op = "ppml.make_anchors"
    check_int(num_classes, op, "num_classes", 1)
    check_int(dim, op, "dim", 1)
    if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
        raise ValueError(f"{op}: radius must be a finite number > 0, got {radius!r}")
    C, D = num_classes, dim
    if kind == "simplex":
        if C < 2:
            raise ValueError(f"{op}: kind='simplex' needs num_classes >= 2, got {C}")
        if D < C - 1:
            raise ValueError(f"{op}: kind='simplex' needs dim >= num_classes - 1 = {C - 1}, got dim={D}")
        # Centred one-hot vectors span a (C−1)-dimensional space; an orthonormal basis of it (QR) maps them to R^(C−1)
        # with every pairwise cosine −1/(C−1).
        centred = torch.eye(C, dtype=torch.float64) - 1.0 / C
        q, _ = torch.linalg.qr(centred.T)  # [C, C]; the first C−1 columns span the centred space
        a = torch.zeros(C, D, dtype=torch.float64)
        a[:, : C - 1] = centred @ q[:, : C - 1]
    elif kind == "onehot":
        if D < C:
            raise ValueError(f"{op}: kind='onehot' needs dim >= num_classes = {C}, got dim={D}")
        a = torch.zeros(C, D, dtype=torch.float64)
        a[:, :C] = torch.eye(C, dtype=torch.float64)
    elif kind == "hadamard":
        n = 1 << max(0, (C - 1).bit_length())
        if D < n:
            raise ValueError(
                f"{op}: kind='hadamard' needs dim >= {n} (the power of two >= num_classes={C}), got dim={D}"
            )
        a = torch.zeros(C, D, dtype=torch.float64)
        a[:, :n] = _hadamard(n)[:C]
    elif kind == "random":
        a = torch.randn(C, D, dtype=torch.float64, generator=generator)
    else:
        raise ValueError(f"{op}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    a = a / a.norm(dim=1, keepdim=True) * radius
    return a.to(dtype)
