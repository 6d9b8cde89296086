"""The RS defences (patch drop, gap between patches), the metrics restricted to present tiles, the jigsaw solver with
missing pieces, and ``ppml attack``."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_attacks import smooth_image

import ppml
from ppml.attacks import direct_comparison, neighbor_comparison, perfect_reconstruction, solve_jigsaw
from ppml.attacks.defences import encrypt_rs_defended, gapped_grid, keep_gapped_patches
from ppml.cli import main


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- gap -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h, w, p, gap", [(20, 20, 4, 2), (19, 26, 5, 1), (16, 16, 4, 0), (12, 30, 3, 4)])
def test_keep_gapped_patches_matches_a_loop(h, w, p, gap):
    x = torch.arange(2 * 3 * h * w).reshape(2, 3, h, w)
    rows, cols = gapped_grid(h, w, p, gap)
    out = keep_gapped_patches(x, p, gap)
    assert out.shape == (2, 3, rows * p, cols * p)
    for r, c in itertools.product(range(rows), range(cols)):
        y0, x0 = r * (p + gap), c * (p + gap)
        assert y0 + p <= h and x0 + p <= w
        assert torch.equal(out[..., r * p : (r + 1) * p, c * p : (c + 1) * p], x[..., y0 : y0 + p, x0 : x0 + p])
    # the grid is the largest that fits: one more row or column would run past the image
    assert rows * (p + gap) + p > h and cols * (p + gap) + p > w


# ---- drop ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_drop_blanks_exactly_the_absent_tiles(dtype):
    x = (torch.rand(3, 3, 32, 48, generator=_gen(0)) * 200 + 20).to(dtype)
    p, drop = 8, 0.25
    enc = encrypt_rs_defended(x, p, drop=drop, generator=_gen(1))
    n = (32 // p) * (48 // p)
    assert enc.grid == (4, 6) and enc.perm.shape == (3, n) and enc.encrypted.dtype == dtype
    assert torch.equal(enc.present.sum(1), torch.full((3,), n - round(drop * n)))
    tiles = enc.encrypted.reshape(3, 3, 4, p, 6, p).permute(0, 2, 4, 1, 3, 5).reshape(3, n, -1)
    plain_tiles = x.reshape(3, 3, 4, p, 6, p).permute(0, 2, 4, 1, 3, 5).reshape(3, n, -1)
    for b, i in itertools.product(range(3), range(n)):
        if enc.present[b, i]:
            assert torch.equal(tiles[b, i], plain_tiles[b, enc.perm[b, i]])
        else:
            assert not tiles[b, i].any()
    # no drop, no gap: plain RS with the same key
    plain = encrypt_rs_defended(x, p, generator=_gen(2))
    assert plain.present.all() and torch.equal(plain.plain, x)
    assert torch.equal(plain.encrypted, ppml.shuffle_patches(x, p, plain.perm)[0])


def test_defended_errors():
    x = torch.zeros(1, 3, 32, 32)
    for kwargs, word in (
        ({"drop": 1.0}, "drop"),
        ({"drop": -0.1}, "drop"),
        ({"gap": -1}, "gap"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 5}, "divide"),
        ({"patch_size": 33, "gap": 1}, "fit"),
    ):
        args = {"patch_size": 8, **kwargs}
        with pytest.raises(ValueError, match=rf"encrypt_rs_defended: .*{word}"):
            encrypt_rs_defended(x, args.pop("patch_size"), **args)
    with pytest.raises(ValueError, match=r"images must be \[B, C, H, W\]"):
        encrypt_rs_defended(x[0], 8)


# ---- metrics on present tiles: against a cell-by-cell count --------------------------------------------------------


def _brute_force(perm_hat, perm, present, rows, cols):
    """Direct and neighbour comparison by walking cells, counting only pieces (pairs) that exist."""
    n = rows * cols
    pos = {int(perm[i]): int(perm_hat[i]) for i in range(n)}  # true cell -> reconstructed cell
    exists = {int(perm[i]): bool(present[i]) for i in range(n)}
    direct = [pos[a] == a for a in range(n) if exists[a]]
    pairs = kept = 0
    for a in range(n):
        r, c = divmod(a, cols)
        for nb, step, ok in ((a + 1, 1, c + 1 < cols), (a + cols, cols, r + 1 < rows)):
            if ok and exists[a] and exists[nb]:
                pairs += 1
                same_row = step == cols or pos[a] % cols != cols - 1
                kept += pos[nb] == pos[a] + step and same_row
    return sum(direct) / max(len(direct), 1), kept / pairs if pairs else 1.0


@pytest.mark.parametrize("rows, cols", [(3, 4), (5, 5), (1, 6), (4, 1)])
def test_masked_metrics_match_brute_force(rows, cols):
    n, b = rows * cols, 6
    g = _gen(rows * 10 + cols)
    perm = ppml.random_permutations(b, n, generator=g)
    perm_hat = perm.clone()
    perm_hat[: b // 2] = ppml.random_permutations(b // 2, n, generator=g)  # half random, half mostly right
    perm_hat[b // 2, :2] = perm_hat[b // 2, :2].flip(0)
    present = torch.rand(b, n, generator=g) > 0.3
    present[-1] = True
    d = direct_comparison(perm_hat, perm, present)
    nb = neighbor_comparison(perm_hat, perm, (rows, cols), present)
    for k in range(b):
        want_d, want_n = _brute_force(perm_hat[k], perm[k], present[k], rows, cols)
        assert d[k].item() == pytest.approx(want_d) and nb[k].item() == pytest.approx(want_n)
    # all present == no mask; perfect ignores absent pieces
    assert torch.equal(direct_comparison(perm_hat, perm, present[-1:].expand(b, n)), direct_comparison(perm_hat, perm))
    wrong_only_where_absent = perm.clone()
    absent = torch.nonzero(~present[0]).squeeze(1)
    if absent.numel() >= 2:
        wrong_only_where_absent[0, absent] = perm[0, absent.flip(0)]
        assert perfect_reconstruction(wrong_only_where_absent, perm, present)[0]
        assert not perfect_reconstruction(wrong_only_where_absent, perm)[0]
    with pytest.raises(ValueError, match="direct_comparison: present must be a bool tensor"):
        direct_comparison(perm, perm, present.float())


# ---- the solver with missing pieces --------------------------------------------------------------------------------


def test_solver_places_present_pieces_around_a_missing_row():
    # The bottom row of cells is dropped: the remaining pieces form one rectangle the solver must rebuild exactly.
    # Whether the blank row was at the top or the bottom cannot be told from the ciphertext, so the rebuilt block may
    # sit one row off: every true neighbour pair is kept and the present pieces share one whole-row translation.
    p, rows, cols = 8, 6, 6
    img = smooth_image(rows * p, cols * p, seed=3)[None]
    enc, perm = ppml.shuffle_patches(img, p, generator=_gen(5))
    missing = perm >= (rows - 1) * cols
    enc = enc.clone()
    tiles = enc.view(1, 3, rows, p, cols, p)
    tiles.mul_((~missing).reshape(1, 1, rows, 1, cols, 1))
    perm_hat = solve_jigsaw(enc, p, missing=missing)
    assert torch.equal(perm_hat.sort(1).values, torch.arange(rows * cols)[None])
    assert neighbor_comparison(perm_hat, perm, (rows, cols), ~missing).item() == 1.0
    shift = (perm_hat - perm)[~missing].unique()
    assert shift.numel() == 1 and int(shift) in (0, cols)
    blank_cells = perm_hat[missing].sort().values
    assert torch.equal(blank_cells, torch.arange(cols) + (0 if int(shift) else (rows - 1) * cols))
    for bad in (missing[0], missing[:, :5], missing.int()):  # wrong rank, wrong size (no reshape fits), not bool
        with pytest.raises(ValueError, match="solve_jigsaw: missing must be a bool tensor"):
            solve_jigsaw(enc, p, missing=bad)


def test_solver_without_drops_is_unchanged_by_an_all_false_mask():
    img = smooth_image(48, 48, seed=4)[None]
    enc, _ = ppml.shuffle_patches(img, 8, generator=_gen(6))
    assert torch.equal(solve_jigsaw(enc, 8), solve_jigsaw(enc, 8, missing=torch.zeros(1, 36, dtype=torch.bool)))


# ---- ppml attack ---------------------------------------------------------------------------------------------------


@pytest.fixture
def smooth_png(tmp_path):
    from PIL import Image

    img = smooth_image(64, 64, seed=9).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = tmp_path / "smooth.png"
    Image.fromarray(img).save(path)
    return str(path)


def test_attack_cli_rs_jigsaw(smooth_png, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["attack", "--scheme", "rs", "--patch-size", "8", "--size", "64", "--attackers", "jigsaw", "--seed", "0"]
    assert main([*args, "--out", str(out), "--no-progress", smooth_png]) == 0
    table = capsys.readouterr().out
    assert "| image | attacker | direct | neighbour | perfect | psnr | ssim | seconds |" in table
    record = json.loads((out / "attack.json").read_text())
    (row,) = record["rows"]
    assert record["setting"] == {"scheme": "rs", "patch_size": 8, "drop": 0.0, "gap": 0, "grid": [8, 8]}
    assert row["attacker"] == "jigsaw" and row["direct"] == 1.0 and row["perfect"] == 1.0  # smooth: solved
    from PIL import Image

    fig = Image.open(out / "jigsaw.png")
    assert fig.width > 3 * 64 and fig.height > 64
    # the same run again needs --force; the defences run and are recorded
    assert main([*args, "--out", str(out), smooth_png]) == 2
    assert main([*args, "--out", str(out), "--force", "--drop", "0.25", "--gap", "2", smooth_png]) == 0
    record = json.loads((out / "attack.json").read_text())
    assert record["setting"]["grid"] == [6, 6] and record["setting"]["drop"] == 0.25


@pytest.mark.parametrize(
    "scheme",
    [
        ["--scheme", "rs", "--attackers", "vit"],
        ["--scheme", "mi", "--grid", "2", "--attackers", "decoder"],
    ],
)
def test_attack_cli_says_once_that_it_trains_the_learned_attacker(smooth_png, tmp_path, monkeypatch, capsys, scheme):
    # The first run trains the learned attacker into the cache, and says so before it starts; the next run loads it
    # silently. Budgets as small as tests/test_attacks_learned.py's: 2 steps, 32 px, p = 8.
    cache = tmp_path / "cache"
    monkeypatch.setenv("PPML_CACHE_DIR", str(cache))
    args = ["attack", *scheme, "--size", "32", "--patch-size", "8", "--train-steps", "2", "--threads", "1",
            "--seed", "0", "--no-progress", smooth_png]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    (cached,) = cache.iterdir()
    assert "training the learned" in err and "(2 steps; about " in err and "on 2 CPU cores" in err, err
    assert f"This happens once: it is cached in {cached} and reused by the next runs" in err, err
    assert main(args) == 0
    assert "training the learned" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scheme", "rs", "--attackers", "thumbnail"], "--attackers for --scheme rs"),
        (["--scheme", "mi", "--drop", "0.25"], "RS defences"),
        (["--scheme", "mi", "--grid", "3"], "--grid must be an int >= 1 dividing"),
        (["--scheme", "rs", "--drop", "1.5"], "--drop must be a share"),
        (["--scheme", "rs", "--patch-size", "7"], "divisible by --patch-size"),
    ],
)
def test_attack_cli_errors(smooth_png, capsys, extra, message):
    assert main(["attack", "--size", "64", *extra, smooth_png]) == 2
    assert message in capsys.readouterr().err
