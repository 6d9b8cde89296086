"""ppml.PatchShuffle and ppml.SubpatchMix as torchvision v2 transforms: PIL images, tv_tensors.Image and tensors
[C, H, W] / [B, C, H, W] in, the same kind out; checked against torchvision's own conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ppml

v2 = pytest.importorskip("torchvision.transforms.v2")
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

P = 16


def _pil(mode="RGB", h=32, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_patch_shuffle_pil_matches_tensor_path(mode):
    img = _pil(mode)
    out, perm = ppml.PatchShuffle(P, return_perm=True, generator=_gen())(img)
    assert isinstance(out, Image.Image) and out.mode == img.mode and out.size == img.size
    x = TF.pil_to_tensor(img)  # torchvision's [C, H, W] uint8: the independent reference
    expected, _ = ppml.shuffle_patches(x[None], P, perm[None])
    assert perm.shape == (6,)
    assert torch.equal(TF.pil_to_tensor(out), expected[0])
    assert torch.equal(ppml.unshuffle_patches(TF.pil_to_tensor(out)[None], perm[None], P)[0], x)
    # and back through torchvision's to_pil_image: the same picture
    assert np.array_equal(np.asarray(TF.to_pil_image(expected[0])), np.asarray(out))


def test_patch_shuffle_pil_palette_keeps_palette():
    img = _pil("P")
    out, perm = ppml.PatchShuffle(P, return_perm=True, generator=_gen())(img)
    assert out.mode == "P" and out.getpalette() == img.getpalette()
    x = torch.from_numpy(np.array(img))[None, None]
    assert torch.equal(torch.from_numpy(np.array(out))[None, None], ppml.shuffle_patches(x, P, perm[None])[0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("batched", [False, True])
def test_patch_shuffle_tv_image_and_tensors(dtype, batched):
    x = TF.pil_to_tensor(_pil()).to(dtype)
    if batched:
        x = torch.stack([x, x.flip(-1)])
    for inp in (tv_tensors.Image(x), x):
        out, perm = ppml.PatchShuffle(P, return_perm=True, generator=_gen())(inp)
        assert type(out) is type(inp) and out.shape == x.shape and out.dtype == dtype
        assert perm.shape == ((2, 6) if batched else (6,))
        xb, ob, pb = (x, out, perm) if batched else (x[None], out[None], perm[None])
        assert torch.equal(ob.as_subclass(torch.Tensor), ppml.shuffle_patches(xb, P, pb)[0])


def test_subpatch_mix_pil_is_rounded_mean():
    img = _pil("RGB")
    out = ppml.SubpatchMix(P, 2)(img)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (img.width // 2, img.height // 2)
    exact = ppml.mix_subpatches(TF.pil_to_tensor(img)[None], P, 2)[0]  # float32 means
    assert torch.equal(TF.pil_to_tensor(out), exact.round().to(torch.uint8))
    assert (TF.pil_to_tensor(out).float() - exact).abs().max() <= 0.5
    gray = ppml.SubpatchMix(P, 2)(img.convert("L"))
    assert gray.mode == "L"


def test_subpatch_mix_pil_float_mode_and_refusals():
    img = _pil("F")
    out = ppml.SubpatchMix(P, 2)(img)
    exact = ppml.mix_subpatches(torch.from_numpy(np.array(img))[None, None], P, 2)[0, 0]
    assert out.mode == "F" and np.array_equal(np.asarray(out), exact.numpy())
    with pytest.raises(ValueError, match=r"ppml.SubpatchMix: .*mode 'P'"):
        ppml.SubpatchMix(P, 2)(_pil("P"))


@pytest.mark.parametrize("batched", [False, True])
def test_subpatch_mix_tv_image_keyed(batched):
    x = TF.pil_to_tensor(_pil())
    if batched:
        x = torch.stack([x, x])
    out, w = ppml.SubpatchMix(P, 2, keyed=True, return_weights=True, generator=_gen())(tv_tensors.Image(x))
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32
    xb, wb = (x, w) if batched else (x[None], w[None])
    ref = ppml.mix_subpatches(xb, P, 2, wb)
    assert torch.equal(out.as_subclass(torch.Tensor), ref if batched else ref[0])


@pytest.mark.parametrize("kind", ["pil", "tv_image"])
def test_in_v2_compose_after_random_resized_crop(kind):
    img = _pil(h=80, w=96)
    if kind == "tv_image":
        img = v2.ToImage()(img)
    crop = v2.RandomResizedCrop((64, 64), antialias=True)
    torch.manual_seed(0)
    cropped = crop(img)
    torch.manual_seed(0)
    out, perm = v2.Compose([crop, ppml.PatchShuffle(P, return_perm=True, generator=_gen())])(img)
    assert type(out) is type(cropped)
    to_t = TF.pil_to_tensor if kind == "pil" else (lambda t: t.as_subclass(torch.Tensor))
    assert torch.equal(ppml.unshuffle_patches(to_t(out)[None], perm[None], P)[0], to_t(cropped))
    torch.manual_seed(0)
    mixed = v2.Compose([crop, ppml.SubpatchMix(P, 2), v2.ToDtype(torch.float32)])(img)
    assert tuple(TF.get_size(mixed)) == (32, 32)
