"""A jigsaw-puzzle attack on RS ciphertext: edge compatibility + best buddies + greedy placement on the known grid.

The attacker sees ``encrypted = shuffle_patches(x, p, perm)`` and knows p (hence the (H/p)×(W/p) grid). Every tile of
the ciphertext is a piece; the solver guesses, for every piece, the grid cell it came from.

Algorithm (Gallagher 2012 for the dissimilarity, Paikin & Tal 2015 for the confidence and the placement):

1. Dissimilarity ``D[i, j]`` for every ordered pair of pieces and two relations, "j right of i" and "j below i" (left
   and above are the transposes). Default: Mahalanobis Gradient Compatibility (MGC) — the gradient across the
   candidate boundary is scored by the Mahalanobis distance under the distribution (mean, colour covariance) of the
   gradients just inside each piece's edge, in both directions. Alternative ``"ssd"``: the squared difference
   between the column predicted by linear extrapolation (2·last − second-last) and the neighbour's first column, also
   in both directions. Both are fully vectorised (a few [N, N] matrix products).
2. Confidence: ``1 − D[i, j] / second-smallest D[i, :]`` (Paikin & Tal), and the same from j's side, averaged. A
   pair whose dissimilarity is far below every alternative gets a confidence near 1; ordinary pairs get ≤ 0.
3. Best buddies: i and j are best buddies in a relation when each is the other's most compatible piece there.
4. Greedy placement (Paikin & Tal): seed with the piece that has best buddies on every side (whose best buddies do
   too), most confident first; then repeatedly put the (piece, empty cell next to the placed ones) with the highest
   mean confidence over the cell's placed neighbours into that cell, preferring candidates that are best buddies of
   all those neighbours. The block may overhang the known R×C grid by ``slack`` pieces per axis; then (Gallagher's
   trimming and filling) the R×C window holding the most pieces is kept and its empty cells are filled by the same
   greedy rule on a board that is exactly R×C, so the answer is always a permutation of the known grid.
5. Optionally (``restarts``) the same from the next-best seeds, keeping the arrangement whose adjacent pairs have the
   highest summed confidence.
6. With ``refine`` (default when ``gap > 0``), each arrangement is improved by a local search before the comparison:
   the best pair swap, or cyclic roll of the layout or of a band of rows/columns, while one raises the summed
   confidence (:mod:`ppml.attacks.jigsaw_gap`).

Against the gap defence (``gap = g``: g pixel columns and rows discarded between neighbouring patches), step 1
measures the step across the hole instead of assuming the pieces touch: the mean and colour covariance of MGC (and
the extrapolation of ``"ssd"``) come from differences of columns g + 1 apart inside each piece, so the predicted
neighbour column is ``edge + μ_(g+1)``. Measured on the attack table's held-out photos at p = 16, gap 2 (shared
Intel Xeon, 2 cores): neighbour comparison 0.36 for the border-reading solver, 0.50 with the gap-aware MGC alone,
0.64 with the refinement, 0.68 with 4 restarts.

Cost for N pieces: O(N²·p·C) for the matrices and O(N²) for a placement (each cell caches its best candidate; a
step updates O(1) rows of N scores). Measured on two shared CPU cores: ~0.2 s for 196 pieces (224², p = 16), ~1 s
for 784 pieces (p = 8) per restart.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_int, describe
from .jigsaw_gap import refine_swaps

_OP = "ppml.attacks.solve_jigsaw"
_COMPATIBILITIES = ("mgc", "ssd")


# ---- dissimilarities -----------------------------------------------------------------------------------------------


def _dummy_gradients(channels: int, dtype: torch.dtype) -> Tensor:
    """Gallagher's dummy gradients, generalised to C channels: 0, ±(1,…,1) and ±e_c. ``Tensor[2C + 3, C]``.

    They keep each edge's gradient covariance invertible (a flat edge has zero covariance) at the scale of one grey
    level of a 0..255 image."""
    eye = torch.eye(channels, dtype=dtype)
    ones = torch.ones(1, channels, dtype=dtype)
    return torch.cat([torch.zeros(1, channels, dtype=dtype), ones, -ones, eye, -eye], 0)


def _mahalanobis_side(edge: Tensor, grads: Tensor, other: Tensor) -> Tensor:
    """One direction of MGC: how well ``other[j]`` continues the gradient profile at ``edge[i]``.

    Args:
        edge (Tensor[N, p, C]): the boundary column of each piece i (p samples along the edge, C channels).
        grads (Tensor[N, m, C]): samples of the step the boundary spans, taken inside each piece (see
            :func:`_edge_steps`): without a gap, the edge minus the column just inside it (m = p).
        other (Tensor[N, p, C]): the boundary column of each candidate neighour j facing piece i.

    Returns:
        Tensor[N, N]: ``D[i, j] = Σ_r (other[j, r] − edge[i, r] − μ_i)ᵀ S_i⁻¹ (other[j, r] − edge[i, r] − μ_i)`` with
        μ_i, S_i the mean and covariance (plus dummy gradients) of ``grads[i]``. Computed in expanded form
        (three matrix products, no [N, N, p, C] intermediate).
    """
    n, p, c = edge.shape
    g = grads
    mu = g.mean(1)  # [N, C]
    aug = torch.cat([g, _dummy_gradients(c, g.dtype).expand(n, -1, -1)], 1)  # [N, m + 2C + 3, C]
    centred = aug - aug.mean(1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (aug.shape[1] - 1)  # [N, C, C]
    m = torch.linalg.inv(cov)  # symmetric positive definite thanks to the dummies
    a = edge + mu[:, None, :]  # the predicted neighbour column, [N, p, C]
    q = other.transpose(1, 2) @ other  # Σ_r other[j, r] other[j, r]ᵀ, [N, C, C]
    t1 = m.reshape(n, c * c) @ q.reshape(n, c * c).T  # Σ_r otherᵀ M_i other
    ma = a @ m  # rows a[i, r]ᵀ M_i (M_i symmetric), [N, p, C]
    t2 = ma.reshape(n, p * c) @ other.reshape(n, p * c).T  # Σ_r otherᵀ M_i a
    t3 = (ma * a).sum((1, 2))  # Σ_r aᵀ M_i a
    return (t1 - 2 * t2 + t3[:, None]).clamp_min(0)


def _prediction_ssd_side(edge: Tensor, grads: Tensor, other: Tensor) -> Tensor:
    """One direction of the prediction SSD: ``D[i, j] = ‖other[j] − (edge[i] + step[i])‖²``, the step being the
    per-row linear extrapolation across the boundary (the first p rows of ``grads``, see :func:`_edge_steps`).

    Args and shapes as in :func:`_mahalanobis_side`; returns Tensor[N, N]."""
    n, p, _ = edge.shape
    pred = (edge + grads[:, :p]).reshape(n, -1)
    oth = other.reshape(n, -1)
    d = (pred * pred).sum(1)[:, None] + (oth * oth).sum(1)[None, :] - 2 * pred @ oth.T
    return d.clamp_min(0)


def _edge_steps(cols: Tensor, gap: int) -> Tensor:
    """Samples of the step a boundary spans (``gap + 1`` columns), from inside the piece whose edge is
    ``cols[:, -1]``.

    Args:
        cols (Tensor[N, w, p, C]): the piece's columns, the edge last; w >= gap + 2.
        gap: columns missing between neighbours.

    Returns:
        Tensor[N, m, C]: the differences of columns ``gap + 1`` apart ending at the edge and (where the piece is wide
        enough, w >= gap + 3) at the column before it, m = p or 2p. Without a gap this is Gallagher's edge minus
        the column just inside (m = p). Two positions rather than one or more: measured on 9 public photos at
        p = 16, gap 2, the true neighbour is the best candidate for 41.0 % of the pieces with two, 41.1 % with
        one, 39.5 % with four, and 39.7 % for MGC reading the borders as if they touched.
    """
    s = gap + 1
    w = cols.shape[1]
    if gap == 0:
        return cols[:, -1] - cols[:, -2]
    return torch.cat([cols[:, k] - cols[:, k - s] for k in range(w - 1, max(s - 1, w - 3), -1)], 1)


def _right_dissimilarity(pieces: Tensor, compatibility: str, gap: int = 0) -> Tensor:
    """``D[i, j]``: how bad it is to put piece j right of piece i, ``gap`` pixel columns apart.

    Args:
        pieces (Tensor[N, C, p, p]) float64, p >= gap + 2.
        compatibility: ``"mgc"`` or ``"ssd"``.
        gap: columns the defence discarded between neighbours (0: the pieces touch).

    Returns:
        Tensor[N, N] float64, symmetric in the sense that both pieces' views are summed (i's right edge predicting
        j, and j's left edge predicting i). Pass pieces with the last two dims swapped to get "j below i".
    """
    cols = pieces.permute(0, 3, 2, 1)  # [N, w, h, C]: column w as p samples of C channels
    flipped = cols.flip(1)  # the left edge last
    side = _mahalanobis_side if compatibility == "mgc" else _prediction_ssd_side
    right = side(cols[:, -1], _edge_steps(cols, gap), cols[:, 0])
    left = side(flipped[:, -1], _edge_steps(flipped, gap), flipped[:, 0])
    return right + left.T


def _confidence(d: Tensor) -> tuple[Tensor, Tensor]:
    """Paikin & Tal confidence and best buddies from a dissimilarity matrix (diagonal excluded).

    Args:
        d (Tensor[N, N]): ``d[i, j]`` dissimilarity of j as i's neighbour in one relation (N >= 2).

    Returns:
        ``(conf, buddies)``: Tensor[N, N] float64 — ``½(1 − d/second_best_of_row_i + 1 − d/second_best_of_col_j)``,
        −inf on the diagonal — and Tensor[N, N] bool, ``buddies[i, j]`` iff j is i's best and i is j's best.
    """
    n = d.shape[0]
    d = d.clone()
    d.fill_diagonal_(float("inf"))
    if n >= 3:
        # Entries are >= 0. Repeated pieces (flat regions) make the second best 0: floor it at a millionth of the
        # typical dissimilarity, and clamp the ratio, so that every confidence stays finite.
        off = d[torch.isfinite(d)]
        floor = max(1e-6 * float(off.mean()), torch.finfo(d.dtype).tiny) if off.numel() else 1.0
        second_row = d.topk(2, dim=1, largest=False).values[:, 1].clamp_min(floor)
        second_col = d.topk(2, dim=0, largest=False).values[1, :].clamp_min(floor)
        conf = (1 - 0.5 * (d / second_row[:, None] + d / second_col[None, :])).clamp_min(-1e6)
    else:  # two pieces: no second best to compare with, only the order matters
        conf = -d
    conf.fill_diagonal_(float("-inf"))
    best_j = d.argmin(1)  # [N]
    best_i = d.argmin(0)  # [N]
    ar = torch.arange(n)
    buddies = torch.zeros(n, n, dtype=torch.bool)
    mutual = best_i[best_j] == ar
    buddies[ar[mutual], best_j[mutual]] = True
    return conf, buddies


# ---- placement -----------------------------------------------------------------------------------------------------


def _seed_order(conf_r: Tensor, conf_b: Tensor, bud_r: Tensor, bud_b: Tensor, rows: int, cols: int) -> Tensor:
    """Pieces ranked as starting points (Paikin & Tal): best buddies on every side the grid allows, whose best
    buddies have that too, then the number of best buddies, then the summed confidence with them. ``Tensor[N]``."""
    sides = []  # (has a best buddy on that side [N], the buddy [N], confidence with it [N, N])
    for allowed, bud, conf in ((cols > 1, bud_r, conf_r), (rows > 1, bud_b, conf_b)):
        if allowed:
            as_int = bud.to(torch.int8)
            sides += [(bud.any(1), as_int.argmax(1), conf), (bud.any(0), as_int.argmax(0), conf.T)]
    ar = torch.arange(conf_r.shape[0])
    deg = sum(has.to(torch.int64) for has, _, _ in sides)
    strong = deg == len(sides)
    total = torch.zeros(conf_r.shape[0], dtype=torch.float64)
    for has, buddy, conf in sides:
        strong &= ~has | (deg[buddy] == len(sides))
        total += torch.where(has, conf[ar, buddy], 0.0)
    key = strong.to(torch.float64) * 100 + deg.to(torch.float64) * 10 + total.clamp(-1, 1)
    return torch.argsort(key, descending=True, stable=True)


def _arrangement_score(cells: Tensor, conf_r: Tensor, conf_b: Tensor, rows: int, cols: int) -> float:
    """Summed confidence of every adjacent pair of a finished arrangement (higher is better).

    Args:
        cells (Tensor[N] int64): the grid cell of each piece."""
    at = torch.empty_like(cells).scatter_(0, cells, torch.arange(cells.numel())).reshape(rows, cols)
    s = conf_r[at[:, :-1], at[:, 1:]].clamp(-1, 1).sum() + conf_b[at[:-1], at[1:]].clamp(-1, 1).sum()
    return float(s)


class _Canvas:
    """A height×width board being filled greedily, with the running score of every (empty cell, piece) pair.

    ``score[cell, k]`` is the summed confidence of piece k with the placed neighbours of ``cell``, ``nbud[cell, k]``
    how many of those neighbours k is a best buddy of, ``count[cell]`` how many there are.
    Each cell caches its best candidate (overall and among best buddies of all its neighbours), so a step costs
    O(frontier) to choose plus O(N) per cell whose row changed (the four neighbours of the new piece, and the cells
    whose favourite it was): a whole placement is O(N²) in a few small torch ops per piece.
    """

    def __init__(self, conf_r: Tensor, conf_b: Tensor, bud_r: Tensor, bud_b: Tensor, height: int, width: int):
        n = conf_r.shape[0]
        self.conf_r, self.conf_b = conf_r, conf_b
        self.bud_r, self.bud_b = bud_r.to(torch.int16), bud_b.to(torch.int16)
        self.h, self.w, self.n = height, width, n
        ncell = height * width
        self.score = torch.zeros(ncell, n, dtype=torch.float64)
        self.nbud = torch.zeros(ncell, n, dtype=torch.int16)
        self.count = torch.zeros(ncell, dtype=torch.int16)
        self.free = torch.ones(ncell, dtype=torch.bool)
        self.cell_of = torch.full((n,), -1, dtype=torch.int64)
        self.used = torch.zeros(n, dtype=torch.bool)
        self.placed = 0
        self.box = [height, -1, width, -1]  # r0, r1, c0, c1 of the placed pieces
        # per cell: best mean confidence (and its piece) among best-buddy candidates (tier) and among all
        self.best_tier = torch.full((ncell,), float("-inf"), dtype=torch.float64)
        self.arg_tier = torch.full((ncell,), -1, dtype=torch.int64)
        self.best_all = torch.full((ncell,), float("-inf"), dtype=torch.float64)
        self.arg_all = torch.full((ncell,), -1, dtype=torch.int64)

    def put(self, k: int, cell: int) -> list[int]:
        """Places piece k in ``cell``; returns the empty neighbour cells whose scores changed."""
        r, c = divmod(cell, self.w)
        self.free[cell] = False
        self.cell_of[k] = cell
        self.placed += 1
        self.used[k] = True
        w = self.w
        changed = []
        for ok, nb, conf, bud in (
            (c > 0, cell - 1, self.conf_r[:, k], self.bud_r[:, k]),  # a piece left of k has k on its right
            (c < w - 1, cell + 1, self.conf_r[k], self.bud_r[k]),
            (r > 0, cell - w, self.conf_b[:, k], self.bud_b[:, k]),
            (r < self.h - 1, cell + w, self.conf_b[k], self.bud_b[k]),
        ):
            if ok and bool(self.free[nb]):
                self.score[nb] += conf
                self.nbud[nb] += bud
                self.count[nb] += 1
                changed.append(nb)
        b = self.box
        b[0], b[1], b[2], b[3] = min(b[0], r), max(b[1], r), min(b[2], c), max(b[3], c)
        return changed

    def refresh(self, cells: Tensor) -> None:
        """Recomputes the cached best candidates of ``cells`` (Tensor[M] int64, empty cells with neighbours)."""
        if cells.numel() == 0:
            return
        cnt = self.count[cells][:, None]
        sc = (self.score[cells] / cnt).masked_fill_(self.used, float("-inf"))  # mean confidence, [M, N]
        # (argmax + gather, not max(dim): the latter spins for milliseconds on tiny inputs with busy OpenMP threads)
        arg = sc.argmax(1)
        self.arg_all[cells], self.best_all[cells] = arg, sc.gather(1, arg[:, None]).squeeze(1)
        tier = sc.masked_fill_(self.nbud[cells] != cnt, float("-inf"))  # best buddies of all placed neighbours
        arg = tier.argmax(1)
        self.arg_tier[cells], self.best_tier[cells] = arg, tier.gather(1, arg[:, None]).squeeze(1)

    def grow(self, limit: tuple[int, int] | None = None) -> None:
        """Places every remaining piece: each step the best (piece, empty cell next to a placed piece) by mean
        confidence with the cell's placed neighbours, among the candidates that are best buddies of all those
        neighbours if there are any. ``limit``: the placed pieces' bounding box must stay within ``(rows, cols)``."""
        w = self.w
        self.refresh(torch.nonzero(self.free & (self.count > 0)).squeeze(1))
        while self.placed < self.n:
            front = torch.nonzero(self.free & (self.count > 0)).squeeze(1)
            if limit is not None:
                fr, fc = front // w, front % w
                r0, r1, c0, c1 = self.box
                fits = (torch.clamp(fr, min=r1) - torch.clamp(fr, max=r0) < limit[0]) & (
                    torch.clamp(fc, min=c1) - torch.clamp(fc, max=c0) < limit[1]
                )
                front = front[fits]
            best, arg = self.best_tier[front], self.arg_tier[front]
            if not bool(torch.isfinite(best).any()):
                best, arg = self.best_all[front], self.arg_all[front]
            i = int(best.argmax())
            k = int(arg[i])
            changed = self.put(k, int(front[i]))
            stale = self.free & (self.count > 0) & ((self.arg_all == k) | (self.arg_tier == k))
            stale[changed] = True
            self.refresh(torch.nonzero(stale).squeeze(1))


def _place(
    conf_r: Tensor, conf_b: Tensor, bud_r: Tensor, bud_b: Tensor, rows: int, cols: int, seed: int, slack: int
) -> Tensor:
    """Greedy placement from one seed piece, then Gallagher's trimming and filling.

    1. Grow from ``seed`` on a canvas large enough for any block of (rows + slack)×(cols + slack), keeping the
       placed pieces' bounding box within that size.
    2. Trim: keep the pieces inside the rows×cols window that holds the most of them (a few pieces that went astray
       at the block's edge no longer dictate where the frame lies).
    3. Fill: put the kept pieces on a rows×cols board and grow again into its empty cells.
    With ``slack = 0`` step 1 already gives the final arrangement.

    Args:
        conf_r, conf_b (Tensor[N, N] float64): confidence of "j right of i" / "j below i" (−inf: never).
        bud_r, bud_b (Tensor[N, N] bool): best buddies in those relations.
        rows, cols: the known grid, N = rows·cols >= 2.
        seed: the piece placed first.
        slack: how far (in pieces) the first block may exceed the grid in each direction.

    Returns:
        Tensor[N] int64: the row-major grid cell given to each piece.
    """
    lr, lc = rows + (slack if rows > 1 else 0), cols + (slack if cols > 1 else 0)
    board = _Canvas(conf_r, conf_b, bud_r, bud_b, 2 * lr - 1, 2 * lc - 1)
    board.put(seed, (lr - 1) * board.w + (lc - 1))
    board.grow((lr, lc))
    r0, r1, c0, c1 = board.box
    if r1 - r0 < rows and c1 - c0 < cols:  # already fits: no trimming
        return (board.cell_of // board.w - r0) * cols + (board.cell_of % board.w - c0)
    occ = (~board.free).to(torch.float64).reshape(1, 1, board.h, board.w)
    counts = torch.nn.functional.conv2d(occ, torch.ones(1, 1, rows, cols, dtype=torch.float64))[0, 0]
    wr, wc = divmod(int(counts.argmax()), counts.shape[1])  # top-left of the fullest window
    pr, pc = board.cell_of // board.w - wr, board.cell_of % board.w - wc
    keep = (pr >= 0) & (pr < rows) & (pc >= 0) & (pc < cols)
    final = _Canvas(conf_r, conf_b, bud_r, bud_b, rows, cols)
    for k in torch.nonzero(keep).squeeze(1).tolist():
        final.put(k, int(pr[k]) * cols + int(pc[k]))
    final.grow()
    return final.cell_of


# ---- public API ----------------------------------------------------------------------------------------------------


def solve_jigsaw(
    encrypted: Tensor,
    patch_size: int,
    *,
    grid: tuple[int, int] | None = None,
    compatibility: str = "mgc",
    restarts: int = 1,
    slack: int = 2,
    missing: Tensor | None = None,
    gap: int = 0,
    refine: bool | None = None,
) -> Tensor:
    """Attacks RS encryption: reassembles each shuffled image on its known (H/p)×(W/p) grid.

    Args:
        encrypted (Tensor[B, C, H, W] or Tensor[C, H, W]): RS ciphertext, uint8 or floating point, any range (each
            image is rescaled to 0..255 by its own min and max, so ``x`` and ``x / 255.`` give the same answer).
        patch_size: p, >= 2, dividing H and W.
        grid: ``(rows, cols)``, optional; must be ``(H/p, W/p)`` (a check: the attacker knows the grid).
        compatibility: ``"mgc"`` (Gallagher's Mahalanobis gradient compatibility, default) or ``"ssd"`` (squared
            difference of the linearly predicted next column and the neighbour's edge, both directions).
        restarts: how many of the best-ranked seed pieces to grow from; the arrangement with the highest summed
            confidence of adjacent pairs wins (cost grows linearly).
        slack: how many pieces the first greedy block may overhang the grid on each axis before Gallagher-style
            trimming (keep the fullest grid-sized window) and refilling; 0 grows strictly inside the grid.
        missing (Tensor[B, N] or Tensor[N] bool, optional): ciphertext tiles that carry no content (the patch-drop
            defence: dropped tiles are blanked, and the attacker sees which). They take no part in the
            dissimilarities, confidences or best buddies; the present pieces are placed first and the missing ones
            fill the cells left over, so the answer is still a permutation. Score it on the present tiles
            (``present=~missing`` in :func:`~ppml.attacks.direct_comparison` and
            :func:`~ppml.attacks.neighbor_comparison`).
        gap: pixel columns (and rows) the owner discarded between neighbouring patches (the gap defence of
            :func:`~ppml.attacks.defences.encrypt_rs_defended`; the attacker knows it, like p). The compatibility
            then predicts across the hole: the step from a piece's edge to its neighbour's is modelled on the steps
            between columns ``gap + 1`` apart inside the piece (MGC's mean and colour covariance, or the SSD's
            linear extrapolation, over that distance). p must be >= gap + 2. Default 0: the pieces touch.
        refine: after the greedy placement, run the pair-swap local search of :mod:`ppml.attacks.jigsaw_gap`
            (every swap that lowers the summed −confidence of adjacent pairs, best first, until none does). Default
            (None): on when ``gap > 0``, where the greedy placement alone strands many pieces; off otherwise, which
            keeps the gap-free answers of earlier versions.

    Returns:
        Tensor[B, N] int64 (Tensor[N] for a single image), in the key's convention: ``perm_hat[b, i]`` is the grid
        cell (row-major) the solver gives to ciphertext tile i, so ``ppml.unshuffle_patches(encrypted, perm_hat, p)``
        is the reconstruction and ``perm_hat == perm`` means the puzzle is solved. Each image is solved
        independently, on the CPU.
    """
    if not isinstance(encrypted, Tensor) or encrypted.dim() not in (3, 4):
        raise ValueError(f"{_OP}: encrypted must be [B, C, H, W] or [C, H, W], got {describe(encrypted)}")
    if not (encrypted.dtype == torch.uint8 or encrypted.is_floating_point()):
        raise ValueError(f"{_OP}: encrypted must be uint8 or floating point, got {describe(encrypted)}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2:
        raise ValueError(f"{_OP}: patch_size must be an int >= 2 (edges need two pixel columns), got {patch_size!r}")
    if compatibility not in _COMPATIBILITIES:
        raise ValueError(f"{_OP}: compatibility must be one of {_COMPATIBILITIES}, got {compatibility!r}")
    check_int(restarts, _OP, "restarts", 1)
    check_int(slack, _OP, "slack", 0)
    check_int(gap, _OP, "gap", 0)
    if refine is not None and not isinstance(refine, bool):
        raise ValueError(f"{_OP}: refine must be True, False or None (on when gap > 0), got {refine!r}")
    if patch_size < gap + 2:
        raise ValueError(
            f"{_OP}: patch_size must be >= gap + 2 (the step across the gap is measured inside a piece), "
            f"got patch_size {patch_size} and gap {gap}"
        )
    refine = gap > 0 if refine is None else refine
    single = encrypted.dim() == 3
    x = encrypted.unsqueeze(0) if single else encrypted
    b, c, h, w = x.shape
    p = patch_size
    if c < 1 or h % p or w % p or h == 0 or w == 0:
        raise ValueError(f"{_OP}: patch_size {p} must divide H and W of a non-empty image, got {describe(encrypted)}")
    rows, cols = h // p, w // p
    if grid is not None and tuple(grid) != (rows, cols):
        raise ValueError(f"{_OP}: grid must be (H/p, W/p) = {(rows, cols)} for {describe(encrypted)}, got {grid!r}")
    n = rows * cols
    if missing is not None:
        want = (n,) if single else (b, n)
        if not isinstance(missing, Tensor) or missing.dtype != torch.bool or tuple(missing.shape) != want:
            raise ValueError(
                f"{_OP}: missing must be a bool tensor {list(want)} (one flag per tile), got {describe(missing)}"
            )
        missing = missing.reshape(b, n).cpu()
    out = torch.empty(b, n, dtype=torch.int64)
    for k in range(b):
        gone = None if missing is None else missing[k]
        img = x[k].detach().to("cpu", torch.float64)
        out[k] = _solve_one(img, p, rows, cols, compatibility, restarts, slack, gone, gap, refine)
    out = out.to(encrypted.device)
    return out[0] if single else out


def _confidence_of_present(d: Tensor, present: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`_confidence` over the present pieces only; a pair involving a missing piece gets a confidence below
    every real pair (finite, so a cell next to a missing piece can still be scored) and is never a best buddy."""
    if present is None or bool(present.all()):
        return _confidence(d)
    keep = torch.nonzero(present).squeeze(1)
    n = d.shape[0]
    conf = torch.full((n, n), -2e6, dtype=d.dtype)  # below _confidence's clamp of -1e6
    buddies = torch.zeros(n, n, dtype=torch.bool)
    if keep.numel() >= 2:
        sub_conf, sub_bud = _confidence(d[keep][:, keep])
        conf[keep[:, None], keep[None, :]] = sub_conf
        buddies[keep[:, None], keep[None, :]] = sub_bud
    conf.fill_diagonal_(float("-inf"))
    return conf, buddies


def _solve_one(
    img: Tensor,
    p: int,
    rows: int,
    cols: int,
    compatibility: str,
    restarts: int,
    slack: int,
    missing: Tensor | None,
    gap: int = 0,
    refine: bool = False,
) -> Tensor:
    """One image ``Tensor[C, H, W]`` float64 -> ``Tensor[N]`` int64 cell of each tile."""
    n = rows * cols
    if n == 1:
        return torch.zeros(1, dtype=torch.int64)
    present = None if missing is None else ~missing
    lo, hi = img.min(), img.max()
    img = (img - lo) * (255.0 / (hi - lo)) if hi > lo else img - lo
    c = img.shape[0]
    pieces = img.reshape(c, rows, p, cols, p).permute(1, 3, 0, 2, 4).reshape(n, c, p, p)  # tile i, row-major
    d_r = _right_dissimilarity(pieces, compatibility, gap)
    d_b = _right_dissimilarity(pieces.transpose(2, 3), compatibility, gap)
    conf_r, bud_r = _confidence_of_present(d_r, present)
    conf_b, bud_b = _confidence_of_present(d_b, present)
    if refine:
        # The search minimises −Σ confidence, i.e. maximises the score the restarts compare below.
        cost_r, cost_b = (-conf.clamp(-1, 1) for conf in (conf_r, conf_b))
    best, best_score = None, float("-inf")
    for seed in _seed_order(conf_r, conf_b, bud_r, bud_b, rows, cols)[:restarts].tolist():
        cells = _place(conf_r, conf_b, bud_r, bud_b, rows, cols, seed, slack)
        if refine:
            cells = refine_swaps(cells, cost_r, cost_b, rows, cols)
        score = _arrangement_score(cells, conf_r, conf_b, rows, cols)
        if score > best_score:
            best, best_score = cells, score
    return best
