"""Gallery linkage (ppml.attacks.reidentify): synthetic galleries whose answers are known by construction."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ppml
from ppml.attacks import evaluation_images, index_gallery, reidentify
from ppml.attacks.defences import encrypt_rs_defended


def smooth_images(n: int, size: int, seed: int, detail: int = 4) -> torch.Tensor:
    """uint8 [n, 3, size, size]: random low-resolution colour fields upscaled (neighbouring tiles alike, as in
    photos) plus faint noise, so no two tiles are trivially unique by noise alone."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, detail, detail, generator=gen)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.01 * torch.randn(n, 3, size, size, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Each uint8 image re-encoded as a JPEG (Pillow's defaults: 4:2:0 chroma) and decoded."""
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def shift_one_pixel(x: torch.Tensor) -> torch.Tensor:
    """Content moved 1 px right and down, the uncovered edge repeated."""
    return F.pad(x.float(), (1, 0, 1, 0), mode="replicate")[..., :-1, :-1].round().to(x.dtype)


@pytest.mark.parametrize("drop, gap", [(0.0, 0), (0.25, 0), (0.0, 2)])
def test_rs_exact_tiles_link_to_their_image(drop, gap):
    gallery = smooth_images(40, 48, seed=1)
    targets = torch.tensor([0, 7, 13, 39])
    enc = encrypt_rs_defended(gallery[targets], 8, drop=drop, gap=gap, generator=torch.Generator().manual_seed(2))
    found = reidentify(enc.encrypted, gallery, scheme="rs", patch_size=8, gap=gap, top_k=3)
    assert torch.equal(found.index, targets)
    assert torch.equal(found.exact, torch.ones(4))  # every present tile found bytewise
    assert found.candidates.shape == found.scores.shape == (4, 3)
    assert torch.equal(found.scores[:, 0], torch.zeros(4))
    assert bool((found.scores[:, 1:] > 0).all())
    assert bool((found.scores.diff(dim=1) >= 0).all())


def test_rs_exact_share_matches_a_brute_force_count():
    gallery = smooth_images(6, 32, seed=3)
    p = 8
    tiles = gallery[0].reshape(3, 4, p, 4, p).permute(1, 3, 0, 2, 4).reshape(16, -1)
    # A ciphertext holding 10 of image 0's tiles (shuffled) and 6 foreign ones.
    gen = torch.Generator().manual_seed(4)
    foreign = torch.randint(0, 256, (6, tiles.shape[1]), generator=gen, dtype=torch.uint8)
    mixed = torch.cat([tiles[torch.randperm(16, generator=gen)[:10]], foreign])
    cipher = mixed.reshape(4, 4, 3, p, p).permute(2, 0, 3, 1, 4).reshape(1, 3, 32, 32)
    found = reidentify(cipher, gallery, scheme="rs", patch_size=p, align=False)
    own = {bytes(t.tolist()) for t in tiles}
    expected = sum(bytes(t.tolist()) in own for t in mixed) / 16
    assert int(found.index) == 0
    assert float(found.exact) == pytest.approx(expected)


@pytest.mark.parametrize("p", [8, 16])
def test_rs_jpeg_and_shifted_ciphertext_still_link(p):
    gallery = smooth_images(60, 64, seed=5)
    targets = torch.arange(0, 60, 6)
    enc = encrypt_rs_defended(gallery[targets], p, generator=torch.Generator().manual_seed(6))
    for cipher in (jpeg(enc.encrypted, 75), shift_one_pixel(enc.encrypted)):
        found = reidentify(cipher, gallery, scheme="rs", patch_size=p, present=enc.present)
        assert (found.index == targets).float().mean() >= 0.9


def test_rs_batched_gallery_of_hundreds():
    gallery = smooth_images(400, 32, seed=7, detail=3)
    targets = torch.arange(5, 400, 20)
    cipher, _ = ppml.shuffle_patches(gallery[targets], 8, generator=torch.Generator().manual_seed(8))
    index = index_gallery(gallery, scheme="rs", patch_size=8)
    assert index.size == 400 and index.tiles.shape == (400, 16, 12)
    found = reidentify(cipher, index, scheme="rs", patch_size=8)
    assert torch.equal(found.index, targets)
    assert torch.equal(found.exact, torch.ones(len(targets)))
    # A smaller gallery cut from the index ranks as one indexed from scratch.
    near = targets[targets < 150]
    small = reidentify(cipher[: len(near)], index.head(150), scheme="rs", patch_size=8)
    fresh = reidentify(cipher[: len(near)], gallery[:150], scheme="rs", patch_size=8)
    assert torch.equal(small.candidates, fresh.candidates) and torch.equal(small.index, near)
    assert torch.allclose(small.scores, fresh.scores)


@pytest.mark.parametrize("g", [2, 4])
def test_mi_mean_recomputed_links_exactly(g):
    gallery = smooth_images(50, 32, seed=9)
    targets = torch.tensor([3, 17, 49])
    cipher = ppml.mix_subpatches(gallery[targets], 16, g)
    found = reidentify(cipher, gallery, scheme="mi", patch_size=16)  # g read from the shapes
    assert torch.equal(found.index, targets)
    assert torch.equal(found.exact, torch.ones(3))
    assert bool((found.scores[:, 0] < 1e-6 * found.scores[:, 1]).all())
    found = reidentify(jpeg(cipher.round().clamp(0, 255).to(torch.uint8), 90), gallery, scheme="mi", patch_size=16)
    assert torch.equal(found.index, targets)


def test_mi_keyed_links_by_affine_fit():
    gallery = smooth_images(50, 32, seed=10)
    targets = torch.tensor([1, 25, 40])
    w = ppml.random_mixing_weights(3, 4, grid=2, generator=torch.Generator().manual_seed(11))
    cipher = ppml.mix_subpatches(gallery[targets], 16, 2, w)
    found = reidentify(cipher, gallery, scheme="mi", patch_size=16, keyed=True, grid=8)
    assert torch.equal(found.index, targets)
    assert bool((found.scores[:, 0] < 1e-4 * found.scores[:, 1]).all())


def test_bad_arguments_name_the_argument():
    gallery = smooth_images(4, 32, seed=12)
    cipher, _ = ppml.shuffle_patches(gallery[:2], 8)
    cases = [
        (dict(scheme="xor", patch_size=8), "scheme"),
        (dict(scheme="rs", patch_size=8, grid=3), "grid"),
        (dict(scheme="rs", patch_size=0), "patch_size"),
        (dict(scheme="rs", patch_size=8, keyed=True), "keyed"),
        (dict(scheme="mi", patch_size=8, gap=2), "gap"),
        (dict(scheme="rs", patch_size=8, top_k=0), "top_k"),
        (dict(scheme="rs", patch_size=8, present=torch.ones(2, 3, dtype=torch.bool)), "present"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=rf"ppml\.attacks\.reidentify: .*{word}"):
            reidentify(cipher, gallery, **kwargs)
    with pytest.raises(ValueError, match="ciphertexts must be"):
        reidentify(cipher[..., :24], gallery, scheme="rs", patch_size=8)
    with pytest.raises(ValueError, match="ciphertexts must be a real tensor"):
        reidentify(torch.zeros(3, 32, 32), gallery, scheme="rs", patch_size=8)
    with pytest.raises(ValueError, match="mixing grid"):
        reidentify(torch.zeros(1, 3, 12, 12), gallery, scheme="mi", patch_size=8)
    with pytest.raises(ValueError, match="keyed MI needs more numbers"):
        reidentify(torch.zeros(1, 3, 8, 8), gallery, scheme="mi", patch_size=16, keyed=True, grid=1, mix_grid=4)
    index = index_gallery(gallery, scheme="rs", patch_size=8)
    with pytest.raises(ValueError, match="gallery index was made for"):
        reidentify(cipher, index, scheme="rs", patch_size=8, grid=4)
    with pytest.raises(ValueError, match="needs mix_grid"):
        index_gallery(gallery, scheme="mi", patch_size=8)


def test_evaluation_images_are_deterministic_and_distinct():
    x, names = evaluation_images(12, 32)
    y, names2 = evaluation_images(12, 32)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, y) and names == names2 and len(set(names)) == 12
    assert names[:3] == ("astronaut", "coffee", "chelsea")
    assert any(n.startswith("digit-val") for n in names) and any(n.startswith("lfw-face") for n in names)
    flat = x.flatten(1).float()
    d = torch.cdist(flat, flat) + torch.eye(12) * 1e9
    assert float(d.min()) > 0
    with pytest.raises(ValueError, match="n must be"):
        evaluation_images(2, 32)
