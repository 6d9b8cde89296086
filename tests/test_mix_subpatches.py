"""ppml::mix_subpatches (MI): reference vs hand-worked cases and a loop oracle, every backend vs the reference
(within 1 ulp, tolerance table in conftest), the paper's properties, opcheck, gradcheck, compile, meta, bad inputs,
fuzzing, the keyed weights and the MI patch embedding identity. Triton: test_mix_subpatches_triton.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, DEVICES, LAYOUTS, assert_within_ulp, backends_for, make_images
from hypothesis import given, settings
from hypothesis import strategies as st

import ppml
from ppml.models import MixedPatchEmbed
from ppml.reference import mix_subpatches as ref_mix


def loop_oracle(x: np.ndarray, p: int, g: int, w: np.ndarray | None) -> np.ndarray:
    """float64 loops straight from the definition (independent of the reference's reshapes)."""
    B, C, H, W = x.shape
    q, tw = p // g, W // p
    out = np.zeros((B, C, H // g, W // g))
    for b in range(B):
        for ty in range(H // p):
            for tx in range(tw):
                for i in range(g):
                    for j in range(g):
                        wt = 1.0 / (g * g) if w is None else w[b, ty * tw + tx, i * g + j]
                        sub = x[b, :, ty * p + i * q : ty * p + (i + 1) * q, tx * p + j * q : tx * p + (j + 1) * q]
                        out[b, :, ty * q : (ty + 1) * q, tx * q : (tx + 1) * q] += wt * sub
    return out


def abs_terms(x: torch.Tensor, p: int, g: int, w: torch.Tensor | None) -> torch.Tensor:
    """Σ|w·x| per output element: the conditioning term of the tolerance."""
    wa = None if w is None else w.abs()
    return ref_mix(x.double().abs(), p, g, None if wa is None else wa.double()) * (g * g if w is None else 1)


# ---- reference ---------------------------------------------------------------------------------------------------


def test_reference_hand_worked():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # p = 4, g = 2: sub-patches [[0,1],[4,5]], [[2,3],[6,7]], [[8,9],[12,13]], [[10,11],[14,15]]
    assert torch.equal(ref_mix(x, 4, 2), torch.tensor([[[[5.0, 6.0], [9.0, 10.0]]]]))
    w = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])  # keep sub-patch (0, 0) only
    assert torch.equal(ref_mix(x, 4, 2, w), torch.tensor([[[[0.0, 1.0], [4.0, 5.0]]]]))
    # g = 1 is the identity; g = p averages whole patches
    assert torch.equal(ref_mix(x, 2, 1), x)
    assert torch.equal(ref_mix(x, 2, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


@pytest.mark.parametrize("p,g", [(4, 2), (6, 3), (4, 4), (8, 2)])
def test_reference_matches_loop_oracle(p, g):
    x = make_images((2, 3, 2 * p, 3 * p), torch.float64, seed=p + g)
    w = ppml.random_mixing_weights(2, 6, g, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for weights in (None, w):
        expected = loop_oracle(x.numpy(), p, g, None if weights is None else weights.numpy())
        np.testing.assert_allclose(ref_mix(x, p, g, weights).numpy(), expected, rtol=0, atol=1e-12)


def test_output_dtypes():
    for dtype in ALL_DTYPES:
        out = ref_mix(make_images((1, 1, 4, 4), dtype), 4, 2)
        assert out.dtype == (torch.float32 if dtype == torch.uint8 else dtype)


# ---- every backend vs the reference --------------------------------------------------------------------------------

CASES = [
    ((2, 3, 16, 16), 8, 2),
    ((1, 2, 12, 18), 6, 3),
    ((2, 3, 8, 8), 4, 4),
    ((1, 1, 8, 12), 4, 1),
    ((0, 3, 8, 8), 4, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,p,g", CASES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_backends_match_reference(device, dtype, layout, shape, p, g, weighted):
    x = make_images(shape, dtype, device, layout, seed=p * g)
    n = (shape[2] // p) * (shape[3] // p)
    gen = torch.Generator().manual_seed(3)
    w = ppml.random_mixing_weights(shape[0], n, g, generator=gen).to(device) if weighted else None
    expected = ref_mix(x, p, g, w)
    for backend in backends_for(device, "mix_subpatches"):
        out = ppml.mix_subpatches(x, p, g, w, backend=backend)
        assert out.shape == (shape[0], shape[1], shape[2] // g, shape[3] // g) and out.device == x.device
        assert_within_ulp(out, expected, abs_terms(x, p, g, w))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,p,g", [((2, 3, 32, 32), 16, 2), ((2, 1, 48, 40), 8, 4), ((1, 4, 24, 36), 12, 3)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64], ids=str)
def test_native_cpu_is_bit_exact(dtype, shape, p, g, layout):
    # The C++ kernel sums in the reference's order without FMA contraction: equal, not just close. The uint8 NCHW
    # cases reach the AVX2 path (runs of 8 outputs, an overlapping last step when 8 does not divide the run).
    if "native" not in backends_for("cpu", "mix_subpatches"):
        pytest.skip("native unavailable")
    x = make_images(shape, dtype, layout=layout, seed=p + g)
    n = (shape[2] // p) * (shape[3] // p)
    w = ppml.random_mixing_weights(shape[0], n, g, generator=torch.Generator().manual_seed(g))
    assert torch.equal(torch.ops.ppml.mix_subpatches(x, p, g, None), ref_mix(x, p, g))
    assert torch.equal(torch.ops.ppml.mix_subpatches(x, p, g, w), ref_mix(x, p, g, w))


def test_layout_rule():
    x = make_images((2, 3, 8, 8), torch.float32, layout="channels_last")
    assert torch.ops.ppml.mix_subpatches(x, 4, 2, None).is_contiguous(memory_format=torch.channels_last)
    sliced = make_images((2, 3, 8, 8), torch.float32, layout="sliced")
    assert torch.ops.ppml.mix_subpatches(sliced, 4, 2, None).is_contiguous()


# ---- the paper's properties (mean variant) -------------------------------------------------------------------------


def _integer_images(shape, seed=0):
    # integer-valued float64: every sum is exact, so the properties hold with equality
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("p,g", [(16, 2), (8, 4), (6, 3)])
def test_patch_means_are_preserved(p, g):
    x = _integer_images((2, 3, 2 * p, 3 * p))
    for backend in backends_for("cpu", "mix_subpatches"):
        out = ppml.mix_subpatches(x, p, g, backend=backend)
        assert torch.allclose(F.avg_pool2d(out, p // g), F.avg_pool2d(x, p), rtol=0, atol=1e-12)


def test_order_of_subpatches_inside_a_patch_does_not_matter():
    p, g, q = 8, 2, 4
    x = _integer_images((2, 3, 16, 24), seed=1)
    B, C, H, W = x.shape
    blocks = x.reshape(B, C, H // p, g, q, W // p, g, q)
    # a different random arrangement of the g×g sub-patches in every patch
    perm = ppml.random_permutations(B * (H // p) * (W // p), g * g, generator=torch.Generator().manual_seed(5))
    sub = blocks.permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(B * (H // p) * (W // p), g * g, C, q, q)
    sub = sub[torch.arange(sub.shape[0])[:, None], perm]
    shuffled = sub.reshape(B, H // p, W // p, g, g, C, q, q).permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(B, C, H, W)
    assert not torch.equal(shuffled, x)
    for backend in backends_for("cpu", "mix_subpatches"):
        mixed = ppml.mix_subpatches(shuffled, p, g, backend=backend)
        assert torch.equal(mixed, ppml.mix_subpatches(x, p, g, backend=backend))


@pytest.mark.parametrize(
    "transform",
    [lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(3, (-2, -1))],
    ids=["hflip", "vflip", "rot90", "rot270"],
)
def test_commutes_with_flips_and_rotations(transform):
    x = _integer_images((2, 3, 32, 32), seed=2)
    for backend in backends_for("cpu", "mix_subpatches"):
        a = ppml.mix_subpatches(transform(x), 16, 2, backend=backend)
        b = transform(ppml.mix_subpatches(x, 16, 2, backend=backend))
        assert torch.equal(a, b)


# ---- torch.library integration -------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(device, layout, weighted):
    x = make_images((2, 3, 8, 12), torch.float32, device, layout).requires_grad_(True)
    w = ppml.random_mixing_weights(2, 6, 2).to(device).requires_grad_(True) if weighted else None
    torch.library.opcheck(torch.ops.ppml.mix_subpatches, (x, 4, 2, w))
    xu = make_images((2, 3, 8, 12), torch.uint8, device, layout)
    torch.library.opcheck(torch.ops.ppml.mix_subpatches, (xu, 4, 2, None if w is None else w.detach()))


@pytest.mark.parametrize("shape,p", [((1, 2, 2, 4), 2), ((1, 2, 4, 4), 2)])
def test_opcheck_backward_with_one_pixel_subpatches_channels_last(shape, p):
    # Regression: with q = 1, B = 1 and channels_last, the traced backward's reshape had to be a view it could not be.
    x = make_images(shape, torch.float32, layout="channels_last").requires_grad_(True)
    torch.library.opcheck(torch.ops.ppml.mix_subpatches, (x, p, 2, None))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_images_and_weights(device):
    x = make_images((2, 2, 6, 9), torch.float64, device).requires_grad_(True)
    w = ppml.random_mixing_weights(2, 6, 3, dtype=torch.float64).to(device).requires_grad_(True)
    op = torch.ops.ppml.mix_subpatches
    assert torch.autograd.gradcheck(lambda a, b: op(a, 3, 3, b), (x, w))
    assert torch.autograd.gradgradcheck(lambda a, b: op(a, 3, 3, b), (x, w))
    assert torch.autograd.gradcheck(lambda a: op(a, 3, 3, None), (x,))
    for backend in backends_for(device, "mix_subpatches"):
        assert torch.autograd.gradcheck(lambda a, b, k=backend: ppml.mix_subpatches(a, 3, 3, b, backend=k), (x, w))


def test_gradient_dtypes_follow_inputs():
    x = make_images((1, 3, 8, 8), torch.bfloat16).requires_grad_(True)
    w = ppml.random_mixing_weights(1, 4, 2).requires_grad_(True)
    torch.ops.ppml.mix_subpatches(x, 4, 2, w).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_torch_compile_fullgraph():
    x = make_images((2, 3, 16, 16), torch.float32).requires_grad_(True)
    w = ppml.random_mixing_weights(2, 4, 2).requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(t, k):
        return ppml.mix_subpatches(t, 8, 2, k).square().sum()

    @torch.compile(fullgraph=True)
    def g(t):
        return torch.ops.ppml.mix_subpatches(t, 8, 2, None) * 3.0

    loss = f(x, w)
    loss.backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref_mix(x2, 8, 2, w2).square().sum().backward()
    assert torch.allclose(loss, ref_mix(x, 8, 2, w).square().sum())
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-4)
    assert torch.equal(g(x.detach()), ref_mix(x.detach(), 8, 2) * 3.0)


def test_meta_device():
    out = torch.ops.ppml.mix_subpatches(torch.empty(4, 3, 224, 224, dtype=torch.uint8, device="meta"), 16, 2, None)
    assert out.shape == (4, 3, 112, 112) and out.dtype == torch.float32 and out.device.type == "meta"
    w = torch.empty(4, 196, 4, device="meta")
    x = torch.empty(4, 3, 224, 224, device="meta").contiguous(memory_format=torch.channels_last)
    out = torch.ops.ppml.mix_subpatches(x, 16, 2, w)
    assert out.shape == (4, 3, 112, 112) and out.is_contiguous(memory_format=torch.channels_last)


# ---- bad input ---------------------------------------------------------------------------------------------------

BAD = [
    (torch.zeros(3, 8, 8), 4, 2, None, ValueError, r"images must be 4-D \[B, C, H, W\], got float32 \[3, 8, 8\]"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int16), 4, 2, None, TypeError, r"images must be uint8.*got int16"),
    (torch.zeros(1, 3, 8, 8), 4, 3, None, ValueError, r"grid must divide patch_size, got grid=3 for patch_size=4"),
    (torch.zeros(1, 3, 8, 8), 4, -2, None, ValueError, r"grid must be a positive integer, got -2"),
    (torch.zeros(1, 3, 8, 8), 4, 0, None, ValueError, r"grid must be a positive integer, got 0"),
    (torch.zeros(1, 3, 8, 8), 0, 1, None, ValueError, r"patch_size must be a positive integer, got 0"),
    (torch.zeros(1, 3, 8, 12), 8, 2, None, ValueError,
     r"patch_size must divide H and W, got patch_size=8 for H=8, W=12"),
    (torch.zeros(2, 3, 8, 8), 4, 2, torch.zeros(2, 4, 3), ValueError,
     r"weights must be float \[B, N, g\*g\] with B=2, N=\(H/p\)\*\(W/p\)=4, g\*g=4, got float32 \[2, 4, 3\]"),
    (torch.zeros(2, 3, 8, 8), 4, 2, torch.zeros(1, 4, 4), ValueError, r"got float32 \[1, 4, 4\]"),
    (torch.zeros(2, 3, 8, 8), 4, 2, torch.zeros(2, 4, 4, dtype=torch.int64), ValueError, r"got int64 \[2, 4, 4\]"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_input(case):
    images, p, g, w, exc, pattern = BAD[case]
    with pytest.raises(exc, match=r"ppml\.mix_subpatches: .*" + pattern):
        torch.ops.ppml.mix_subpatches(images, p, g, w)
    for backend in backends_for("cpu", "mix_subpatches"):
        with pytest.raises(exc, match=r"ppml\.mix_subpatches: .*" + pattern):
            ppml.mix_subpatches(images, p, g, w, backend=backend)


# ---- keys, module --------------------------------------------------------------------------------------------------


def test_random_mixing_weights():
    w = ppml.random_mixing_weights(8, 196, 2)
    assert w.shape == (8, 196, 4) and w.dtype == torch.float32 and (w >= 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(8, 196), atol=1e-6)
    assert not torch.equal(w, ppml.random_mixing_weights(8, 196, 2)), "OS entropy: fresh weights every call"
    a = ppml.random_mixing_weights(2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    b = ppml.random_mixing_weights(2, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(a, b) and a.shape == (2, 3, 9)
    # uniform on the simplex: each coordinate has mean 1/k
    many = ppml.random_mixing_weights(4000, 1, 2, dtype=torch.float64)
    assert torch.allclose(many.mean((0, 1)), torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)
    with pytest.raises(ValueError, match=r"ppml\.random_mixing_weights: grid must be a positive integer"):
        ppml.random_mixing_weights(1, 1, 0)


def test_subpatch_mix_module():
    img = make_images((3, 32, 32), torch.uint8)
    out = ppml.SubpatchMix(16, 2)(img)
    assert out.shape == (3, 16, 16) and torch.equal(out, ref_mix(img[None], 16, 2)[0])
    out, w = ppml.SubpatchMix(16, 2, keyed=True, return_weights=True)(img)
    assert w.shape == (4, 4) and torch.equal(out, ref_mix(img[None], 16, 2, w[None])[0])
    assert "grid=2" in repr(ppml.SubpatchMix())
    with pytest.raises(ValueError, match=r"ppml\.SubpatchMix: grid must divide patch_size"):
        ppml.SubpatchMix(16, 3)


# ---- the MI patch embedding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,g", [(16, 2), (8, 4), (6, 3)])
def test_mixed_patch_embed_identity(p, g):
    # The paper's identity: a conv with kernel = stride = p/g on the plain image, then g×g average pooling, equals the
    # linear embedding of the mean-mixed image.
    torch.manual_seed(0)
    embed = MixedPatchEmbed(p, g, in_chans=3, embed_dim=12).double()
    x = torch.randn(2, 3, 2 * p, 3 * p, dtype=torch.float64)
    plain = F.avg_pool2d(embed.proj(x), g)
    mixed = embed.proj(ppml.mix_subpatches(x, p, g))
    assert torch.allclose(plain, mixed, rtol=0, atol=1e-12)


def test_mixed_patch_embed_shapes_and_errors():
    embed = MixedPatchEmbed(16, 2, in_chans=3, embed_dim=32, img_size=224)
    assert embed.num_patches == 196 and embed.grid_size == (14, 14)
    tokens = embed(ppml.mix_subpatches(torch.rand(2, 3, 224, 224), 16, 2))
    assert tokens.shape == (2, 196, 32)
    tokens.sum().backward()
    assert embed.proj.weight.grad is not None and embed.fc.weight.grad is not None
    assert MixedPatchEmbed(16, 2, embed_dim=8, flatten=False)(torch.rand(1, 3, 112, 112)).shape == (1, 8, 14, 14)
    with pytest.raises(ValueError, match=r"grid must divide patch_size"):
        MixedPatchEmbed(16, 3)
    with pytest.raises(ValueError, match=r"input must be \[B, 3, H/g, W/g\], got \[1, 1, 8, 8\]"):
        embed(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"multiples of p/g=8"):
        embed(torch.rand(1, 3, 12, 12))


# ---- fuzzing: >= 200 cases per backend ----------------------------------------------------------------------------


@st.composite
def mix_cases(draw):
    g = draw(st.integers(1, 4))
    p = g * draw(st.integers(1, 3))
    shape = (draw(st.integers(0, 3)), draw(st.integers(1, 4)), p * draw(st.integers(1, 4)), p * draw(st.integers(1, 4)))
    dtype, layout = draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(list(LAYOUTS)))
    return shape, p, g, dtype, layout, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", ["native", "reference"])
@settings(max_examples=200, deadline=None)
@given(case=mix_cases())
def test_fuzz_backend_vs_loop_oracle(backend, case):
    if backend not in backends_for("cpu", "mix_subpatches"):
        pytest.skip(f"{backend} unavailable")
    shape, p, g, dtype, layout, weighted, seed = case
    x = make_images(shape, dtype, "cpu", layout, seed)
    n = (shape[2] // p) * (shape[3] // p)
    w = ppml.random_mixing_weights(shape[0], n, g, generator=torch.Generator().manual_seed(seed)) if weighted else None
    out = ppml.mix_subpatches(x, p, g, w, backend=backend)
    oracle = torch.from_numpy(loop_oracle(x.double().numpy(), p, g, None if w is None else w.double().numpy()))
    # Against the exact sum, g² float32 roundings (one product, one add per term) can accumulate: the standard
    # g²·eps·Σ|terms| bound of recursive summation, plus the final rounding to the output dtype.
    assert_within_ulp(out, oracle.to(out.dtype), g * g * abs_terms(x, p, g, w), ulps=1.0)


# ---- every path of the CUDA kernel, bit-exact (skipped without a GPU; benchmarks/gpu_check.sh runs them) -----------

# (shape, p, g): with q = p/g the sub-patch row is q elements (NCHW) or q*C (NHWC); the CUDA kernel loads 16 bytes
# per sub-patch row when the row is a multiple of 16 bytes, per pair of rows when it is exactly 8 bytes and g is even,
# 8 bytes when the row is a multiple of that, else one element: these cases reach each of them for several dtypes.
CUDA_MIX_PATHS = [
    ((1, 3, 224, 224), 16, 2),  # B = 1; uint8 pairs of rows (NCHW) and 8-byte loads (NHWC, 24-byte rows)
    ((4, 3, 64, 96), 16, 4),  # q = 4
    ((2, 3, 32, 32), 4, 2),  # q = 2: float32 pairs of rows, uint8 one element
    ((3, 3, 30, 42), 6, 3),  # odd sizes, odd g: no pairs
    ((2, 2, 32, 32), 16, 1),  # g = 1
    ((2, 1, 8, 8), 2, 2),  # q = 1
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
@pytest.mark.parametrize("shape,p,g", CUDA_MIX_PATHS, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_cuda_paths_are_bit_exact(dtype, layout, shape, p, g, weighted):
    # Equal to the reference computed on the CPU (which test_native_cpu_is_bit_exact ties to the C++ order).
    if "native" not in backends_for("cuda", "mix_subpatches"):
        pytest.skip("native unavailable on cuda")
    x = make_images(shape, dtype, layout="channels_last" if layout == "channels_last" else "contiguous", seed=p + g)
    n = (shape[2] // p) * (shape[3] // p)
    w = ppml.random_mixing_weights(shape[0], n, g, generator=torch.Generator().manual_seed(g)) if weighted else None
    expected = ref_mix(x, p, g, w)
    xc = x.cuda()
    if layout == "misaligned":  # one element into its storage: no vector loads
        xc = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")[1:].view(shape).copy_(x)
    out = torch.ops.ppml.mix_subpatches(xc, p, g, None if w is None else w.cuda())
    assert torch.equal(out.cpu(), expected)
