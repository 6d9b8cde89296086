"""ppml.models ViTs on timm: the PE-free ViT's exact RS invariance (with a ViT that has a position embedding as the
negative control), RPE, the MI ViT (ciphertext input, in-model mixing, shape errors), timm registration, and the
package's import without timm. Tiny configurations throughout (32 px, patch 8, depth ≤ 2, width 48)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

timm = pytest.importorskip("timm")

import ppml  # noqa: E402
import ppml.models  # noqa: E402
from ppml.models import MODEL_NAMES, MIViT, PEFreeViT, ReferencePositionalEncoding, create_model  # noqa: E402

P = 8
TINY = dict(img_size=32, patch_size=P, depth=2, embed_dim=48, num_heads=3, num_classes=7)
INVARIANCE_ATOL = 1e-5


def images(b: int = 2, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def shuffled(x: torch.Tensor, patch_size: int = P) -> torch.Tensor:
    """RS ciphertext with a fixed, non-identity permutation per image (so the test cannot pass by accident)."""
    n = (x.shape[-2] // patch_size) * (x.shape[-1] // patch_size)
    perm = torch.stack([torch.roll(torch.arange(n), k + 1) for k in range(x.shape[0])])
    enc, _ = ppml.shuffle_patches(x, patch_size, perm)
    assert not torch.equal(enc, x)
    return enc


def build(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **dict(TINY, **kwargs)).eval()


# ------------------------------------------------------------------------------------------- PE-free ViT, exactness


@pytest.mark.parametrize("rpe", [True, False])
@pytest.mark.parametrize("pool", [dict(), dict(global_pool="avg"), dict(global_pool="avg", class_token=False)])
def test_pevit_is_exactly_invariant_to_rs(rpe, pool):
    model = build("pevit_tiny_patch16_224", rpe=rpe, **pool)
    x = images()
    with torch.no_grad():
        diff = (model(x) - model(shuffled(x))).abs().max().item()
    assert diff <= INVARIANCE_ATOL


def test_vit_with_position_embedding_is_not_invariant():
    """Negative control: the same test on timm's ViT with a learned position embedding fails."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()
    assert model.pos_embed is not None
    x = images()
    with torch.no_grad():
        diff = (model(x) - model(shuffled(x))).abs().max().item()
    assert diff > 10 * INVARIANCE_ATOL


def test_pevit_has_no_position_embedding():
    for rpe in (True, False):
        model = build("pevit_tiny_patch16_224", rpe=rpe)
        assert isinstance(model, PEFreeViT) and model.pos_embed is None
        names = [n for n, _ in model.named_parameters()]
        assert not any("pos_embed" in n for n in names)
        assert any(n.startswith("rpe.") for n in names) == rpe
        assert (model.rpe is not None) == rpe
        assert model.cls_token is not None


def test_pevit_refuses_a_position_embedding():
    with pytest.raises(ValueError, match=r"PEFreeViT: pos_embed must be 'none'.*got 'learn'"):
        build("pevit_tiny_patch16_224", pos_embed="learn")


def test_pevit_dynamic_img_size_stays_invariant():
    model = build("pevit_tiny_patch16_224", dynamic_img_size=True)
    x = images(size=48)  # not the build size
    with torch.no_grad():
        out = model(x)
        diff = (out - model(shuffled(x))).abs().max().item()
    assert out.shape == (2, 7) and diff <= INVARIANCE_ATOL


# ------------------------------------------------------------------------------------------------------------- RPE


def test_rpe_matches_definition_and_is_permutation_equivariant():
    torch.manual_seed(0)
    rpe = ReferencePositionalEncoding(16)
    tokens = torch.randn(2, 5, 16)
    expected = tokens + torch.sigmoid(rpe.mlp[2](torch.relu(rpe.mlp[0](tokens - rpe.reference))))
    torch.testing.assert_close(rpe(tokens), expected, rtol=0, atol=0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(rpe(tokens[:, perm]), rpe(tokens)[:, perm], rtol=0, atol=1e-6)
    names = {n for n, _ in rpe.named_parameters()}
    assert names == {"reference", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}


def test_rpe_bad_input():
    with pytest.raises(ValueError, match=r"ReferencePositionalEncoding: tokens must be \[\.\.\., D\] with D=16, got"):
        ReferencePositionalEncoding(16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="ReferencePositionalEncoding: dim must be a positive integer"):
        ReferencePositionalEncoding(0)


def test_rpe_on_patch_tokens_only_class_token_untouched():
    model = build("pevit_tiny_patch16_224")
    x = images()
    with torch.no_grad():
        patches = model.patch_embed(x)
        tokens = model._pos_embed(patches)
    assert tokens.shape == (2, 1 + 16, 48)
    torch.testing.assert_close(tokens[:, 0], model.cls_token[:, 0].expand(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 1:], model.rpe(patches), rtol=0, atol=0)
    assert not torch.equal(tokens[:, 1:], patches)


def test_gradients_reach_rpe():
    model = build("pevit_tiny_patch16_224").train()
    model(images()).square().sum().backward()
    for name, p in model.rpe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------------- MI ViT


def test_mivit_forward_on_ciphertext():
    model = build("mivit_tiny_patch16_224")
    assert isinstance(model, MIViT) and model.grid == 2 and not model.mix_input
    mixed = ppml.mix_subpatches(images(), P, 2)
    assert mixed.shape == (2, 3, 16, 16)
    with torch.no_grad():
        assert model(mixed).shape == (2, 7)
    assert isinstance(model.pos_embed, torch.nn.Parameter) and model.pos_embed.shape == (1, 1 + 16, 48)


def test_mivit_mix_input_equals_mixing_outside():
    outside = build("mivit_tiny_patch16_224")
    inside = build("mivit_tiny_patch16_224", seed=1, mix_input=True)
    inside.load_state_dict(outside.state_dict())  # strict: same parameter names
    x = images()
    with torch.no_grad():
        assert torch.equal(inside(x), outside(ppml.mix_subpatches(x, P, 2)))


def test_mivit_grid_and_patch_overrides():
    model = build("mivit_tiny_patch16_224", grid=4, in_chans=1)
    assert model.patch_embed.block == 2
    with torch.no_grad():
        assert model(ppml.mix_subpatches(images(c=1), P, 4)).shape == (2, 7)


def test_mivit_bad_inputs():
    model = build("mivit_tiny_patch16_224")
    with pytest.raises(
        ValueError,
        match=r"MIViT: input must be the MI ciphertext \[B, 3, 16, 16\].*got float32 "
        r"\[2, 3, 32, 32\].*mix_input=True",
    ):
        model(images())  # plain images into the ciphertext model
    with pytest.raises(
        ValueError,
        match=r"MIViT: input must be the MI ciphertext \[B, 3, H/g, W/g\], got float32 "
        r"\[2, 1, 16, 16\]",
    ):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"MIViT: input must be the MI ciphertext .*got float32 \[3, 16, 16\]"):
        model(torch.randn(3, 16, 16))
    inside = build("mivit_tiny_patch16_224", mix_input=True)
    with pytest.raises(
        ValueError,
        match=r"mix_input=True the input must be plain images \[B, 3, 32, 32\].*"
        r"\[2, 3, 16, 16\]",
    ):
        inside(ppml.mix_subpatches(images(), P, 2))
    with pytest.raises(ValueError, match="MixedPatchEmbed: grid must divide patch_size"):
        build("mivit_tiny_patch16_224", grid=3)
    with pytest.raises(ValueError, match="MIViT: embed_layer is fixed"):
        build("mivit_tiny_patch16_224", embed_layer=timm.layers.PatchEmbed)


def test_mivit_dynamic_size_intermediates_and_resize():
    model = build("mivit_tiny_patch16_224", dynamic_img_size=True)
    with torch.no_grad():
        assert model(ppml.mix_subpatches(images(size=48), P, 2)).shape == (2, 7)
    model = build("mivit_tiny_patch16_224")
    mixed = ppml.mix_subpatches(images(), P, 2)
    with torch.no_grad():
        feats = model.forward_intermediates(mixed, indices=1, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 48, 4, 4)]
    model.set_input_size(img_size=(48, 48))
    assert model.pos_embed.shape == (1, 1 + 36, 48)
    with torch.no_grad():
        assert model(ppml.mix_subpatches(images(size=48), P, 2)).shape == (2, 7)


# --------------------------------------------------------------------------------------------- timm registration


def test_model_names():
    assert MODEL_NAMES == tuple(
        f"{kind}_{size}_patch16_224" for kind in ("pevit", "mivit") for size in ("tiny", "small", "base")
    )
    assert set(timm.list_models("*vit_*_patch16_224")) >= set(MODEL_NAMES)
    assert not set(timm.list_pretrained()) & set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_timm_create_model(name):
    size = name.split("_")[1]
    width, heads = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[size]
    model = timm.create_model(name, pretrained=False, num_classes=7, img_size=32, patch_size=8, depth=1).eval()
    assert isinstance(model, PEFreeViT if name.startswith("pevit") else MIViT)
    assert model.embed_dim == width and model.blocks[0].attn.num_heads == heads and len(model.blocks) == 1
    x = images(b=1) if name.startswith("pevit") else ppml.mix_subpatches(images(b=1), 8, 2)
    with torch.no_grad():
        assert model(x).shape == (1, 7)


def test_create_model_defaults_are_the_paper_sizes():
    model = create_model("pevit_small_patch16_224", depth=1)  # depth only to keep it cheap
    assert model.patch_embed.patch_size == (16, 16) and model.patch_embed.img_size == (224, 224)
    assert model.num_classes == 1000 and model.embed_dim == 384
    model = create_model("mivit_tiny_patch16_224", depth=1)
    assert model.patch_embed.patch_size == 16 and model.patch_embed.grid == 2 and model.pos_embed.shape[1] == 197


def test_create_model_unknown_name():
    with pytest.raises(
        ValueError,
        match=r"create_model: model_name must be one of pevit_tiny_patch16_224, .*"
        r"mivit_base_patch16_224, got 'vit_tiny_patch16_224'",
    ):
        create_model("vit_tiny_patch16_224")


@pytest.mark.parametrize("factory", [create_model, timm.create_model])
def test_no_pretrained_weights(factory):
    with pytest.raises(ValueError, match="pevit_tiny_patch16_224 has no pretrained weights.*ppml ships none"):
        factory("pevit_tiny_patch16_224", pretrained=True)


def test_overrides_reach_the_model():
    model = create_model(
        "pevit_tiny_patch16_224", **dict(TINY, in_chans=1, drop_path_rate=0.1, global_pool="avg", class_token=False)
    )
    assert model.in_chans == 1 and model.global_pool == "avg" and model.cls_token is None
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with torch.no_grad():
        assert model.eval()(images(c=1)).shape == (2, 7)


# ------------------------------------------------------------------------------------------------- without timm


def test_package_imports_without_timm(monkeypatch):
    """ppml.models must import with timm missing: MixedPatchEmbed works, the ViTs explain how to get timm."""
    for key in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
        monkeypatch.setitem(sys.modules, key, None)  # makes `import timm...` raise ModuleNotFoundError
    old = ppml.models
    monkeypatch.setattr(ppml, "models", old)  # restored after the re-import rebinds it
    monkeypatch.delitem(sys.modules, "ppml.models")
    monkeypatch.delitem(sys.modules, "ppml.models.vit")
    fresh = importlib.import_module("ppml.models")
    assert fresh is not old and fresh.MODEL_NAMES == MODEL_NAMES
    assert fresh.MixedPatchEmbed(patch_size=8, grid=2, embed_dim=4)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 4)
    with pytest.raises(ImportError, match=r"create_model: the ViTs need timm.*pip install timm"):
        fresh.create_model("pevit_tiny_patch16_224")
    with pytest.raises(ImportError, match=r"ReferencePositionalEncoding: the ViTs need timm.*pip install timm"):
        fresh.ReferencePositionalEncoding  # noqa: B018
