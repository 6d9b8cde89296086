"""Global refinement of a jigsaw arrangement: the local search :func:`ppml.attacks.solve_jigsaw` runs after its
greedy placement (by default when the pieces were cut with a gap).

Why: the greedy placement commits to every piece for good, so one wrong early choice (likely when the compatibility
is weak, as across a gap, where the true neighbour is the best candidate for well under half the pieces) strands the
pieces that should have gone there. A local search over the finished arrangement moves them back:

- the moves: swap two pieces (any two, not only neighbours); once no swap helps, roll (cyclically) the whole layout,
  or a band of rows (columns) touching the border sideways (up or down) — the greedy placement often builds the
  picture right but shifted, the pieces that did not fit wrapped to the far side, which no single swap repairs;
- the objective: the summed cost of all adjacent pairs, cost = −confidence (Paikin & Tal's, clamped to [−1, 1]: the
  same quantity the solver's restarts compare);
- each step applies the move that lowers the objective most, until none does or ``max_steps`` is reached.

Every non-adjacent swap's change is read off one [N, N] matrix, ``place[x, cell]`` = the cost of the pairs piece x
would form with the current neighbours of ``cell``: swapping a and b changes the total by
``place[a, cell(b)] + place[b, cell(a)] − place[a, cell(a)] − place[b, cell(b)]``. The (at most 2N) swaps of
adjacent pieces, which that formula gets wrong, and the rolls (~5N) are scored exactly as batches of whole layouts. A
step is thus a few [N, N] tensor ops, no loop over pairs: measured on a shared Intel Xeon (2 cores, 1 thread), a swap
step takes 3 ms at N = 144 (p = 16, gap 2 at 224 px) and 45 ms at N = 484 (p = 8), a roll step 7 / 77 ms; an image
needs ~100-150 steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["arrangement_cost", "refine_swaps"]


def _layout(cells: Tensor, rows: int, cols: int) -> Tensor:
    """``at[r, c]``: the piece in each cell, from ``cells`` (Tensor[N], the cell of each piece). Tensor[rows, cols]."""
    return torch.empty_like(cells).scatter_(0, cells, torch.arange(cells.numel())).reshape(rows, cols)


def arrangement_cost(at: Tensor, cost_r: Tensor, cost_b: Tensor) -> Tensor:
    """Total cost of the adjacent pairs of one layout ``at`` (Tensor[rows, cols] piece ids) or of a batch of them
    (Tensor[K, rows, cols]): ``Σ cost_r[left, right] + Σ cost_b[top, bottom]``. Tensor[] or Tensor[K]."""
    lay = at if at.dim() == 3 else at[None]
    tot = cost_r[lay[:, :, :-1], lay[:, :, 1:]].flatten(1).sum(1) + cost_b[lay[:, :-1], lay[:, 1:]].flatten(1).sum(1)
    return tot if at.dim() == 3 else tot[0]


def _place_cost(at: Tensor, cost_r: Tensor, cost_b: Tensor) -> Tensor:
    """``place[x, cell]``: the cost of the pairs piece x would form with the current neighbours of ``cell``.
    Tensor[N, rows·cols]."""
    rows, cols = at.shape
    n = rows * cols
    pc = torch.zeros(n, rows, cols, dtype=cost_r.dtype)
    pc[:, :, 1:] += cost_r[at[:, :-1]].permute(2, 0, 1)  # with the left neighbour L: cost_r[L, x]
    pc[:, :, :-1] += cost_r[:, at[:, 1:]]  # with the right neighbour R: cost_r[x, R]
    pc[:, 1:, :] += cost_b[at[:-1, :]].permute(2, 0, 1)
    pc[:, :-1, :] += cost_b[:, at[1:, :]]
    return pc.reshape(n, n)


def _best_swap(at: Tensor, cost_r: Tensor, cost_b: Tensor) -> tuple[float, int, int]:
    """The swap that lowers the total cost most: ``(change, cell a, cell b)`` (change >= 0: none helps)."""
    rows, cols = at.shape
    n = rows * cols
    flat = at.reshape(-1)
    moved = _place_cost(at, cost_r, cost_b)[flat]  # moved[u, v]: the piece now in cell u, placed in cell v
    own = moved.diagonal()
    delta = moved + moved.T - own[:, None] - own[None, :]
    r, c = torch.arange(n) // cols, torch.arange(n) % cols
    adjacent = ((r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()) == 1
    delta.masked_fill_(adjacent, float("inf")).fill_diagonal_(float("inf"))
    arg = int(delta.argmin())
    best, (u, v) = float(delta.view(-1)[arg]), divmod(arg, n)
    # Swaps of adjacent cells, scored exactly: every such layout at once.
    pairs = torch.nonzero(torch.triu(adjacent, 1))  # [M, 2] cells
    layouts = flat.expand(pairs.shape[0], n).clone()
    ar = torch.arange(pairs.shape[0])
    layouts[ar, pairs[:, 0]], layouts[ar, pairs[:, 1]] = flat[pairs[:, 1]], flat[pairs[:, 0]]
    change = arrangement_cost(layouts.reshape(-1, rows, cols), cost_r, cost_b) - arrangement_cost(at, cost_r, cost_b)
    k = int(change.argmin())
    if float(change[k]) < best:
        best, u, v = float(change[k]), int(pairs[k, 0]), int(pairs[k, 1])
    return best, u, v


def _band_rolls(at: Tensor) -> Tensor:
    """Layouts in which a band of whole rows, one that starts at the top or ends at the bottom, is rolled
    (cyclically) sideways by 1 … cols − 1 cells. Tensor[K, rows, cols]."""
    rows, cols = at.shape
    r, c = torch.arange(rows), torch.arange(cols)
    starts = torch.cat([torch.zeros(rows, dtype=torch.int64), torch.arange(1, rows)])  # prefixes, then suffixes
    ends = torch.cat([torch.arange(rows), torch.full((rows - 1,), rows - 1)])
    shifts = torch.arange(1, cols)
    lo = starts.repeat_interleave(cols - 1).reshape(-1, 1, 1)
    hi = ends.repeat_interleave(cols - 1).reshape(-1, 1, 1)
    sh = shifts.repeat(starts.numel()).reshape(-1, 1, 1)
    inside = (r[None, :, None] >= lo) & (r[None, :, None] <= hi)
    cc = torch.where(inside, (c[None, None, :] - sh) % cols, c[None, None, :])
    return at[r[None, :, None].expand_as(cc), cc]


def _rolled_layouts(at: Tensor) -> Tensor:
    """Every layout one roll away: the whole layout rolled by (dr, dc), and a band of rows (or columns) that
    touches the border rolled along it. Tensor[K, rows, cols]."""
    rows, cols = at.shape
    r, c = torch.arange(rows), torch.arange(cols)
    dr, dc = torch.meshgrid(r, c, indexing="ij")
    whole = at[(r[None, :, None] - dr.reshape(-1, 1, 1)) % rows, (c[None, None, :] - dc.reshape(-1, 1, 1)) % cols]
    out = [whole[1:]]
    if cols > 1:
        out.append(_band_rolls(at))
    if rows > 1:
        out.append(_band_rolls(at.T).transpose(1, 2))
    return torch.cat(out)


def refine_swaps(cells: Tensor, cost_r: Tensor, cost_b: Tensor, rows: int, cols: int, max_steps: int = 2000) -> Tensor:
    """Local search on an arrangement: applies the best move while one lowers the total cost of adjacent pairs.

    Moves: swapping any two pieces; rolling (cyclically) the whole layout, or a band of rows (columns) that touches
    the top or bottom (left or right) border sideways (up or down). The greedy placement often builds the picture
    right but shifted, with the pieces that did not fit wrapped to the far side, which no single swap improves.

    Args:
        cells (Tensor[N] int64): the grid cell (row-major) of each piece; N = rows·cols >= 2.
        cost_r, cost_b (Tensor[N, N] float64, finite): cost of "j right of i" / "j below i".
        rows, cols: the grid.
        max_steps: at most this many moves (each lowers the total, so the search always ends; this bounds its time).

    Returns:
        Tensor[N] int64: the refined cells (the input's values when no move helps).
    """
    at = _layout(cells, rows, cols)
    for _ in range(max_steps):
        change, u, v = _best_swap(at, cost_r, cost_b)
        if change < -1e-9:
            flat = at.view(-1)
            flat[u], flat[v] = int(flat[v]), int(flat[u])
            continue
        # Rolls only once no swap helps: there are ~5·rows·cols of them, each a whole layout to score.
        rolled = _rolled_layouts(at)
        roll_change = arrangement_cost(rolled, cost_r, cost_b) - arrangement_cost(at, cost_r, cost_b)
        k = int(roll_change.argmin())
        if not float(roll_change[k]) < -1e-9:
            break
        at = rolled[k].clone()
    flat = at.reshape(-1)
    return torch.empty_like(flat).scatter_(0, flat, torch.arange(flat.numel()))
