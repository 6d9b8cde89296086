"""Encrypted-domain augmentation (ppml.augment): ciphertext transforms equal plaintext augmentation.

Geometric ops: the ciphertext transform equals encrypting the transformed plain image with a re-indexed key, bit for
bit; a PE-free ViT gives the same logits. Photometric ops: commute with RS bit for bit and follow torchvision.
Mixing and dropping: whole cells, exact lam, exact counts, reproducible draws.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_ulp

import ppml
from ppml import augment as A

P = 4  # RS patch size of the small test images


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(shape=(3, 3, 16, 16), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed))


def _perm(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return ppml.random_permutations(batch, n, generator=_gen(seed))


# ---- geometric: bit-exact, no model ---------------------------------------------------------------------------------

# Where the plain transform moves tile (r, c) of a th×tw grid, as (new row, new column, new grid width) — written
# out by hand from torch.flip / torch.rot90(dims=(-2, -1)) (k = 1 is counter-clockwise: pixel (y, x) → (W−1−x, y)).
TILE_MOVES = {
    "hflip": lambda r, c, th, tw: (r, tw - 1 - c, tw),
    "vflip": lambda r, c, th, tw: (th - 1 - r, c, tw),
    "rot1": lambda r, c, th, tw: (tw - 1 - c, r, th),
    "rot2": lambda r, c, th, tw: (th - 1 - r, tw - 1 - c, tw),
    "rot3": lambda r, c, th, tw: (c, th - 1 - r, th),
}
PLAIN = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot1": lambda x: torch.rot90(x, 1, (-2, -1)),
    "rot2": lambda x: torch.rot90(x, 2, (-2, -1)),
    "rot3": lambda x: torch.rot90(x, 3, (-2, -1)),
}
PER_PATCH = {
    "hflip": A.hflip_patches,
    "vflip": A.vflip_patches,
    "rot1": lambda x, p: A.rot90_patches(x, p, 1),
    "rot2": lambda x, p: A.rot90_patches(x, p, 2),
    "rot3": lambda x, p: A.rot90_patches(x, p, -1),  # k is taken mod 4
}


def _moved_key(name: str, perm: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """perm'[b, i] = σ(perm[b, i]) with σ the plain transform's tile move (as flat row-major indices)."""
    sigma = torch.empty(th * tw, dtype=torch.int64)
    for r in range(th):
        for c in range(tw):
            nr, nc, width = TILE_MOVES[name](r, c, th, tw)
            sigma[r * tw + c] = nr * width + nc
    return sigma[perm]


# (a rotated non-square image has another tile grid: rotations on square images only)
@pytest.mark.parametrize("name, hw", [(n, (16, 16)) for n in TILE_MOVES] + [("hflip", (8, 16)), ("vflip", (8, 16))])
def test_rs_per_patch_transform_is_encryption_of_transformed_plain(name, hw):
    x = _images((3, 3, *hw))
    th, tw = hw[0] // P, hw[1] // P
    perm = _perm(3, th * tw)
    cipher, _ = ppml.shuffle_patches(x, P, perm)
    expected, _ = ppml.shuffle_patches(PLAIN[name](x), P, _moved_key(name, perm, th, tw))
    assert torch.equal(PER_PATCH[name](cipher, P), expected)


@pytest.mark.parametrize("name", list(TILE_MOVES))
def test_rs_whole_image_transform_is_encryption_of_transformed_plain(name):
    # A whole-ciphertext flip/rotation is also an RS encryption of the transformed plain image (the key re-indexed
    # by σ on both sides): σ(perm[σ⁻¹(i)]).
    x = _images()
    th = tw = 16 // P
    perm = _perm(3, th * tw)
    cipher, _ = ppml.shuffle_patches(x, P, perm)
    sigma = _moved_key(name, torch.arange(th * tw)[None], th, tw)[0]
    inv_sigma = torch.empty_like(sigma).scatter_(0, sigma, torch.arange(th * tw))
    expected, _ = ppml.shuffle_patches(PLAIN[name](x), P, sigma[perm][:, inv_sigma])
    assert torch.equal(PLAIN[name](cipher), expected)


def _mi_inputs(exact: bool) -> torch.Tensor:
    # dyadic values k/256: every partial sum of 4 is exact, so the summation order cannot show
    g = _gen(3)
    if exact:
        return torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 256
    return torch.rand(2, 3, 32, 32, generator=g)


@pytest.mark.parametrize("name", list(TILE_MOVES))
@pytest.mark.parametrize("exact", [True, False])
def test_mi_commutes_with_whole_image_transform(name, exact):
    # mix(T(x)) == T(mix(x)) for the WHOLE mixed image (blocks move and flip), which is what a model with position
    # embeddings needs. Random floats: the flipped sub-patches are summed in another order (≤ 1 ulp, measured).
    x = _mi_inputs(exact)
    got = PLAIN[name](ppml.mix_subpatches(x, 8, 2))
    ref = ppml.mix_subpatches(PLAIN[name](x), 8, 2)
    if exact:
        assert torch.equal(got, ref)
    else:
        assert_within_ulp(got, ref, abs_terms=ref.abs())


@pytest.mark.parametrize("name", list(TILE_MOVES))
def test_mi_per_patch_transform_equals_mixed_transform_up_to_block_order(name):
    # The per-patch flip of an MI ciphertext is mix(T(x)) with its q×q blocks permuted by σ⁻¹ — the same tokens,
    # so an exact equivalent for a permutation-invariant model only.
    x = _mi_inputs(exact=True)
    q, th = 4, 32 // 8
    sigma = _moved_key(name, torch.arange(th * th)[None], th, th)
    got = PER_PATCH[name](ppml.mix_subpatches(x, 8, 2), q)
    ref, _ = ppml.shuffle_patches(ppml.mix_subpatches(PLAIN[name](x), 8, 2), q, sigma.expand(2, -1).contiguous())
    assert torch.equal(got, ref)


def test_random_patch_flip_per_sample_choices():
    x = _images((64, 3, 8, 8))
    out = A.random_patch_flip(x, P, p_h=0.5, p_v=0.5, p_rot90=0.5, generator=_gen(5))
    # every image is one of the 16 (h, v, k) combinations, applied to all its patches
    cands = []
    for h in (0, 1):
        for v in (0, 1):
            for k in range(4):
                t = A.hflip_patches(x, P) if h else x
                t = A.vflip_patches(t, P) if v else t
                cands.append(A.rot90_patches(t, P, k))
    match = torch.stack([(c == out).flatten(1).all(1) for c in cands], 1)  # [B, 16]
    assert bool(match.any(1).all())
    assert int(match[:, 0].sum()) < 64  # not all identity
    # probabilities 1: every image flipped left–right, nothing else
    assert torch.equal(A.random_patch_flip(x, P, 1.0, generator=_gen(0)), A.hflip_patches(x, P))
    assert A.random_patch_flip(x, P, 0.0) is x
    whole = A.random_patch_flip(x, P, 1.0, 1.0, per_patch=False, generator=_gen(0))
    assert torch.equal(whole, x.flip(-1).flip(-2))


# ---- geometric: model level ----------------------------------------------------------------------------------------


def _pe_free_vits():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    torch.manual_seed(0)
    models = {"timm": VisionTransformer(**kw, pos_embed="none", class_token=True)}
    assert models["timm"].pos_embed is None, f"timm {timm.__version__} kept a position embedding"
    import ppml.models

    create = getattr(ppml.models, "create_model", None)
    if create is not None:  # ppml's own PE-free ViT, with its default RPE and without
        models["ppml_pevit"] = create("pevit_tiny_patch16_224", **kw)
        models["ppml_pevit_no_rpe"] = create("pevit_tiny_patch16_224", **kw, rpe=False)
    return {k: m.eval() for k, m in models.items()}


@torch.no_grad()
def test_pe_free_vit_sees_ciphertext_transform_as_plain_transform():
    x = _images((2, 3, 32, 32))
    p, th = 8, 4
    perm = _perm(2, th * th)
    cipher, _ = ppml.shuffle_patches(x, p, perm)
    for model_name, model in _pe_free_vits().items():
        for name in TILE_MOVES:
            fresh, _ = ppml.shuffle_patches(PLAIN[name](x), p, generator=_gen(11))
            got, ref = model(PER_PATCH[name](cipher, p)), model(fresh)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5, msg=f"{model_name}/{name}")
        # and the transform is not a no-op for the model
        assert (model(A.hflip_patches(cipher, p)) - model(cipher)).abs().max() > 1e-4


# ---- photometric ---------------------------------------------------------------------------------------------------

FACTORS = torch.tensor([0.0, 0.35, 1.0, 1.7, 2.5], dtype=torch.float64)  # 2.5 and 1.7 clamp
PHOTO = {
    "brightness": A.adjust_brightness,
    "contrast": A.adjust_contrast,
    "saturation": A.adjust_saturation,
    "grayscale": lambda x, f: A.to_grayscale(x, 3),
}


@pytest.mark.parametrize("name", list(PHOTO))
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_photometric_commutes_with_rs_bit_exact(name, channels, dtype):
    x = _images((5, channels, 16, 16)).to(dtype)
    perm = _perm(5, 16)
    cipher, _ = ppml.shuffle_patches(x, P, perm)
    enc_of_aug, _ = ppml.shuffle_patches(PHOTO[name](x, FACTORS), P, perm)
    assert torch.equal(PHOTO[name](cipher, FACTORS), enc_of_aug)


def test_random_photometric_commutes_with_rs_bit_exact():
    x = _images((6, 3, 16, 16))
    perm = _perm(6, 16)
    kw = dict(brightness=0.4, contrast=0.4, saturation=0.4, grayscale_p=0.5)
    cipher, _ = ppml.shuffle_patches(x, P, perm)
    enc_of_aug, _ = ppml.shuffle_patches(A.random_photometric(x, **kw, generator=_gen(2)), P, perm)
    assert torch.equal(A.random_photometric(cipher, **kw, generator=_gen(2)), enc_of_aug)


def _fma_cpu() -> bool:
    # torch's add(alpha=...) is a fused multiply-add on AVX2/AVX-512 builds (and on CUDA); ppml.augment follows that
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("channels", [3, 1])
def test_photometric_matches_torchvision(channels, monkeypatch):
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    x = _images((5, channels, 12, 12))
    tv = {
        "brightness": TF.adjust_brightness,
        "saturation": TF.adjust_saturation,
        "contrast": TF.adjust_contrast,
    }
    for name, fn in tv.items():
        ref = torch.stack([fn(x[b], float(FACTORS[b])) for b in range(5)])
        got = PHOTO[name](x, FACTORS)
        if name == "brightness" or _fma_cpu():
            # contrast: ppml's mean is order-independent (sorted, float64), torchvision's a float32 reduction whose
            # rounding depends on the order; with torchvision's mean plugged in, everything else is bit-exact.
            if name == "contrast":
                with monkeypatch.context() as m:
                    m.setattr(A, "_invariant_mean", lambda g: g.mean(dim=(-3, -2, -1)))
                    assert torch.equal(PHOTO[name](x, FACTORS), ref), name
            else:
                assert torch.equal(got, ref), name
        torch.testing.assert_close(got, ref, rtol=0, atol=4e-7, msg=name)
        # a float factor gives the same bits as a tensor of it
        assert torch.equal(PHOTO[name](x, 1.3), PHOTO[name](x, torch.full((5,), 1.3, dtype=torch.float64)))
    assert torch.equal(A.to_grayscale(x), torch.stack([TF.rgb_to_grayscale(x[b]) for b in range(5)]))
    assert torch.equal(A.to_grayscale(x, 3), torch.stack([TF.rgb_to_grayscale(x[b], 3) for b in range(5)]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_photometric_other_dtypes_within_an_ulp_of_torchvision(dtype):
    TF = pytest.importorskip("torchvision.transforms.v2.functional")
    x = _images((5, 3, 12, 12)).to(dtype)
    for name, fn in (("brightness", TF.adjust_brightness), ("saturation", TF.adjust_saturation),
                     ("contrast", TF.adjust_contrast)):
        ref = torch.stack([fn(x[b], float(FACTORS[b])) for b in range(5)])
        got = PHOTO[name](x, FACTORS)
        assert got.dtype == dtype
        # values in [0, 1]: one ulp is at most eps; contrast may add |1 − f|·ulp(mean)
        tol = torch.finfo(dtype).eps * (1 if name != "contrast" else 3)
        torch.testing.assert_close(got, ref, rtol=0, atol=tol, msg=name)


def test_contrast_mean_is_correctly_rounded():
    gray = A._gray(_images((8, 3, 32, 32)))
    ours = A._invariant_mean(gray)
    exact = gray.double().mean(dim=(-3, -2, -1))
    assert torch.equal(ours, exact.float())


def test_random_photometric_ranges():
    x = torch.full((256, 1, 4, 4), 0.25)
    out = A.random_photometric(x, brightness=0.5, generator=_gen(0))
    f = out[:, 0, 0, 0] / 0.25
    assert bool((f >= 0.5 - 1e-6).all() and (f <= 1.5 + 1e-6).all()) and f.std() > 0.2
    rgb = _images((200, 3, 4, 4))
    g = A.random_photometric(rgb, grayscale_p=0.5, generator=_gen(0))
    is_gray = (g[:, 0] == g[:, 1]).flatten(1).all(1) & (g[:, 1] == g[:, 2]).flatten(1).all(1)
    assert 60 < int(is_gray.sum()) < 140
    assert A.random_photometric(x) is x


# ---- mixing and dropping -------------------------------------------------------------------------------------------


def _labelled(batch=16, hw=16):
    # image b is constant b + 1: every cell tells which image it came from
    x = (torch.arange(batch, dtype=torch.float32) + 1).view(-1, 1, 1, 1).expand(batch, 3, hw, hw).contiguous()
    return x, torch.arange(batch) * 10


def test_cutmix_patches_whole_cells_and_exact_lam():
    x, labels = _labelled()
    out, la, lb, lam = A.cutmix_patches(x, labels, 1.0, P, generator=_gen(0))
    assert lam.dtype == torch.float32 and lam.shape == (16,)
    assert torch.equal(la, labels)
    cells = out.reshape(16, 3, 4, P, 4, P)
    first = cells[:, :1, :, :1, :, :1]
    assert bool((cells == first).all()), "a cell mixes two sources"
    src = first.reshape(16, 16).long() - 1  # source image of each cell
    own = src == torch.arange(16)[:, None]
    partner = torch.where(own, -1, src).max(1).values
    mixed = partner >= 0
    assert torch.equal(lam[mixed], own[mixed].float().mean(1))
    assert torch.equal(lb[mixed], labels[partner[mixed]])
    assert bool((lam * 16 == (lam * 16).round()).all())
    assert 0 < int(mixed.sum()) and bool(((src == torch.arange(16)[:, None]) | (src == partner[:, None])).all())


def test_mixup_lam_and_pairs():
    x, labels = _labelled()
    out, la, lb, lam = A.mixup(x, labels, 0.4, generator=_gen(0))
    assert lam.dtype == torch.float32 and bool(((lam >= 0) & (lam <= 1)).all())
    assert torch.equal(la, labels)
    va, vb = (la // 10 + 1).float(), (lb // 10 + 1).float()
    torch.testing.assert_close(out[:, 0, 0, 0], lam * va + (1 - lam) * vb)
    assert A.mixup(x, labels, 0.0)[0] is x


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.75, 1.0])
def test_patch_drop_exact_count(ratio):
    x, _ = _labelled()
    out = A.patch_drop(x, P, ratio, fill=-1.0, generator=_gen(0))
    dropped = (out.reshape(16, 3, 4, P, 4, P) == -1).all(5).all(3).all(1)  # [B, th, tw] whole cells
    assert bool(((out == -1) | (out == x)).all())
    assert torch.equal(dropped.flatten(1).sum(1), torch.full((16,), round(ratio * 16)))
    assert int((out == -1).sum()) == 3 * P * P * 16 * round(ratio * 16)


FULL = dict(hflip=0.5, vflip=0.5, rot90=0.5, brightness=0.3, contrast=0.3, saturation=0.3, grayscale=0.2,
            mixup_alpha=0.8, cutmix_alpha=1.0, patch_drop=0.25)


def test_encrypted_augment_reproducible():
    x, labels = _images((8, 3, 16, 16)), torch.arange(8)
    aug = A.EncryptedAugment(P, **FULL)
    runs = [aug(x, labels, generator=_gen(s)) for s in (7, 7, 8)]
    for a, b in zip(runs[0], runs[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    # the global generator is used when none is given
    torch.manual_seed(3)
    first = aug(x, labels)[0]
    torch.manual_seed(3)
    assert torch.equal(first, aug(x, labels)[0])
    for fn in (lambda g: A.random_patch_flip(x, P, 0.5, 0.5, 0.5, generator=g),
               lambda g: A.random_photometric(x, 0.5, 0.5, 0.5, 0.5, generator=g),
               lambda g: A.patch_drop(x, P, 0.3, generator=g),
               lambda g: A.mixup(x, labels, 1.0, generator=g)[0],
               lambda g: A.cutmix_patches(x, labels, 1.0, P, generator=g)[0]):
        assert torch.equal(fn(_gen(1)), fn(_gen(1))) and not torch.equal(fn(_gen(1)), fn(_gen(2)))


def test_encrypted_augment_all_zeros_is_identity():
    x, labels = _images((4, 3, 16, 16)), torch.arange(4)
    aug = A.EncryptedAugment(P, hflip=0.0)
    out, la, lb, lam = aug(x, labels, generator=_gen(0))
    assert torch.equal(out, x) and torch.equal(la, labels) and torch.equal(lb, labels)
    assert lam.dtype == torch.float32 and torch.equal(lam, torch.ones(4))
    assert repr(aug) == "EncryptedAugment(patch_size=4)"
    assert "cutmix_alpha=1.0" in repr(A.EncryptedAugment(P, **FULL))


def test_encrypted_augment_switches_like_timm():
    x, labels = _labelled()
    only_cut = A.EncryptedAugment(P, hflip=0.0, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0)
    only_mix = A.EncryptedAugment(P, hflip=0.0, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.0)
    never = A.EncryptedAugment(P, hflip=0.0, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0)
    for s in range(3):
        _, _, _, lam = only_cut(x, labels, generator=_gen(s))
        assert bool((lam * 16 == (lam * 16).round()).all())
        out, _, _, lam = only_mix(x, labels, generator=_gen(s))
        cells = out.reshape(16, 3, 4, P, 4, P)
        assert bool((cells == cells[:, :1, :1, :1, :1, :1]).all())  # mixup: constant images stay constant
        out, _, lb, lam = never(x, labels, generator=_gen(s))
        assert torch.equal(out, x) and torch.equal(lb, labels) and bool((lam == 1).all())


def test_mixed_cross_entropy():
    logits = torch.randn(6, 5, generator=_gen(0))
    a, b = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([1, 1, 0, 4, 2, 3])
    lam = torch.tensor([1.0, 0.0, 0.3, 0.5, 0.9, 0.2])
    ref = (lam * F.cross_entropy(logits, a, reduction="none", label_smoothing=0.1)
           + (1 - lam) * F.cross_entropy(logits, b, reduction="none", label_smoothing=0.1)).mean()
    torch.testing.assert_close(A.mixed_cross_entropy(logits, a, b, lam, label_smoothing=0.1), ref)
    torch.testing.assert_close(A.mixed_cross_entropy(logits, a, b, 1.0), F.cross_entropy(logits, a))


# ---- bad inputs ----------------------------------------------------------------------------------------------------

X = torch.rand(2, 3, 8, 8, generator=_gen(0))
Y = torch.tensor([0, 1])
BAD = [
    (lambda: A.hflip_patches(X.to(torch.int32), 4), r"hflip_patches: x must be a floating-point or uint8 "
                                                     r"\[B, C, H, W\] tensor, got int32 \[2, 3, 8, 8\]"),
    (lambda: A.vflip_patches(X[0], 4), r"vflip_patches: x must be a floating-point or uint8 \[B, C, H, W\] tensor, "
                                       r"got float32"),
    (lambda: A.adjust_brightness(X.to(torch.uint8), 0.1),
     r"adjust_brightness: x must be a floating-point \[B, C, H, W\] tensor, got uint8"),
    (lambda: A.rot90_patches(X, 3), r"rot90_patches: patch_size must divide H and W, got patch_size=3 for H=8, W=8"),
    (lambda: A.rot90_patches(X, 4, 1.5), r"rot90_patches: k must be an int, got 1.5"),
    (lambda: A.random_patch_flip(X, 4, 1.5), r"random_patch_flip: p_h must be a probability in \[0, 1\], got 1.5"),
    (lambda: A.random_patch_flip(X[..., :4], 4, 0, 0, 0.5, per_patch=False),
     r"random_patch_flip: whole-image rotations \(per_patch=False, p_rot90 > 0\) need H == W, got H=8, W=4"),
    (lambda: A.random_patch_flip(X, 4, generator=1),
     r"random_patch_flip: generator must be None or a CPU torch.Generator, got 1"),
    (lambda: A.adjust_brightness(X, -0.1), r"adjust_brightness: factor must be a finite number >= 0, got -0.1"),
    (lambda: A.adjust_contrast(X, torch.ones(3)), r"adjust_contrast: factor must be a float or a floating-point \[B\] "
                                                  r"tensor with B=2, got float32 \[3\]"),
    (lambda: A.adjust_saturation(X, torch.tensor([1.0, -1.0])), r"adjust_saturation: factor must be finite and >= 0"),
    (lambda: A.to_grayscale(torch.rand(2, 4, 8, 8)), r"to_grayscale: x must have 1 or 3 channels, got float32 "
                                                     r"\[2, 4, 8, 8\]"),
    (lambda: A.random_photometric(X, grayscale_p=2), r"random_photometric: grayscale_p must be a probability"),
    (lambda: A.mixup(X, Y.int(), 1.0), r"mixup: labels must be int64 \[B\] with B=2, got int32 \[2\]"),
    (lambda: A.mixup(X, Y, -1.0), r"mixup: alpha must be a finite number >= 0, got -1.0"),
    (lambda: A.cutmix_patches(X, Y[:1], 1.0, 4),
     r"cutmix_patches: labels must be int64 \[B\] with B=2, got int64 \[1\]"),
    (lambda: A.cutmix_patches(X, Y, 1.0, 0), r"cutmix_patches: patch_size must be a positive integer, got 0"),
    (lambda: A.patch_drop(X, 4, 1.2), r"patch_drop: ratio must be a probability in \[0, 1\], got 1.2"),
    (lambda: A.EncryptedAugment(4, hflip=-0.5), r"EncryptedAugment: hflip must be a probability in \[0, 1\]"),
    (lambda: A.EncryptedAugment(4, cutmix_alpha=float("nan")), r"EncryptedAugment: cutmix_alpha must be a finite"),
    (lambda: A.EncryptedAugment(3)(X, Y), r"EncryptedAugment: patch_size must divide H and W"),
    (lambda: A.mixed_cross_entropy(torch.rand(2, 5), Y, Y, torch.ones(3)), r"mixed_cross_entropy: lam must be"),
]


@pytest.mark.parametrize("fn, message", BAD, ids=[m.split(":")[0].replace("\\", "") for _, m in BAD])
def test_bad_inputs_raise_clear_errors(fn, message):
    with pytest.raises(ValueError, match=r"ppml\.augment\." + message):
        fn()


def test_flips_move_uint8_pixels_as_they_move_floats():
    """Flips and rotations only move pixels: on uint8 they give the float result's values, still uint8 (the trainer
    keeps streamed ciphertext uint8 up to ppml.patch_tokens)."""
    x = torch.randint(0, 256, (3, 3, 8, 12), generator=_gen(1), dtype=torch.uint8)
    for fn in (lambda t: A.hflip_patches(t, 4), lambda t: A.vflip_patches(t, 4), lambda t: A.rot90_patches(t, 4, 1),
               lambda t: A.random_patch_flip(t, 4, 0.5, 0.5, 0.5, generator=_gen(2))):  # fmt: skip
        out = fn(x)
        assert out.dtype == torch.uint8 and torch.equal(out.float(), fn(x.float()))
    aug = A.EncryptedAugment(4, hflip=0.5, brightness=0.1)
    assert not aug.moves_pixels_only
    with pytest.raises(ValueError, match="EncryptedAugment: x must be a floating-point"):
        aug(x, torch.zeros(3, dtype=torch.int64))
    flips = A.EncryptedAugment(4, hflip=0.5, rot90=0.5)
    y = torch.arange(3)
    a, b = flips(x, y, generator=_gen(3)), flips(x.float(), y, generator=_gen(3))
    assert a[0].dtype == torch.uint8 and torch.equal(a[0].float(), b[0]) and torch.equal(a[3], b[3])
