"""Triton kernel of ppml::mix_subpatches vs the reference: numerics, layouts, chunk loops, rounding, the op, AOT sm_90.

The `triton` tests run on a GPU, or here on CPU tensors in their own run: ``TRITON_INTERPRET=1 pytest -m triton``
(the variable must be set before ppml is imported). The AOT test compiles the kernel for sm_90 in a fresh process
without the interpreter, so it runs in the main run, GPU or not: every specialisation the tests launch (aot_launches).

Compile budget (see conftest.TRITON_CASES): compiled, every new dtype, p/g, layout class (NCHW or channels_last) or
shape whose int arguments are 1 or multiples of 16 is a compile, so the small tests reuse the (1, 2, p, 2p) images of
test_triton_matches_reference; its GPU set runs every dtype at p = 4, g = 2 and float32 at the other p, g.

Tolerance: the mean path must match the reference bit for bit where the output is float32/float64 (same add order,
same multiply by the float 1/g²). float16/bfloat16 outputs and the weighted path may differ by one ulp of the output
dtype plus eps(accumulation) · Σ|w·x| (see assert_close_ulp): room for an FMA a compiler might still contract.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    ALL_DTYPES,
    ALL_TRITON_CASES,
    INTERPRET,
    LAYOUTS,
    all_cases_only,
    assert_within_ulp,
    make_images,
    run_aot_replay,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from ppml.reference import mix_subpatches as ref_mix
from ppml.reference.mix_subpatches import accumulation_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_run = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton needs a GPU, or TRITON_INTERPRET=1 set before import (run: TRITON_INTERPRET=1 pytest -m triton)",
)
# The custom op ppml::mix_subpatches_triton wraps the launcher; until it is registered only the launcher is tested.
needs_op = pytest.mark.skipif(
    not hasattr(torch.ops.ppml, "mix_subpatches_triton"), reason="torch.ops.ppml.mix_subpatches_triton not registered"
)
pytestmark = [pytest.mark.triton]

PATCH_GRIDS = [(4, 2), (2, 2), (6, 3), (4, 4), (4, 1)]


def launch(x, p, g, w=None):
    from ppml.kernels.mix_subpatches import mix_subpatches_triton

    return mix_subpatches_triton(x, p, g, w)


def make_weights(b, n, g, device=DEVICE, seed=0, dtype=torch.float32, signed=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(b, n, g * g, generator=gen) if signed else torch.rand(b, n, g * g, generator=gen)
    return w.to(device=device, dtype=dtype)


def expects_channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def assert_close_ulp(ours, ref, images, p, g, weights):
    """The conftest tolerance with Σ|w·x| (w = 1/g² for the mean) as the conditioning term."""
    acc_t = accumulation_dtype(images.dtype)
    w_abs = None if weights is None else weights.to(acc_t).double().abs()
    assert_within_ulp(ours, ref, ref_mix(images.double().abs(), p, g, w_abs))


def check_against_reference(x, p, g, w, out):
    ref = ref_mix(x, p, g, w)
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.device == x.device
    fmt = torch.channels_last if expects_channels_last(x) else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    if w is None and out.dtype in (torch.float32, torch.float64):
        assert torch.equal(out, ref)
        assert torch.equal(out.signbit(), ref.signbit())
    else:
        assert_close_ulp(out, ref, x, p, g, w)


# ---- the launcher vs the reference ------------------------------------------------------------------------------


REFERENCE_CASES = list(itertools.product(ALL_DTYPES, LAYOUTS, PATCH_GRIDS, ["mean", "weighted"]))


def reference_case_on_gpu(dtype, layout, pg, weighted):
    """The GPU set: every dtype at p = 4, g = 2; the other p, g (g = 1, q = 1, odd g) in float32 NCHW layouts."""
    return pg == (4, 2) or (dtype == torch.float32 and layout != "channels_last")


def reference_inputs(dtype, layout, p, g, weighted, device=DEVICE):
    # Two patches side by side (tile indexing), two channels (NCHW planes of one image share its weights).
    x = make_images((1, 2, p, 2 * p), dtype, device, layout, seed=p * 10 + g)
    w = make_weights(1, 2, g, seed=g, device=device) if weighted == "weighted" else None
    return x, w


@triton_run
@pytest.mark.parametrize(
    "dtype,layout,p,g,weighted",
    [
        pytest.param(
            dtype, layout, *pg, weighted, id=f"{dtype}-{layout}-{pg[0]}-{pg[1]}-{weighted}",
            marks=() if reference_case_on_gpu(dtype, layout, pg, weighted) else all_cases_only,
        )
        for dtype, layout, pg, weighted in REFERENCE_CASES
    ],
)
def test_triton_matches_reference(dtype, layout, p, g, weighted):
    x, w = reference_inputs(dtype, layout, p, g, weighted)
    check_against_reference(x, p, g, w, launch(x, p, g, w))


@triton_run
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_several_images_and_rows_of_patches(layout):
    # B = 2 with 2 x 3 patches: the weight row of (image, patch) and the output offsets of ty > 0.
    x = make_images((2, 3, 8, 12), torch.float32, DEVICE, layout, seed=3)
    w = make_weights(2, 6, 2, seed=3, signed=True)
    check_against_reference(x, 4, 2, w, launch(x, 4, 2, w))
    check_against_reference(x, 4, 2, None, launch(x, 4, 2))


@triton_run
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32], ids=str)
def test_triton_empty_batch(dtype, weighted):
    x = make_images((0, 3, 4, 8), dtype, DEVICE)
    w = make_weights(0, 2, 2) if weighted else None
    out = launch(x, 4, 2, w)
    assert out.shape == (0, 3, 2, 4) and out.dtype == ref_mix(x, 4, 2, w).dtype


@triton_run
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_triton_weights_of_any_float_dtype(weight_dtype):
    # Weights are converted to the accumulation dtype first, as the reference does.
    x = make_images((1, 2, 4, 8), torch.float32, DEVICE, seed=5)
    w = make_weights(1, 2, 2, seed=5, dtype=weight_dtype, signed=True)
    check_against_reference(x, 4, 2, w, launch(x, 4, 2, w))


BIG_PATCH_CASES = [
    # the suggested big patch: q·K = 96 fits one block
    ((1, 3, 64, 128), "channels_last", 64, 2),
    # q = 64 rows of 192 elements: BLOCK (16, 256), so 4 row chunks with a masked column tail
    ((1, 3, 128, 128), "channels_last", 128, 2),
    # q·K = 32 · 136 = 4352 > 4096: BLOCK (1, 4096), so 2 column chunks (the second mostly masked) per row
    ((1, 136, 64, 64), "channels_last", 64, 2),
    # NCHW q = 128: BLOCK (32, 128), 4 row chunks
    ((1, 1, 256, 256), "contiguous", 256, 2),
]


@triton_run
@pytest.mark.parametrize("shape,layout,p,g", BIG_PATCH_CASES)
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
def test_triton_big_patch_loops_over_blocks(shape, layout, p, g, weighted):
    from ppml.kernels.mix_subpatches import block_sizes

    x = make_images(shape, torch.float32, DEVICE, layout, seed=7)
    q, k = p // g, (shape[1] if layout == "channels_last" else 1)
    block_r, block_t, block_x = block_sizes(q, q * k, shape[3] // p)
    assert block_r * block_t * block_x <= 4096
    if p > 64:
        assert block_r < q or block_x < q * k, "this case must loop over chunks"
    n = (shape[2] // p) * (shape[3] // p)
    w = make_weights(1, n, g, seed=7) if weighted else None
    check_against_reference(x, p, g, w, launch(x, p, g, w))


# inf - inf and max + max are the point here; the interpreter's numpy reports them.
numpy_fp_warnings = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")


@triton_run
@numpy_fp_warnings
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_triton_special_values(dtype):
    # inf, NaN, signed zeros, extremes and subnormals through the mean; bit-exact (NaN positions, zero signs).
    fi = torch.finfo(dtype)
    specials = [float("inf"), float("-inf"), float("nan"), -0.0, 0.0, fi.max, -fi.max, fi.tiny, fi.tiny * fi.eps, 1.0]
    gen = torch.Generator().manual_seed(11)
    vals = torch.tensor(specials, dtype=torch.float64)[torch.randint(len(specials), (1, 2, 4, 8), generator=gen)]
    x = vals.to(dtype=dtype, device=DEVICE)
    x[0, 0, :4, :4] = -0.0  # a whole patch of -0.0: its mean must stay -0.0
    out, ref = launch(x, 4, 2), ref_mix(x, 4, 2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out.signbit() | out.isnan(), ref.signbit() | ref.isnan())
    assert bool((out[0, 0, :2, :2] == 0).all() and out[0, 0, :2, :2].signbit().all())


def _rounding_cases(dtype):
    """float32 values around the rounding points of `dtype`: exact ties with even and odd last bits, just off ties,
    carries into the exponent, overflow to inf, subnormals, NaN and signed zeros."""
    shift = 23 - {torch.float16: 10, torch.bfloat16: 7}[dtype]  # float32 mantissa bits the rounding drops
    half, low = 1 << (shift - 1), (1 << shift) - 1
    bits = []
    for hi in (0x3F80, 0x3F81, 0x3FFF, 0x0001, 0x0080, 0x4000):
        top = hi << 16
        for lo in (half, half - 1, half + 1, low, 1):
            bits += [top | lo, (top | lo) | (1 << 31)]
    if dtype == torch.bfloat16:
        # 0x7F7F is the largest finite bfloat16; halfway above it rounds to inf
        bits += [0x7F7F0000 | half, 0x7F7F0000 | (half - 1), 0x7F800000, 0x7FC00000, 0x7F800001, 0x80000000]
    else:
        # float16: the largest finite is 65504 = 0x477FE000 in float32; halfway to 65536 rounds to inf
        bits += [0x477FE000 | half, 0x477FE000 | (half - 1), 0x7F800000, 0x7FC00000, 0x80000000]
        # 2^-25 (a tie between 0 and the smallest subnormal 2^-24: rounds to 0), just above it, and 1.5 · 2^-24
        bits += [0x33000000, 0x33000001, 0x33C00000]
    bits = [b - (1 << 32) if b >= 1 << 31 else b for b in bits]
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


@triton_run
@numpy_fp_warnings
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_rounds_once_to_nearest_even(dtype):
    # g = 1 and images of ones: each output pixel is its weight w·1 = w exactly, rounded once to the output dtype.
    # (The interpreter's own float32 -> bfloat16 cast truncates; the kernel rounds on the bits instead.)
    vals = _rounding_cases(dtype)
    n = vals.numel()
    x = torch.ones(1, 1, 1, n, dtype=dtype, device=DEVICE)
    w = vals.to(DEVICE).reshape(1, n, 1)
    out, ref = launch(x, 1, 1, w), ref_mix(x, 1, 1, w)
    assert torch.equal(ref.isnan(), vals.isnan().reshape(ref.shape).to(DEVICE))
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out.signbit() | out.isnan(), ref.signbit() | ref.isnan())


# ---- fuzzing ------------------------------------------------------------------------------------------------------


@st.composite
def tiny_cases(draw):
    g = draw(st.integers(1, 3))
    p = g * draw(st.integers(1, 3))
    b, c = draw(st.integers(0, 2)), draw(st.integers(1, 3))
    th, tw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    weights = draw(st.sampled_from([None, torch.float32, torch.float64, torch.bfloat16]))
    return (
        (b, c, th * p, tw * p),
        p,
        g,
        draw(st.sampled_from(ALL_DTYPES)),
        draw(st.sampled_from(list(LAYOUTS))),
        weights,
        draw(st.integers(0, 2**31 - 1)),
    )


@triton_run
# Compiled, nearly every example is a new specialisation (~0.2 s): the GPU set draws fewer.
@settings(max_examples=200 if ALL_TRITON_CASES else 15, deadline=None)
@given(case=tiny_cases())
def test_triton_fuzz(case):
    # At most B·C·tiles = 24 programs of at most 9 sub-patches each: the interpreter costs milliseconds per program.
    shape, p, g, dtype, layout, weight_dtype, seed = case
    x = make_images(shape, dtype, DEVICE, layout, seed)
    n = (shape[2] // p) * (shape[3] // p)
    w = None if weight_dtype is None else make_weights(shape[0], n, g, seed=seed, dtype=weight_dtype, signed=True)
    check_against_reference(x, p, g, w, launch(x, p, g, w))


# ---- the op ppml::mix_subpatches_triton ---------------------------------------------------------------------------


@triton_run
@needs_op
@pytest.mark.parametrize("weighted", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_triton_op_opcheck(layout, weighted):
    # Small: opcheck calls the kernel a dozen times, each program costs milliseconds in the interpreter. The images
    # of test_triton_matches_reference (float32, p = 4, g = 2): no new specialisation to compile.
    x = make_images((1, 2, 4, 8), torch.float32, DEVICE, layout).requires_grad_(True)
    w = make_weights(1, 2, 2).requires_grad_(True) if weighted else None
    torch.library.opcheck(torch.ops.ppml.mix_subpatches_triton, (x, 4, 2, w))


@triton_run
@needs_op
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float64], ids=str)
def test_triton_op_matches_launcher(dtype):
    # The channels_last images of test_triton_matches_reference (p = 4, g = 2): no new specialisation.
    x = make_images((1, 2, 4, 8), dtype, DEVICE, "channels_last", seed=2)
    w = make_weights(1, 2, 2, seed=2)
    for weights in (None, w):
        out = torch.ops.ppml.mix_subpatches_triton(x, 4, 2, weights)
        assert torch.equal(out, launch(x, 4, 2, weights))
        assert out.is_contiguous(memory_format=torch.channels_last)


@triton_run
@needs_op
def test_triton_op_gradcheck():
    # Two patches of 2 x 2 sub-patches, two channels sharing the weights: 24 inputs, two forward calls each.
    x = make_images((1, 2, 2, 4), torch.float64, DEVICE, seed=4).requires_grad_(True)
    w = make_weights(1, 2, 2, seed=4, dtype=torch.float64, signed=True).requires_grad_(True)
    op = torch.ops.ppml.mix_subpatches_triton
    assert torch.autograd.gradcheck(lambda t, v: op(t, 2, 2, v), (x, w))
    assert torch.autograd.gradcheck(lambda t: op(t, 2, 2, None), (x,))


@triton_run
@needs_op
def test_triton_op_compile_fullgraph():
    x = make_images((1, 3, 4, 8), torch.float32, DEVICE, seed=6)
    w = make_weights(1, 2, 2, seed=6)
    fn = torch.compile(
        lambda t, v: torch.ops.ppml.mix_subpatches_triton(t, 4, 2, v) + 1, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(x, w), ref_mix(x, 4, 2, w) + 1)
    mean = torch.compile(
        lambda t: torch.ops.ppml.mix_subpatches_triton(t, 4, 2, None) * 2, fullgraph=True, backend="aot_eager"
    )
    assert torch.equal(mean(x), ref_mix(x, 4, 2) * 2)


@triton_run
@needs_op
def test_triton_op_meta_shapes():
    op = torch.ops.ppml.mix_subpatches_triton
    out = op(torch.empty(2, 3, 8, 16, device="meta"), 4, 2, torch.empty(2, 8, 4, device="meta"))
    assert out.shape == (2, 3, 4, 8) and out.dtype == torch.float32 and out.device.type == "meta"
    out = op(torch.empty(2, 3, 12, 6, dtype=torch.uint8, device="meta"), 6, 3, None)
    assert out.shape == (2, 3, 4, 2) and out.dtype == torch.float32
    cl = torch.empty(2, 3, 8, 8, dtype=torch.bfloat16, device="meta", memory_format=torch.channels_last)
    out = op(cl, 4, 4, None)
    assert out.shape == (2, 3, 2, 2) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)


# ---- GPU lowering -------------------------------------------------------------------------------------------------


def aot_launches(all_cases=ALL_TRITON_CASES):
    """The launches of the tests above through the launcher, on CPU tensors (test_triton_kernel_aot_compiles_for_sm90
    records and compiles them): the GPU set, what a GPU run compiles (on a GPU the AOT tests run first: the launches
    then hit Triton's cache), or with PPML_TRITON_CASES=all every parametrisation and a sample of the fuzz's shapes."""

    def run(x, p, g, w=None):
        launch(x, p, g, w)

    for case in REFERENCE_CASES:
        if all_cases or reference_case_on_gpu(*case):
            dtype, layout, (p, g), weighted = case
            x, w = reference_inputs(dtype, layout, p, g, weighted, device="cpu")
            run(x, p, g, w)
    for layout in ("contiguous", "channels_last"):  # several images and rows of patches
        x = make_images((2, 3, 8, 12), torch.float32, "cpu", layout, seed=3)
        run(x, 4, 2, make_weights(2, 6, 2, device="cpu", seed=3, signed=True))
        run(x, 4, 2)
    for shape, layout, p, g in BIG_PATCH_CASES:
        n = (shape[2] // p) * (shape[3] // p)
        for w in (None, make_weights(1, n, g, device="cpu", seed=7)):
            run(make_images(shape, torch.float32, "cpu", layout, seed=7), p, g, w)
    for dtype in (torch.float16, torch.bfloat16):  # rounding: g = 1, a row of ones
        vals = _rounding_cases(dtype)
        run(torch.ones(1, 1, 1, vals.numel(), dtype=dtype), 1, 1, vals.reshape(1, -1, 1))
    x = make_images((1, 2, 2, 4), torch.float64, "cpu", seed=4)  # gradcheck
    run(x, 2, 2, make_weights(1, 2, 2, device="cpu", seed=4, dtype=torch.float64, signed=True))
    run(x, 2, 2)
    run_real_images(run)
    if all_cases:  # the fuzz: every dtype and layout, p, g and weights at a few shapes
        for dtype, layout, (g, m), w_dtype in itertools.product(
            ALL_DTYPES, LAYOUTS, [(1, 1), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2)], [None, torch.float32, torch.float64]
        ):
            p = g * m
            for b, c, th, tw in ((1, 1, 1, 1), (2, 3, 2, 1), (1, 2, 1, 2)):
                x = make_images((b, c, th * p, tw * p), dtype, "cpu", layout)
                w = None if w_dtype is None else make_weights(b, th * tw, g, device="cpu", dtype=w_dtype)
                run(x, p, g, w)


def run_real_images(run, batch=1):
    """Real images' patches (p = 16, g = 2 and 4 at 224 × 224), every width and both layouts, mean and keyed: the
    launches _PTX_CHECKS looks for 16-byte vectors in."""
    layouts = ["contiguous", "channels_last"]
    for dtype, layout, g, keyed in itertools.product(ALL_DTYPES, layouts, [2, 4], [False, True]):
        x = make_images((batch, 3, 224, 224), dtype, "cpu", layout)
        run(x, 16, g, make_weights(batch, 196, g, device="cpu") if keyed else None)


_PTX_CHECKS = """
import re

vector_cases = 0
for (sig, consts), k in ok:
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and len(k.asm["cubin"]) > 0, (sig, consts)
    # The launcher turns fusion off so products round before the add, like the reference.
    assert "fma.rn.f" not in ptx, (sig, consts)
    # Real images (p = 16): a sub-patch row is q·K elements at a multiple of q·K, so wherever that is 16 bytes or more
    # (all but uint8 NCHW at g = 2, 8 bytes, and q·K = 4 at g = 4) the main loop moves 16-byte vectors.
    width = {"*u8": 1, "*fp16": 2, "*bf16": 2, "*fp32": 4, "*fp64": 8}
    if consts.get("GRID") in (2, 4) and consts.get("SUB") * consts.get("GRID") == 16 and consts.get("BLOCK_T") == 16:
        run_bytes = consts["RUN"] * width[sig["src"]]
        loads = set(re.findall(r"ld\\.global(?:\\.\\w+)*?\\.(v4\\.b32|v2\\.b64)", ptx))
        stores = set(re.findall(r"st\\.global(?:\\.\\w+)*?\\.(v4\\.b32|v2\\.b64)", ptx))
        if run_bytes % 16 == 0:
            assert loads, ("no 128-bit global load", sig, consts)
            vector_cases += 1
        if consts["RUN"] * width[sig["dst"]] % 16 == 0:
            assert stores, ("no 128-bit global store", sig, consts)
assert vector_cases >= 16, f"only {vector_cases} real-image specialisations with 16-byte loads"

# ... and the no-FMA check is not vacuous: the same kernel with fusion on does contract.
import triton.language as tl

ints = ["num_bands", "bands_per_program", "tiles_y", "planes_per_image", "height", "in_row_aligned",
        "out_row_aligned", "tiles_x", "num_tiles"]
cx = ("IN_ALIGN", "OUT_ALIGN", "GRID", "SUB", "RUN", "HAS_WEIGHTS", "SCALE", "ACC", "BLOCK_R", "BLOCK_T", "BLOCK_X",
      "INT64")
sig = {"src": "*fp32", "dst": "*fp32", "weights": "*fp32", **{n: "i32" for n in ints}, **{c: "constexpr" for c in cx}}
consts = {"IN_ALIGN": 16, "OUT_ALIGN": 16, "GRID": 2, "SUB": 8, "RUN": 8, "HAS_WEIGHTS": True, "SCALE": 1.0,
          "ACC": tl.float32, "BLOCK_R": 8,
          "BLOCK_T": 16, "BLOCK_X": 8, "INT64": False}
k = triton.compile(ASTSource(kernel, sig, consts), target=target, options={"enable_fp_fusion": True})
assert "fma.rn.f32" in k.asm["ptx"], "the no-FMA check above would be vacuous"
"""


@pytest.mark.skipif(INTERPRET, reason="AOT compile runs in the main (non-interpreter) run")
def test_triton_kernel_aot_compiles_for_sm90():
    run_aot_replay("test_mix_subpatches_triton", "ppml.kernels.mix_subpatches", "_mix_subpatches_kernel", _PTX_CHECKS)
