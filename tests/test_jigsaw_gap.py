"""The gap-aware jigsaw solver (``solve_jigsaw(gap=g)``), its refinement, and the translation-aware metrics."""

from __future__ import annotations

import itertools

import pytest
import torch

from ppml.attacks import (
    direct_comparison,
    largest_correct_component,
    neighbor_comparison,
    shifted_direct_comparison,
    solve_jigsaw,
)
from ppml.attacks.defences import encrypt_rs_defended
from ppml.attacks.jigsaw_gap import _best_swap, _layout, _rolled_layouts, arrangement_cost, refine_swaps


def _aliased_plane(p: int, gap: int, rows: int) -> torch.Tensor:
    """A colour plane ``f = s·x + t·y`` cut into rows×rows patches with ``gap`` pixels between them.

    With t = s·g / (2(p + g)) the piece one column right and two rows *up* continues i's right edge exactly as a
    border-reading solver predicts it (edge + one pixel's step, as if the pieces touched), while the true right
    neighbour sits g + 1 steps on: the old solver is fooled by construction. Across the gap (g + 1 steps) only the
    true neighbour continues the plane (no other piece does for fewer than 10 rows), so the gap-aware solver has a
    unique exact answer.
    """
    size = rows * (p + gap) - gap
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    plane = x + y * gap / (2 * (p + gap))
    return torch.stack([plane, 0.5 * plane, -0.8 * plane])[None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gap_solver_solves_an_aliased_plane_the_border_solver_cannot(seed):
    p, gap = 8, 2
    enc = encrypt_rs_defended(_aliased_plane(p, gap, 6), p, gap=gap, generator=torch.Generator().manual_seed(seed))
    old = solve_jigsaw(enc.encrypted, p)
    new = solve_jigsaw(enc.encrypted, p, gap=gap)
    assert torch.equal(new, enc.perm)  # exact: every piece in its cell
    assert float(neighbor_comparison(new, enc.perm, enc.grid)) == 1.0
    assert float(neighbor_comparison(old, enc.perm, enc.grid)) < 0.6  # the aliases mislead it (measured ~0.3)


def test_gap_solver_smooth_field_with_patch_drop():
    """A smooth random field, gap 3, a quarter of the tiles dropped: the present pieces keep their neighbours."""
    p, gap, rows = 8, 3, 5
    size = rows * (p + gap) - gap
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
    img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True) * 255
    enc = encrypt_rs_defended(img, p, gap=gap, drop=0.2, generator=g)
    out = solve_jigsaw(enc.encrypted, p, gap=gap, missing=~enc.present)
    assert sorted(out[0].tolist()) == list(range(rows * rows))
    assert float(neighbor_comparison(out, enc.perm, enc.grid, enc.present)) >= 0.9


def test_gap_zero_is_the_old_solver():
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(2, 3, 48, 48, generator=g) * 255).to(torch.uint8)
    enc = encrypt_rs_defended(x, 8, generator=g)
    assert torch.equal(solve_jigsaw(enc.encrypted, 8), solve_jigsaw(enc.encrypted, 8, gap=0))
    assert torch.equal(solve_jigsaw(enc.encrypted, 8, refine=False), solve_jigsaw(enc.encrypted, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(gap=-1), "gap"), (dict(gap=7), "patch_size must be >= gap"), (dict(gap=1, refine=1), "refine")],
)
def test_gap_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_jigsaw(torch.zeros(3, 16, 16), 8, **kwargs)


# ---- refinement ----------------------------------------------------------------------------------------------------


def _random_costs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, n, generator=g, dtype=torch.float64), torch.rand(n, n, generator=g, dtype=torch.float64)


def _brute_cost(at: torch.Tensor, cost_r, cost_b) -> float:
    rows, cols = at.shape
    total = 0.0
    for r, c in itertools.product(range(rows), range(cols)):
        if c + 1 < cols:
            total += float(cost_r[at[r, c], at[r, c + 1]])
        if r + 1 < rows:
            total += float(cost_b[at[r, c], at[r + 1, c]])
    return total


@pytest.mark.parametrize("rows, cols, seed", [(3, 4, 0), (4, 4, 1), (2, 5, 2), (1, 6, 3)])
def test_best_swap_matches_brute_force(rows, cols, seed):
    n = rows * cols
    cost_r, cost_b = _random_costs(n, seed)
    at = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).reshape(rows, cols)
    base = _brute_cost(at, cost_r, cost_b)
    assert float(arrangement_cost(at, cost_r, cost_b)) == pytest.approx(base)
    best = min(
        _brute_cost(swapped, cost_r, cost_b) - base
        for u, v in itertools.combinations(range(n), 2)
        for swapped in [
            at.reshape(-1).clone().index_put_((torch.tensor([u, v]),), at.reshape(-1)[[v, u]]).reshape(rows, cols)
        ]
    )
    change, u, v = _best_swap(at, cost_r, cost_b)
    assert change == pytest.approx(best)
    flat = at.reshape(-1).clone()
    flat[u], flat[v] = int(flat[v]), int(flat[u])
    assert _brute_cost(flat.reshape(rows, cols), cost_r, cost_b) - base == pytest.approx(best)


def test_rolled_layouts_are_permutations_and_include_band_rolls():
    at = torch.arange(12).reshape(3, 4)
    lay = _rolled_layouts(at)
    assert all(sorted(t.flatten().tolist()) == list(range(12)) for t in lay)
    want = at.clone()
    want[:2] = want[:2].roll(1, 1)  # the top two rows rolled one cell right
    assert any(torch.equal(t, want) for t in lay)
    assert any(torch.equal(t, at.roll((1, 2), (0, 1))) for t in lay)


def test_refine_recovers_a_planted_arrangement():
    """Costs 0 for the planted layout's pairs and 1 elsewhere: from a shifted and swapped start the search must
    return the planted layout exactly (up to nothing: the cost is only 0 there)."""
    rows, cols = 5, 6
    n = rows * cols
    truth = torch.randperm(n, generator=torch.Generator().manual_seed(0)).reshape(rows, cols)
    cost_r = torch.ones(n, n, dtype=torch.float64)
    cost_b = torch.ones(n, n, dtype=torch.float64)
    cost_r[truth[:, :-1], truth[:, 1:]] = 0
    cost_b[truth[:-1], truth[1:]] = 0
    start = truth.clone()
    start[:2] = start[:2].roll(2, 1)  # a band wrapped round
    flat = start.view(-1)
    flat[0], flat[17] = int(flat[17]), int(flat[0])  # and two pieces swapped
    cells = torch.empty(n, dtype=torch.int64).scatter_(0, start.reshape(-1), torch.arange(n))
    out = refine_swaps(cells, cost_r, cost_b, rows, cols)
    assert torch.equal(_layout(out, rows, cols), truth)


def test_refine_never_raises_the_cost():
    rows, cols = 4, 5
    n = rows * cols
    cost_r, cost_b = _random_costs(n, 7)
    cells = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    out = refine_swaps(cells, cost_r, cost_b, rows, cols)
    assert sorted(out.tolist()) == list(range(n))
    before = arrangement_cost(_layout(cells, rows, cols), cost_r, cost_b)
    after = arrangement_cost(_layout(out, rows, cols), cost_r, cost_b)
    assert float(after) < float(before)
    assert float(_best_swap(_layout(out, rows, cols), cost_r, cost_b)[0]) >= -1e-9  # a local optimum for swaps


# ---- metrics -------------------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_made_shift():
    """2×3 grid, identity key; the estimate moves every piece one column right, the last column's pieces wrapping
    to the first column."""
    perm = torch.arange(6)
    # piece of true cell (r, c) goes to (r, (c + 1) % 3)
    perm_hat = torch.tensor([1, 2, 0, 4, 5, 3])
    assert float(direct_comparison(perm_hat, perm)) == 0.0
    assert float(shifted_direct_comparison(perm_hat, perm, (2, 3))) == pytest.approx(4 / 6)  # offset (0, +1)
    # kept pairs: right (0,1), (3,4); below: all three columns → one block {0, 1, 3, 4} and one {2, 5}
    assert float(neighbor_comparison(perm_hat, perm, (2, 3))) == pytest.approx(5 / 7)
    assert float(largest_correct_component(perm_hat, perm, (2, 3))) == pytest.approx(4 / 6)


def test_metrics_hand_made_blocks_and_present_mask():
    # 3×3, identity key; the estimate keeps the top-left 2×2 block in place and scatters the rest
    perm = torch.arange(9)
    perm_hat = torch.tensor([0, 1, 5, 3, 4, 8, 2, 7, 6])
    assert float(largest_correct_component(perm_hat, perm, (3, 3))) == pytest.approx(5 / 9)  # {0, 1, 3, 4, 7}
    assert float(shifted_direct_comparison(perm_hat, perm, (3, 3))) == pytest.approx(5 / 9)
    present = torch.ones(9, dtype=torch.bool)
    present[[4, 7]] = False  # piece 4 absent cuts 7 off the block; 7 is absent anyway
    assert float(largest_correct_component(perm_hat, perm, (3, 3), present)) == pytest.approx(3 / 7)
    assert float(shifted_direct_comparison(perm_hat, perm, (3, 3), present)) == pytest.approx(3 / 7)


def test_metrics_perfect_and_random_keys():
    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(20, generator=g) for _ in range(3)])
    ones = torch.ones(3)
    assert torch.equal(shifted_direct_comparison(perm, perm, (4, 5)), ones)
    assert torch.equal(largest_correct_component(perm, perm, (4, 5)), ones)
    # under a key that differs, the estimate's pieces at a common translation: same count as a brute-force search
    perm_hat = torch.stack([torch.randperm(20, generator=g) for _ in range(3)])
    got = shifted_direct_comparison(perm_hat, perm, (4, 5))
    for b in range(3):
        best = 0
        for dr, dc in itertools.product(range(-3, 4), range(-4, 5)):
            r, c = perm[b] // 5, perm[b] % 5
            best = max(best, int(((perm_hat[b] // 5 == r + dr) & (perm_hat[b] % 5 == c + dc)).sum()))
        assert float(got[b]) == pytest.approx(best / 20)
    assert (got >= direct_comparison(perm_hat, perm)).all()


def test_metrics_check_the_grid():
    with pytest.raises(ValueError, match="shifted_direct_comparison: grid"):
        shifted_direct_comparison(torch.arange(6), torch.arange(6), (2, 2))
    with pytest.raises(ValueError, match="largest_correct_component: grid"):
        largest_correct_component(torch.arange(6), torch.arange(6), "x")
