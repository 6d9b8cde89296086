"""ppml::patch_tokens: reference vs an independent oracle (F.unfold + per-element float64 arithmetic), every backend vs
the reference (bit-exact: each backend computes /255, -mean, /std as one correctly rounded operation each, in the
same order and accumulate dtype, then rounds once), opcheck, gradcheck, torch.compile, meta, bad inputs, the module,
and the ViT's token input. Triton has its own file (test_patch_tokens_triton.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, DEVICES, backends_for, make_images, make_perm

import ppml
from ppml.reference import patch_tokens as ref_tokens

OP = "patch_tokens"
TOKEN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _unfold_oracle(x: torch.Tensor, p: int, perm, mean, std) -> torch.Tensor:
    """float64 tokens by F.unfold (channel-major kernel order, row-major blocks) and Python-float arithmetic."""
    v = x.double()
    if x.dtype == torch.uint8:
        v = v / 255.0
    C = x.shape[1]
    m = torch.tensor(mean if mean is not None else [0.0] * C, dtype=torch.float64).expand(C).view(1, C, 1, 1)
    s = torch.tensor(std if std is not None else [1.0] * C, dtype=torch.float64).expand(C).view(1, C, 1, 1)
    tokens = F.unfold((v - m) / s, p, stride=p).transpose(1, 2)  # [B, N, C·p·p]
    if perm is not None:
        tokens = torch.stack([tokens[b, perm[b]] for b in range(x.shape[0])])
    return tokens


# ---- reference vs an independent oracle ----------------------------------------------------------------------------


def test_reference_hand_worked_2x4():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 4)  # tiles (p=2): t0=[0,1,4,5] t1=[2,3,6,7]
    out = ref_tokens(x, 2, torch.tensor([[1, 0]]))
    assert torch.equal(out, torch.tensor([[[2.0, 3, 6, 7], [0, 1, 4, 5]]]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
@pytest.mark.parametrize("stats", [(None, None), (MEAN, STD), ([0.5], [2.0])], ids=["none", "imagenet", "one"])
def test_reference_matches_unfold_oracle(dtype, stats):
    x = make_images((3, 3, 12, 20), dtype, seed=4)  # non-square, 3 x 5 tiles of p=4
    perm = make_perm(3, 15, seed=2)
    mean, std = stats
    out = ref_tokens(x, 4, perm, mean, std, torch.float64)
    torch.testing.assert_close(out, _unfold_oracle(x, 4, perm, mean, std), rtol=0, atol=1e-15)


def test_tokens_of_shuffled_images_are_shuffled_tokens():
    x = make_images((2, 3, 32, 48), torch.uint8, seed=1)
    perm = make_perm(2, 6, seed=3)
    shuffled, _ = ppml.shuffle_patches(x, 16, perm)
    assert torch.equal(ppml.patch_tokens(x, 16, perm), ppml.patch_tokens(shuffled, 16))


# ---- every backend vs the reference, bit-exact ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [8, 14, 16, 32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("in_dtype", ALL_DTYPES, ids=str)
def test_backends_match_reference(device, p, layout, in_dtype):
    shape = (2, 3, 2 * p, 3 * p) if p < 32 else (2, 3, p, 3 * p)  # non-square
    n = (shape[2] // p) * (shape[3] // p)
    x = make_images(shape, in_dtype, device, layout, seed=p)
    perm = make_perm(2, n, device, seed=p)
    for dtype, (mean, std), key in itertools.product(TOKEN_DTYPES, [(None, None), (MEAN, STD)], [perm, None]):
        expected = ref_tokens(x, p, key, mean, std, dtype)
        assert expected.shape == (2, n, 3 * p * p) and expected.dtype == dtype
        for backend in backends_for(device, OP):
            out = ppml.patch_tokens(x, p, key, mean=mean, std=std, dtype=dtype, backend=backend)
            assert out.is_contiguous() and out.device == x.device
            assert torch.equal(out, expected), (backend, dtype, mean is None, key is None)


def test_uint8_every_value_every_channel_bit_exact():
    # All 256 values in every channel: the CPU kernel's table must be the reference's arithmetic for each of them.
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 4, 16, 16).contiguous()
    mean, std = [0.1, -0.2, 0.3, 0.7], [0.3, 0.7, 1.1, 0.05]
    for dtype, backend in itertools.product(TOKEN_DTYPES, backends_for("cpu", OP)):
        out = ppml.patch_tokens(x, 4, mean=mean, std=std, dtype=dtype, backend=backend)
        assert torch.equal(out, ref_tokens(x, 4, None, mean, std, dtype)), (dtype, backend)


@pytest.mark.parametrize("p", [8, 16])
def test_uint8_float32_misaligned_out_and_large_fresh_output(p):
    # The CPU kernel's uint8 -> float32 gather path for p % 8 == 0: aligned outputs take 32-byte non-temporal stores,
    # an `out=` shifted by one element (4-byte aligned) takes unaligned ones; a fresh output of more than 32 MiB is
    # asked for huge pages before it is written (csrc/cpu/fresh_output.h). All three must be the reference's values.
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 2, 3)
    perm = make_perm(2, (32 // p) * (48 // p), "cpu", seed=p)
    expected = ref_tokens(x, p, perm, MEAN, STD, torch.float32)
    storage = torch.full((expected.numel() + 1,), 7.0)
    shifted = storage[1:].view(expected.shape)
    assert shifted.data_ptr() % 32 != 0
    torch.ops.ppml.patch_tokens.out(x, perm, p, MEAN, STD, torch.float32, out=shifted)
    assert torch.equal(shifted, expected) and storage[0] == 7.0
    big = make_images((56, 3, 224, 224), torch.uint8, "cpu", "contiguous", seed=p)
    big_perm = make_perm(56, (224 // p) ** 2, "cpu", seed=p)
    out = ppml.patch_tokens(big, p, big_perm, mean=MEAN, std=STD)
    assert out.numel() * 4 > 32 << 20
    assert torch.equal(out, ref_tokens(big, p, big_perm, MEAN, STD, torch.float32))


def test_nan_and_inf_pass_through():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0]).reshape(1, 1, 2, 2)
    for backend in backends_for("cpu", OP):
        out = ppml.patch_tokens(x, 2, mean=[1.0], std=[2.0], backend=backend)
        assert torch.equal(out.isnan(), torch.tensor([[[True, False, False, False]]]))
        assert out[0, 0, 1] == float("inf") and out[0, 0, 2] == -float("inf") and out[0, 0, 3] == 0


def test_empty_batch():
    for backend in backends_for("cpu", OP):
        out = ppml.patch_tokens(torch.zeros(0, 3, 16, 16, dtype=torch.uint8), 8, backend=backend)
        assert out.shape == (0, 4, 192)


@pytest.mark.parametrize("device", DEVICES)
def test_out_variant_matches_and_reuses_buffer(device):
    x = make_images((3, 3, 16, 32), torch.uint8, device, "channels_last")
    perm = make_perm(3, 8, device)
    out = torch.full((3, 8, 192), 7.0, dtype=torch.bfloat16, device=device)
    expected = ref_tokens(x, 8, perm, MEAN, STD, torch.bfloat16)
    for backend in backends_for(device, OP):
        res = ppml.patch_tokens(x, 8, perm, mean=MEAN, std=STD, dtype=torch.bfloat16, backend=backend, out=out)
        assert res is out and torch.equal(out, expected), backend
        out.fill_(7)
    assert torch.ops.ppml.patch_tokens.out(x, perm, 8, MEAN, STD, torch.bfloat16, out=out) is None
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "out,pattern",
    [
        (
            torch.empty(2, 4, 48, dtype=torch.float64),
            r"out must be contiguous float32 \[2, 4, 48\] on cpu, got float64 ",
        ),
        (torch.empty(2, 4, 47), r"out must be contiguous float32 \[2, 4, 48\] on cpu, got float32 \[2, 4, 47\]"),
        (
            torch.empty(2, 48, 4).transpose(1, 2),
            r"out must be contiguous .*got float32 \[2, 4, 48\] on cpu \(not contiguous\)",
        ),
    ],
)
def test_out_variant_bad_out(out, pattern):
    x = make_images((2, 3, 8, 8), torch.float32)
    with pytest.raises(ValueError, match=r"ppml\.patch_tokens: " + pattern):
        torch.ops.ppml.patch_tokens.out(x, None, 4, None, None, torch.float32, out=out)
    for backend in backends_for("cpu", OP):
        with pytest.raises(ValueError, match=r"ppml\.patch_tokens: " + pattern):
            ppml.patch_tokens(x, 4, backend=backend, out=out)


def test_out_variant_refuses_aliasing_images():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ppml\.patch_tokens: out must not share memory with images"):
        torch.ops.ppml.patch_tokens.out(x, None, 4, None, None, torch.float32, out=x.view(2, 4, 48))


def test_opcheck_out_variant():
    x = make_images((2, 3, 8, 12), torch.uint8, "cpu", "sliced")
    out = torch.empty(2, 6, 48)
    torch.library.opcheck(
        torch.ops.ppml.patch_tokens.out, (x, make_perm(2, 6), 4, MEAN, STD, torch.float32), {"out": out}
    )


# ---- opcheck, gradcheck, compile, meta -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
def test_opcheck(device, layout, dtype):
    x = make_images((2, 3, 8, 12), dtype, device, layout)
    if dtype.is_floating_point:
        x.requires_grad_(True)
    perm = make_perm(2, 6, device)
    torch.library.opcheck(torch.ops.ppml.patch_tokens.default, (x, perm, 4, MEAN, STD, torch.float32))
    torch.library.opcheck(torch.ops.ppml.patch_tokens.default, (x, None, 4, None, None, torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = make_images((2, 3, 6, 9), torch.float64, device).requires_grad_(True)
    perm = make_perm(2, 6, device)
    op = torch.ops.ppml.patch_tokens
    assert torch.autograd.gradcheck(lambda t: op(t, perm, 3, MEAN, STD, torch.float64), (x,))
    assert torch.autograd.gradcheck(lambda t: op(t, None, 3, None, [4.0], torch.float64), (x,))
    for backend in backends_for(device, OP):
        fn = lambda t, b=backend: ppml.patch_tokens(t, 3, perm, mean=MEAN, std=STD, dtype=torch.float64, backend=b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))


def test_gradient_is_inverse_gather_over_std_in_images_dtype():
    x = make_images((2, 3, 8, 8), torch.bfloat16).requires_grad_(True)
    perm = make_perm(2, 4, seed=7)
    w = torch.randn(2, 4, 48)
    (ppml.patch_tokens(x, 4, perm, mean=MEAN, std=STD) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (ref_tokens(x_ref, 4, perm, MEAN, STD) * w).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x_ref.grad)


def test_torch_compile_fullgraph():
    x = make_images((2, 3, 16, 16), torch.uint8)
    perm = make_perm(2, 16)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def tokens_then_scale(t, k):
        return ppml.patch_tokens(t, 4, k, mean=MEAN, std=STD) * 2.0

    assert torch.equal(tokens_then_scale(x, perm), ref_tokens(x, 4, perm, MEAN, STD) * 2.0)


def test_torch_compile_inductor_with_backward():
    x = make_images((2, 3, 8, 8), torch.float32).requires_grad_(True)
    perm = make_perm(2, 4)
    w = torch.randn(2, 4, 48)

    @torch.compile(fullgraph=True)
    def loss_fn(t):
        return (torch.ops.ppml.patch_tokens(t, perm, 4, None, [2.0], torch.float32) * w).sum()

    loss_fn(x).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (ref_tokens(x_ref, 4, perm, None, [2.0]) * w).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_meta_device_shapes():
    x = torch.empty((5, 3, 224, 160), dtype=torch.uint8, device="meta")
    perm = torch.empty((5, 140), dtype=torch.int64, device="meta")
    out = torch.ops.ppml.patch_tokens(x, perm, 16, MEAN, STD, torch.bfloat16)
    assert out.device.type == "meta" and out.shape == (5, 140, 768) and out.dtype == torch.bfloat16
    assert out.is_contiguous()
    with pytest.raises(ValueError, match="perm must be int64"):
        torch.ops.ppml.patch_tokens(x, perm[:, :10], 16, None, None, torch.float32)


# ---- bad input: clear errors naming op, argument, expectation and what came ---------------------------------------

_X = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
BAD_CASES = [
    # (kwargs for the op, exception, regex)
    (dict(images=torch.zeros(3, 8, 8)), ValueError, r"images must be 4-D .*got float32 \[3, 8, 8\]"),
    (dict(images=torch.zeros(1, 3, 8, 8, dtype=torch.int32)), TypeError, r"images must be uint8.*got int32"),
    (dict(patch_size=0), ValueError, r"patch_size must be a positive integer, got 0"),
    (dict(patch_size=3), ValueError, r"patch_size must divide H and W, got patch_size=3 for H=8, W=8"),
    (
        dict(perm=torch.zeros(2, 4, dtype=torch.int32)),
        ValueError,
        r"perm must be int64 \[B, N\] with B=2 and N=\(H/p\)\*\(W/p\)=4, got int32 \[2, 4\]",
    ),
    (dict(perm=torch.zeros(4, dtype=torch.int64)), ValueError, r"got int64 \[4\]"),
    (
        dict(perm=torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]])),
        ValueError,
        r"every row of perm must be a permutation of 0\.\.3 \(N=\(H/p\)\*\(W/p\)=4\), row 1 is not",
    ),
    (dict(perm=torch.tensor([[0, 1, 1, 3], [0, 1, 2, 3]])), ValueError, r"every row of perm must be a permutation"),
    (dict(mean=[0.1, 0.2]), ValueError, r"mean must be None or 3 \(or 1\) finite numbers, one per channel, got"),
    (dict(std=[1.0, 0.0, 1.0]), ValueError, r"std must be None or 3 \(or 1\) non-zero finite numbers"),
    (dict(std=[float("nan")]), ValueError, r"std must be None or 3 \(or 1\) non-zero finite numbers"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be float16, bfloat16, float32 or float64, got"),
]


def _call(fn, kw):
    a = dict(images=_X, perm=None, patch_size=4, mean=None, std=None, dtype=torch.float32)
    a.update(kw)
    return fn(a)


@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_bad_input_public_function(case):
    kw, exc, pattern = BAD_CASES[case]
    for backend in backends_for("cpu", OP):

        def public(a, backend=backend):
            return ppml.patch_tokens(a.pop("images"), a.pop("patch_size"), a.pop("perm"), backend=backend, **a)

        with pytest.raises(exc, match=r"ppml\.patch_tokens: .*" + pattern):
            _call(public, kw)


@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_bad_input_raw_op(case):
    # Direct calls go straight to the C++ kernel (or the registered reference): same checks, same words.
    kw, exc, pattern = BAD_CASES[case]
    with pytest.raises(exc, match=r"ppml\.patch_tokens: .*" + pattern):
        _call(lambda a: torch.ops.ppml.patch_tokens(*a.values()), kw)


def test_bad_stats_types():
    with pytest.raises(ValueError, match=r"ppml\.patch_tokens: mean must be None or one number per channel"):
        ppml.patch_tokens(_X, 4, mean=torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"ppml\.patch_tokens: std must be None or one number per channel"):
        ppml.patch_tokens(_X, 4, std="imagenet")


def test_explicit_triton_on_cpu_says_why():
    if "triton" in backends_for("cpu", OP, triton=True):
        pytest.skip("the interpreter run can use Triton on CPU")
    with pytest.raises(RuntimeError, match=r"ppml\.patch_tokens: backend 'triton' cannot run on cpu"):
        ppml.patch_tokens(_X, 4, backend="triton")


def test_stats_as_tensor_or_number():
    x = make_images((1, 3, 8, 8), torch.uint8)
    expected = ref_tokens(x, 4, None, MEAN, [0.5, 0.5, 0.5])
    assert torch.equal(ppml.patch_tokens(x, 4, mean=torch.tensor(MEAN, dtype=torch.float64), std=0.5), expected)


# ---- the module ----------------------------------------------------------------------------------------------------


def test_patch_tokens_module():
    x = make_images((3, 3, 32, 16), torch.uint8)
    m = ppml.PatchTokens(8, mean=MEAN, std=STD)
    assert torch.equal(m(x), ref_tokens(x, 8, None, MEAN, STD))
    g = torch.Generator().manual_seed(0)
    tokens, perm = ppml.PatchTokens(8, shuffle=True, return_perm=True, generator=g)(x)
    assert perm.shape == (3, 8) and torch.equal(tokens, ref_tokens(x, 8, perm))
    assert "patch_size=8" in repr(m)
    with pytest.raises(ValueError, match=r"ppml\.PatchTokens: patch_size"):
        ppml.PatchTokens(0)


# ---- the models take tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpe", [True, False])
def test_pevit_logits_from_tokens_equal_logits_from_images(rpe):
    timm = pytest.importorskip("timm")  # noqa: F841
    from ppml.models import create_model

    torch.manual_seed(0)
    model = create_model("pevit_tiny_patch16_224", img_size=64, num_classes=5, depth=2, rpe=rpe).eval()
    x = make_images((3, 3, 64, 64), torch.uint8, seed=9)
    images = (x.double() / 255).sub(torch.tensor(MEAN).view(1, 3, 1, 1)).div(torch.tensor(STD).view(1, 3, 1, 1))
    tokens = ppml.patch_tokens(x, 16, mean=MEAN, std=STD)
    with torch.no_grad():
        a = model(images.float())
        b = model(tokens)
        c = model(ppml.patch_tokens(x, 16, make_perm(3, 16, seed=1), mean=MEAN, std=STD))  # RS: the same set
    # matmul vs conv: the same products summed in another order, in float32
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"ppml\.models\.PEFreeViT: tokens must be \[B, N, C\*p\*p\] with C\*p\*p=768"):
        model(tokens[..., :700])


def test_mi_embedding_takes_tokens_of_the_ciphertext():
    pytest.importorskip("timm")
    from ppml.models import MixedPatchEmbed

    torch.manual_seed(0)
    embed = MixedPatchEmbed(16, 2, in_chans=3, embed_dim=32, img_size=64).eval()
    mixed = ppml.mix_subpatches(make_images((2, 3, 64, 64), torch.float32, seed=3), 16, 2)  # [2, 3, 32, 32]
    with torch.no_grad():
        torch.testing.assert_close(embed(ppml.patch_tokens(mixed, 8)), embed(mixed), rtol=1e-4, atol=1e-5)


# ---- every path of the CUDA kernel, bit-exact (skipped without a GPU; benchmarks/gpu_check.sh runs them) -----------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (shape, p, note): which path of csrc/cuda/patch_tokens.cu each reaches
CUDA_PATHS = [
    ((2, 3, 224, 224), 16, "16-element vectors (uint8: one 16-byte load, four 16-byte float32 stores)"),
    ((3, 3, 42, 56), 14, "p = 14: 2-element vectors"),
    ((2, 4, 32, 48), 16, "C = 4: channels_last tile rows as four 16-byte loads (uint8)"),
    ((2, 20, 16, 24), 8, "C = 20 > 16: statistics from a device buffer"),
    ((1, 1, 96, 96), 1, "N = 9,216 > 8,192: the separate key check, tiles read from global memory"),
]


@needs_cuda
@pytest.mark.parametrize("in_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "offset"])
@pytest.mark.parametrize("shape,p,note", CUDA_PATHS, ids=lambda v: str(v)[:24])
def test_cuda_paths_are_bit_exact(in_dtype, layout, shape, p, note):
    if "native" not in backends_for("cuda", OP):
        pytest.skip("native unavailable on cuda")
    x = make_images(shape, in_dtype, "cuda", "channels_last" if layout == "channels_last" else "contiguous", seed=p)
    if layout == "offset":  # one element into its storage: narrower vectors
        x = torch.empty(x.numel() + 1, dtype=in_dtype, device="cuda")[1:].view(shape).copy_(x)
    n = (shape[2] // p) * (shape[3] // p)
    perm = make_perm(shape[0], n, "cuda", seed=p)
    C = shape[1]
    mean, std = [0.1 * c for c in range(C)], [0.2 + 0.1 * c for c in range(C)]
    for dtype in TOKEN_DTYPES:
        expected = ref_tokens(x.cpu(), p, perm.cpu(), mean, std, dtype)
        out = torch.ops.ppml.patch_tokens(x, perm, p, mean, std, dtype)
        assert torch.equal(out.cpu(), expected), (dtype, note)
        buf = torch.full_like(out, 7)  # every element must be written
        torch.ops.ppml.patch_tokens.out(x, perm, p, mean, std, dtype, out=buf)
        assert torch.equal(buf.cpu(), expected), (dtype, note)
