"""ppml.attacks learned/MI attacks: the MI inversions against dense linear algebra (lstsq, pinv, the KKT system of the
smoothness prior), the thumbnail against pooled plain images, the Hungarian decoding against brute force and the key
convention, tiny training runs beating chance, exact checkpoint resume, the corpus leaving the held-out photos out,
and the error messages."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import ppml
from ppml.attacks import (
    HELD_OUT,
    PositionAttacker,
    UnmixDecoder,
    assign_positions,
    direct_comparison,
    load_photo,
    load_position_attacker,
    load_unmix_decoder,
    neighbor_comparison,
    perfect_reconstruction,
    position_accuracy,
    predict_position_logits,
    sample_crops,
    solve_with_attacker,
    train_position_attacker,
    train_unmix_decoder,
    unmix,
    unmix_least_norm,
    unmix_smooth,
    unmix_thumbnail,
    unmix_with_decoder,
)

pytest.importorskip("timm")
pytest.importorskip("scipy")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many small ops; on a 2-core machine shared with other busy processes each parallel op waits
    # for a scheduler tick (measured: the tiny decoder test 9 s with 2 threads, under 4 s with 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mi_matrix(h: int, w: int, p: int, g: int, weights=None) -> torch.Tensor:
    """The dense matrix of MI on one-channel h×w images, column by column from ppml.mix_subpatches of basis images."""
    n = h * w
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, h, w)
    wb = None if weights is None else weights.expand(n, -1, -1)
    return ppml.mix_subpatches(basis, p, g, wb, backend="reference").reshape(n, -1).T  # [h·w/g², h·w]


def _smoothness_matrix(h: int, w: int) -> torch.Tensor:
    """L = DᵀD, D the forward differences along rows and columns of an h×w image, built row by row."""
    rows = []
    for i in range(h):
        for j in range(w):
            for di, dj in ((0, 1), (1, 0)):
                if i + di < h and j + dj < w:
                    r = torch.zeros(h * w, dtype=torch.float64)
                    r[(i + di) * w + j + dj], r[i * w + j] = 1.0, -1.0
                    rows.append(r)
    d = torch.stack(rows)
    return d.T @ d


# ---- MI inversion: closed forms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True])
@pytest.mark.parametrize("p, g", [(4, 2), (6, 3), (4, 4)])
def test_least_norm_matches_lstsq_and_pinv(p, g, keyed):
    h, w = 2 * p, p
    n = (h // p) * (w // p)
    weights = ppml.random_mixing_weights(1, n, g, dtype=torch.float64, generator=_gen(p + g)) if keyed else None
    a = _mi_matrix(h, w, p, g, weights)
    x = torch.rand(1, 1, h, w, dtype=torch.float64, generator=_gen(1))
    y = ppml.mix_subpatches(x, p, g, weights)
    assert torch.allclose(a @ x.flatten(), y.flatten())  # the dense matrix is MI
    ours = unmix_least_norm(y, p, g, weights).flatten()
    ref_lstsq = torch.linalg.lstsq(a, y.flatten()[:, None], driver="gelsd").solution.flatten()  # minimum norm
    ref_pinv = torch.linalg.pinv(a) @ y.flatten()
    assert torch.allclose(ours, ref_lstsq, atol=1e-12) and torch.allclose(ours, ref_pinv, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p, g", [(16, 2), (16, 4), (8, 8), (6, 2)])
def test_least_norm_and_smooth_are_consistent(p, g, dtype):
    x = torch.rand(2, 3, 2 * p, 3 * p, generator=_gen(2), dtype=torch.float64) * 255
    y = ppml.mix_subpatches(x, p, g).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for rec in (unmix_least_norm(y, p, g), unmix_smooth(y, p, g)):
        assert rec.shape == x.shape and rec.dtype == dtype
        assert torch.allclose(ppml.mix_subpatches(rec, p, g), y, atol=tol, rtol=0)
    weights = ppml.random_mixing_weights(2, 6, g, dtype=torch.float64, generator=_gen(3))
    yw = ppml.mix_subpatches(x, p, g, weights)
    for rec in (unmix_least_norm(yw, p, g, weights), unmix_smooth(yw, p, g, weights)):
        assert torch.allclose(ppml.mix_subpatches(rec, p, g, weights), yw, atol=1e-9, rtol=0)
    one = unmix_least_norm(y[0], p, g)  # a single [C, H/g, W/g] image
    assert one.shape == x.shape[1:] and torch.equal(one, unmix_least_norm(y, p, g)[0])


@pytest.mark.parametrize("keyed", [False, True])
def test_smooth_matches_the_kkt_solution(keyed):
    # min ½ xᵀLx s.t. Ax = y  <=>  [[L, Aᵀ], [A, 0]] [x; λ] = [0; y]: solved densely, compared with the CG answer.
    h, w, p, g = 8, 12, 4, 2
    weights = ppml.random_mixing_weights(1, 6, g, dtype=torch.float64, generator=_gen(4)) if keyed else None
    a = _mi_matrix(h, w, p, g, weights)
    lap = _smoothness_matrix(h, w)
    x = torch.rand(1, 1, h, w, dtype=torch.float64, generator=_gen(5))
    y = ppml.mix_subpatches(x, p, g, weights)
    m = a.shape[0]
    kkt = torch.cat([torch.cat([lap, a.T], 1), torch.cat([a, torch.zeros(m, m, dtype=torch.float64)], 1)])
    rhs = torch.cat([torch.zeros(h * w, dtype=torch.float64), y.flatten()])
    ref = torch.linalg.solve(kkt, rhs)[: h * w]
    ours = unmix_smooth(y, p, g, weights, iters=500, tol=1e-13).flatten()
    assert torch.allclose(ours, ref, atol=1e-9)
    ln = unmix_least_norm(y, p, g, weights).flatten()
    assert ours @ lap @ ours < ln @ lap @ ln  # smoother than the least-norm solution


def test_thumbnail_is_the_patch_means():
    p, g = 16, 4
    x = torch.rand(2, 3, 48, 32, generator=_gen(6), dtype=torch.float64) * 255
    y = ppml.mix_subpatches(x, p, g)
    means = F.avg_pool2d(x, p)  # computed from the plain image
    nearest = unmix_thumbnail(y, p, g, mode="nearest")
    assert torch.allclose(nearest, means.repeat_interleave(p, 2).repeat_interleave(p, 3), atol=1e-10)
    for mode in ("bilinear", "bicubic"):
        ref = F.interpolate(means, size=(48, 32), mode=mode, align_corners=False)
        assert torch.allclose(unmix_thumbnail(y, p, g, mode=mode), ref, atol=1e-10)
    clamped = unmix_thumbnail(y, p, g, value_range=(0, 255))
    assert clamped.min() >= 0 and clamped.max() <= 255
    u8 = (x.round().to(torch.uint8))
    assert unmix_thumbnail(ppml.mix_subpatches(u8, p, g), p, g).dtype == torch.float32  # MI of uint8 is float32


def test_unmix_dispatch():
    x = torch.rand(1, 3, 32, 32, generator=_gen(7))
    y = ppml.mix_subpatches(x, 16, 2)
    assert torch.equal(unmix(y, 16, 2, "least_norm"), unmix_least_norm(y, 16, 2))
    assert torch.equal(unmix(y, 16, 2, "thumbnail", value_range=(0, 1)), unmix_thumbnail(y, 16, 2, value_range=(0, 1)))
    assert torch.equal(unmix(y, 16, 2, "smooth"), unmix_smooth(y, 16, 2))
    dec = UnmixDecoder(16, 2, width=8, depth=2)  # untrained: its last layer is zero, so it returns the smooth answer
    assert torch.allclose(unmix(y, 16, 2, "decoder", decoder=dec), unmix_smooth(y, 16, 2), atol=1e-5)


# ---- the position attacker: decoding, convention, equivariance -------------------------------------------------------


def test_assign_positions_is_the_best_permutation():
    g = _gen(8)
    for n in (1, 2, 5, 6):
        scores = torch.randn(3, n, n, generator=g, dtype=torch.float64)
        perm_hat = assign_positions(scores)
        perms = torch.tensor(list(itertools.permutations(range(n))))  # [n!, n]
        idx = perms[None, :, :, None].expand(3, -1, -1, 1)
        totals = torch.gather(scores[:, None].expand(-1, len(perms), -1, -1), 3, idx)[..., 0].sum(2)  # [3, n!]
        assert torch.equal(perm_hat, perms[totals.argmax(1)])
    # forbidden cells (-inf) are avoided; a single [N, N] gives [N]
    scores = torch.zeros(4, 4)
    scores[0, 0] = scores[1, 1] = float("-inf")
    out = assign_positions(scores)
    assert out.shape == (4,) and sorted(out.tolist()) == [0, 1, 2, 3] and out[0] != 0 and out[1] != 1


def test_assign_positions_recovers_the_key_from_pointing_logits():
    perm = ppml.random_permutations(4, 196, generator=_gen(9))
    noise = torch.rand(4, 196, 196, generator=_gen(10))
    # argmax alone would collide (every tile also likes cell 0 a lot); the assignment still finds the key
    logits = noise + 5 * F.one_hot(perm, 196).float()
    logits[:, :, 0] += 5.5
    assert (logits.argmax(-1) == perm).float().mean() < 0.3
    perm_hat = assign_positions(logits.log_softmax(-1))
    assert perm_hat.dtype == torch.int64 and torch.equal(perm_hat, perm)
    assert torch.equal(perm_hat.sort(1).values, torch.arange(196).expand(4, -1))


def _tiny_attacker(p=8, img=32, head="factorized"):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return PositionAttacker(p, img, tile=min(p, 4), dim=16, depth=1, heads=2, head=head).eval()


def test_solve_with_attacker_uses_the_key_convention():
    # Plain tile j is painted with the value j; an oracle forward reads each ciphertext tile's value and says "tile i
    # came from cell value": the attack must then return the key itself, and decrypt the image.
    p, img = 8, 32
    rows = img // p
    plain = torch.arange(rows * rows, dtype=torch.float32).reshape(1, 1, rows, 1, rows, 1)
    plain = plain.expand(3, 3, rows, p, rows, p).reshape(3, 3, img, img).contiguous()
    enc, perm = ppml.shuffle_patches(plain, p, generator=_gen(11))
    model = _tiny_attacker(p, img)

    def oracle(x):
        values = x[:, 0, ::p, ::p].reshape(x.shape[0], -1).round().long()  # [B, N]: the value of each tile
        return F.one_hot(values, rows * rows).float().mul(20).log_softmax(-1)

    model.forward = oracle
    lp = predict_position_logits(model, enc, p)
    assert lp.shape == (3, 16, 16) and position_accuracy(lp, perm).tolist() == [1.0] * 3
    perm_hat = solve_with_attacker(model, enc, p)
    assert torch.equal(perm_hat, perm)
    assert direct_comparison(perm_hat, perm).tolist() == [1.0] * 3
    assert neighbor_comparison(perm_hat, perm, (rows, rows)).tolist() == [1.0] * 3
    assert perfect_reconstruction(perm_hat, perm).all()
    assert torch.equal(ppml.unshuffle_patches(enc, perm_hat, p), plain)
    assert torch.equal(solve_with_attacker(model, enc[1], p), perm[1])  # one [C, H, W] image


@pytest.mark.parametrize("head", ["factorized", "full"])
def test_attacker_is_equivariant_and_its_loss_is_the_nll(head):
    model = _tiny_attacker(head=head)
    x = torch.rand(2, 3, 32, 32, generator=_gen(12))
    enc1, perm1 = ppml.shuffle_patches(x, 8, generator=_gen(13))
    enc2, perm2 = ppml.shuffle_patches(x, 8, generator=_gen(14))
    lp1, lp2 = predict_position_logits(model, enc1, 8), predict_position_logits(model, enc2, 8)
    assert torch.allclose(lp1.logsumexp(-1), torch.zeros(2, 16), atol=1e-5)
    # the tile at ciphertext position i of enc1 (plain tile perm1[i]) sits at inv2[perm1[i]] in enc2
    where = torch.gather(ppml.invert_permutations(perm2), 1, perm1)
    assert torch.allclose(lp1, torch.gather(lp2, 1, where[..., None].expand(-1, -1, 16)), atol=1e-4)
    with torch.no_grad():
        ref = F.nll_loss(model(enc1).flatten(0, 1), perm1.flatten())
        assert torch.allclose(model.loss(enc1, perm1), ref, atol=1e-5)
    # uint8 and float inputs in another range give the same answer (per-image standardisation)
    assert torch.allclose(predict_position_logits(model, enc1 * 255, 8), lp1, atol=1e-4)


# ---- training: beating chance, resuming exactly, caching -------------------------------------------------------------


def test_tiny_position_attacker_beats_chance():
    # 4×4 grid of digits: chance is 1/16 = 0.0625; measured here: loss 2.34, position accuracy 0.168, direct
    # comparison after the assignment 0.196 (under 1 s on one core).
    model = train_position_attacker(8, 32, steps=40, batch_size=16, lr=3e-3, dim=32, depth=1, heads=2,
                                    data="digits", progress=False, threads=1)  # fmt: skip
    assert model.train_info["complete"] and model.train_info["loss"] < 2.6  # chance: ln 16 = 2.77
    g = _gen(1234)
    x = sample_crops(128, 32, g, data="digits")
    enc, perm = ppml.shuffle_patches(x, 8, generator=g)
    acc = position_accuracy(predict_position_logits(model, enc, 8), perm).mean().item()
    assert acc > 2 / 16
    perm_hat = solve_with_attacker(model, enc, 8)
    assert direct_comparison(perm_hat, perm).mean().item() > 1.5 / 16


def test_tiny_decoder_beats_its_starting_point():
    # Digits: the decoder starts as the smooth solution (zero last layer); measured MSE: least-norm 0.0262, smooth
    # 0.0068, decoder after these 40 steps 0.0049.
    dec = train_unmix_decoder(8, 2, img_size=32, crop=32, steps=40, batch_size=8, lr=3e-3, width=32, depth=4,
                              data="digits", progress=False, threads=1)  # fmt: skip
    g = _gen(1234)
    x = sample_crops(64, 32, g, data="digits")
    y = ppml.mix_subpatches(x, 8, 2)
    mse = {
        "decoder": F.mse_loss(unmix_with_decoder(dec, y, 8, 2), x).item(),
        "smooth": F.mse_loss(unmix_smooth(y, 8, 2), x).item(),
        "least_norm": F.mse_loss(unmix_least_norm(y, 8, 2), x).item(),
    }
    assert mse["decoder"] < 0.9 * mse["smooth"] < mse["least_norm"], mse
    rec = unmix_with_decoder(dec, y, 8, 2)
    assert torch.allclose(ppml.mix_subpatches(rec, 8, 2), y, atol=1e-5)  # consistent with the ciphertext


_TINY = {
    "attacker": (train_position_attacker, load_position_attacker, dict(patch_size=8, img_size=32, steps=6,
                 batch_size=4, dim=16, depth=1, heads=2, checkpoint_every=2, progress=False, threads=1)),
    "decoder": (train_unmix_decoder, load_unmix_decoder, dict(patch_size=8, grid=2, crop=16, steps=6, batch_size=4,
                width=8, depth=2, checkpoint_every=2, progress=False, threads=1)),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(_TINY))
def test_resume_gives_the_uninterrupted_weights(kind, tmp_path):
    train, load, kw = _TINY[kind]
    whole = train(**kw)
    path = tmp_path / "ck.pt"
    part = train(**kw, checkpoint=path, stop_after=3)
    assert part.train_info["steps_done"] == 3 and not part.train_info["complete"]
    resumed = train(**kw, checkpoint=path)
    assert resumed.train_info["steps_done"] == 6 and resumed.train_info["complete"]
    ref = whole.state_dict()
    assert ref.keys() == resumed.state_dict().keys()
    for name, t in resumed.state_dict().items():
        assert torch.equal(t, ref[name]), name
    cached = train(**kw, checkpoint=path)  # complete: loaded, not trained again
    assert cached.train_info["seconds"] == resumed.train_info["seconds"]
    loaded = load(path)
    assert all(torch.equal(t, ref[n]) for n, t in loaded.state_dict().items()) and not loaded.training
    with pytest.raises(ValueError, match=r"was trained with other settings .*'lr': \(0\.00[12], 0\.01\)"):
        train(**{**kw, "lr": 1e-2}, checkpoint=path)
    other = load_unmix_decoder if kind == "attacker" else load_position_attacker
    with pytest.raises(ValueError, match="is not a ppml .* checkpoint"):
        other(path)


def test_auto_checkpoint_goes_to_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PPML_CACHE_DIR", str(tmp_path))
    train, _, kw = _TINY["attacker"]
    model = train(**{**kw, "steps": 2}, checkpoint="auto")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("rs-attacker-p8-32-") and model.train_info["checkpoint"] == str(
        files[0]
    )


# ---- the corpus ---------------------------------------------------------------------------------------------------


def test_corpus_leaves_out_the_held_out_photos(monkeypatch):
    from ppml.attacks import kit as learned

    base = learned.public_images()
    assert len(base) >= 15 and all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in base)
    held = [learned._to_rgb_float(a) for n in HELD_OUT for a in learned._skimage_arrays(n)]
    for t in base:
        for h in held:
            if t.shape[1:] == h.shape[1:]:
                assert not torch.equal(t, learned._to_uint8(h))
    # asking for the held-out photos (and `cat`, which is chelsea) adds nothing
    monkeypatch.setattr(learned, "PUBLIC_PHOTOS", learned.PUBLIC_PHOTOS + ("cat", "astronaut", "coffee", "chelsea"))
    learned.public_images.cache_clear()
    try:
        assert len(learned.public_images()) == len(base)
    finally:
        learned.public_images.cache_clear()


def test_crops_are_reproducible():
    a = sample_crops(3, 24, _gen(15), digits_fraction=0.5)
    b = sample_crops(3, 24, _gen(15), digits_fraction=0.5)
    assert a.shape == (3, 3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    photo = load_photo("astronaut", 32)
    assert photo.shape == (3, 32, 32) and photo.dtype == torch.uint8


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_errors_name_the_function_argument_and_values(tmp_path):
    y = torch.rand(1, 3, 16, 16)
    cases = [
        (lambda: unmix_least_norm(y.long(), 16, 2), r"unmix_least_norm: mixed must be floating point .*got int64"),
        (lambda: unmix_thumbnail(y, 16, 3), r"unmix_thumbnail: grid must divide patch_size, got grid=3"),
        (lambda: unmix_smooth(y[..., :12], 16, 2), r"unmix_smooth: mixed's H and W must be positive multiples of "
                                                   r"patch_size/grid = 8.*\[1, 3, 16, 12\]"),
        (lambda: unmix_least_norm(y, 16, 2, torch.ones(1, 3, 4)),
         r"unmix_least_norm: weights must be float \[B, N, g\*g\] = \[1, 4, 4\].*got float32 \[1, 3, 4\]"),
        (lambda: unmix_thumbnail(y, 16, 2, mode="area"), r"unmix_thumbnail: mode must be one of .* got 'area'"),
        (lambda: unmix_smooth(y, 16, 2, value_range=(1, 0)), r"value_range must be None or \(lo, hi\) with lo < hi"),
        (lambda: unmix_smooth(y, 16, 2, iters=0), r"unmix_smooth: iters must be a positive integer, got 0"),
        (lambda: unmix(y, 16, 2, "magic"), r"unmix: method must be one of .* got 'magic'"),
        (lambda: unmix(y, 16, 2, "decoder"), r"unmix: method 'decoder' needs decoder="),
        (lambda: unmix_with_decoder(UnmixDecoder(8, 2, width=4, depth=2), y, 16, 2),
         r"unmix_with_decoder: patch_size and grid must be the decoder's \(8, 2\), got \(16, 2\)"),
        (lambda: assign_positions(torch.zeros(3, 4)), r"assign_positions: log_probs must be a float tensor .*\[3, 4\]"),
        (lambda: assign_positions(torch.full((2, 2), float("nan"))), r"assign_positions: log_probs must not hold NaN"),
        (lambda: predict_position_logits(_tiny_attacker(), torch.zeros(1, 3, 32, 32), 16),
         r"predict_position_logits: patch_size must be the attacker's, 8, got 16"),
        (lambda: predict_position_logits(_tiny_attacker(), torch.zeros(1, 3, 64, 64), 8),
         r"predict_position_logits: encrypted must be \[B, 1 or 3, 32, 32\].*got float32 \[1, 3, 64, 64\]"),
        (lambda: solve_with_attacker(object(), torch.zeros(1, 3, 32, 32), 8), r"model must be a .*PositionAttacker"),
        (lambda: position_accuracy(torch.zeros(2, 4, 4), torch.zeros(2, 3, dtype=torch.long)),
         r"position_accuracy: perm must be an integer tensor of shape \[2, 4\], got int64 \[2, 3\]"),
        (lambda: train_position_attacker(5, 32), r"train_position_attacker: patch_size must divide img_size, got "
                                                 r"patch_size=5, img_size=32"),
        (lambda: train_position_attacker(8, 32, tile=3), r"tile must divide patch_size, got tile=3"),
        (lambda: train_position_attacker(8, 32, head="mlp"), r"head must be one of .* got 'mlp'"),
        (lambda: train_position_attacker(8, 32, data="imagenet"), r"data must be one of .* got 'imagenet'"),
        (lambda: train_position_attacker(8, 32, steps=0), r"train_position_attacker: steps must be a positive integer"),
        (lambda: train_position_attacker(8, 32, dim=30, heads=4), r"dim must be divisible by heads, got dim=30"),
        (lambda: train_unmix_decoder(16, 2, crop=40), r"train_unmix_decoder: crop must be a multiple of "
                                                      r"patch_size=16, got 40"),
        (lambda: train_unmix_decoder(16, 2, checkpoint=3), r"checkpoint must be a path, 'auto' or None, got 3"),
        (lambda: load_photo("lena", 64), r"load_photo: name must be a skimage.data image .* got 'lena'"),
        (lambda: sample_crops(2, 32, _gen(0), data="faces"), r"sample_crops: data must be one of .* got 'faces'"),
    ]
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
    with pytest.raises(FileNotFoundError, match=r"load_position_attacker: path must be an existing checkpoint"):
        load_position_attacker(tmp_path / "missing.pt")
