"""torch.compile with keys drawn by ppml: key drawing is a clean graph break (torch.compiler.disable in ppml/keys.py),
so plain torch.compile works and gives what eager gives with the same keys; fullgraph=True needs the keys passed in."""

from __future__ import annotations

import pytest
import torch

import ppml

BACKEND = "eager"  # the graph-break behaviour is Dynamo's, not the backend's; "eager" keeps this fast on 2 cores


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _images():
    return torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _decrypts(enc, perm, x, p=16):
    assert perm.dtype == torch.int64 and perm.shape == (x.shape[0], (x.shape[2] // p) * (x.shape[3] // p))
    assert torch.equal(ppml.unshuffle_patches(enc, perm, p), x)
    assert torch.equal(enc, ppml.shuffle_patches(x, p, perm)[0])  # compiled == eager with the same keys


def test_compile_shuffle_patches_without_perm():
    x = _images()
    enc, perm = torch.compile(lambda t: ppml.shuffle_patches(t, 16), backend=BACKEND)(x)
    _decrypts(enc, perm, x)


def test_compile_patch_shuffle_layer():
    x = _images().float()
    layer = torch.compile(ppml.PatchShuffle(16, return_perm=True), backend=BACKEND)
    enc, perm = layer(x)
    _decrypts(enc, perm, x)
    enc2, perm2 = layer(x)  # fresh keys on every call, no recompile needed for that
    _decrypts(enc2, perm2, x)


def test_compile_with_generator_matches_eager():
    x = _images()
    enc, perm = torch.compile(
        lambda t: ppml.shuffle_patches(t, 16, generator=torch.Generator().manual_seed(7)), backend=BACKEND
    )(x)
    _decrypts(enc, perm, x)
    eager_enc, eager_perm = ppml.shuffle_patches(x, 16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(perm, eager_perm) and torch.equal(enc, eager_enc)
    # a generator held by the layer
    shuffle = ppml.PatchShuffle(16, return_perm=True, generator=torch.Generator().manual_seed(3))
    layer = torch.compile(shuffle, backend=BACKEND)
    enc, perm = layer(x)
    _decrypts(enc, perm, x)
    assert torch.equal(perm, ppml.random_permutations(2, 6, generator=torch.Generator().manual_seed(3)))


def test_compile_keyed_subpatch_mix():
    x = _images()
    mix = torch.compile(ppml.SubpatchMix(16, 2, keyed=True, return_weights=True), backend=BACKEND)
    out, w = mix(x)
    assert torch.equal(out, ppml.mix_subpatches(x, 16, 2, w))


def test_fullgraph_with_explicit_perm():
    x = _images()
    perm = ppml.random_permutations(2, 6)
    f = torch.compile(lambda t, p: ppml.unshuffle_patches(ppml.shuffle_patches(t, 16, p)[0], p, 16), backend=BACKEND,
                      fullgraph=True)
    assert torch.equal(f(x, perm), x)
    enc = torch.compile(lambda t, p: ppml.shuffle_patches(t, 16, p)[0], backend=BACKEND, fullgraph=True)(x, perm)
    _decrypts(enc, perm, x)


@pytest.mark.parametrize("case", ["no_perm", "generator", "layer"])
def test_fullgraph_without_perm_names_the_key_draw(case):
    x = _images()
    gen = torch.Generator().manual_seed(0)
    fn = {
        "no_perm": lambda t: ppml.shuffle_patches(t, 16),
        "generator": lambda t: ppml.shuffle_patches(t, 16, generator=gen),
        "layer": ppml.PatchShuffle(16),
    }[case]
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"(?s)_draw_permutations.*perm="):
        torch.compile(fn, backend=BACKEND, fullgraph=True)(x)
