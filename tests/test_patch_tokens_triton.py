"""ppml::patch_tokens_triton: bit-exact vs the reference, opcheck, gradcheck, compile, meta, and the sm_90 lowering.

The `triton` tests run on a GPU, or here on CPU tensors in their own run: ``TRITON_INTERPRET=1 pytest -m triton``
(set before ppml is imported). The AOT test compiles every specialisation the tests launch for sm_90 in a fresh
process without the interpreter, and checks that real images' tile rows (uint8 and float32, p = 16 at 224 × 224)
move as 128-bit vector loads and stores.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import ALL_DTYPES, INTERPRET, make_images, make_perm, run_aot_replay

import ppml
from ppml.reference import patch_tokens as ref_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_run = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton needs a GPU, or TRITON_INTERPRET=1 set before import (run: TRITON_INTERPRET=1 pytest -m triton)",
)
pytestmark = [pytest.mark.triton]
TOKEN_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# (shape, p): tiny, non-square; p = 8 and 16 with W a multiple of 16 (vector rows), p = 14 (ALIGN 2), p = 32.
SHAPES = [((2, 3, 16, 24), 8), ((1, 3, 28, 42), 14), ((2, 3, 16, 48), 16), ((1, 3, 32, 64), 32)]


def triton_tokens(x, p, perm, mean=MEAN, std=STD, dtype=torch.float32):
    return ppml.patch_tokens(x, p, perm, mean=mean, std=std, dtype=dtype, backend="triton")


@triton_run
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("in_dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,p", SHAPES, ids=lambda v: str(v))
def test_triton_matches_reference(shape, p, in_dtype, layout):
    x = make_images(shape, in_dtype, DEVICE, layout, seed=p)
    n = (shape[2] // p) * (shape[3] // p)
    perm = make_perm(shape[0], n, DEVICE, seed=p)
    for dtype, key in itertools.product(TOKEN_DTYPES, [perm, None]):
        for mean, std in [(MEAN, STD), (None, None)]:
            expected = ref_tokens(x, p, key, mean, std, dtype)
            assert torch.equal(triton_tokens(x, p, key, mean, std, dtype), expected), (dtype, key is None, mean)


@triton_run
def test_triton_every_uint8_value_bit_exact():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous().to(DEVICE)
    for dtype in TOKEN_DTYPES:
        assert torch.equal(triton_tokens(x, 16, None, dtype=dtype), ref_tokens(x, 16, None, MEAN, STD, dtype))


@triton_run
def test_triton_opcheck():
    x = make_images((2, 3, 16, 24), torch.float32, DEVICE).requires_grad_(True)
    perm = make_perm(2, 6, DEVICE)
    torch.library.opcheck(torch.ops.ppml.patch_tokens_triton, (x, perm, 8, MEAN, STD, torch.float32))


@triton_run
def test_triton_gradcheck():
    x = make_images((1, 2, 4, 4), torch.float64, DEVICE).requires_grad_(True)
    perm = make_perm(1, 4, DEVICE)
    fn = lambda t: torch.ops.ppml.patch_tokens_triton(t, perm, 2, [0.5], [2.0, 4.0], torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))


@triton_run
def test_triton_compile_fullgraph():
    x = make_images((2, 3, 16, 24), torch.uint8, DEVICE)
    perm = make_perm(2, 6, DEVICE)
    fn = torch.compile(lambda t, k: triton_tokens(t, 8, k) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x, perm), ref_tokens(x, 8, perm, MEAN, STD) + 1)


@triton_run
def test_triton_meta_and_bad_perm():
    out = torch.ops.ppml.patch_tokens_triton(
        torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta"),
        torch.empty(2, 4, dtype=torch.int64, device="meta"),
        4,
        None,
        None,
        torch.bfloat16,
    )
    assert out.shape == (2, 4, 48) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    with pytest.raises(ValueError, match=r"ppml\.patch_tokens_triton: every row of perm must be a permutation"):
        torch.ops.ppml.patch_tokens_triton(
            torch.zeros(1, 1, 4, 4, device=DEVICE), torch.tensor([[0, 0, 1, 2]], device=DEVICE), 2, None, None,
            torch.float32,
        )  # fmt: skip


def test_launch_config_fills_the_gpu():
    # Real images (224 x 224, p = 16): one program per 128 token rows, so B = 64 launches > 30 waves' worth of programs
    # over 132 SMs and B = 1 still 74 programs; rows are 16-aligned, so each is one 16-byte uint8 load.
    from ppml.kernels.patch_tokens import launch_config

    cfg = launch_config(16, 224)
    assert cfg["ALIGN"] == 16 and cfg["BLOCK_X"] == 16 and cfg["BLOCK_R"] * cfg["BLOCK_X"] == 2048
    per_image = -(-196 * 3 * 16 // cfg["BLOCK_R"])
    assert per_image == 74 and per_image * 64 >= 132 * 30
    assert launch_config(14, 224)["ALIGN"] == 2


def aot_launches():
    """The launches of the tests above through the launcher, on CPU tensors (the AOT test records and compiles them),
    plus real batches: uint8 and float32 [2, 3, 224, 224] at p = 16, NCHW and channels_last, every token dtype."""
    from ppml.kernels.patch_tokens import patch_tokens_triton as launch
    from ppml.reference.patch_tokens import accumulate_dtype

    def go(x, p, perm, mean, std, dtype):
        launch(x, perm, p, mean, std, dtype, accumulate_dtype(x.dtype, dtype))

    # Compiled, each (dtypes, layout, p, flags) is a fresh specialisation: every dtype pair and layout at the first
    # shape, the other shapes' p with uint8 and float32 images.
    for (i, (shape, p)), in_dtype, layout, dtype in itertools.product(
        enumerate(SHAPES), ALL_DTYPES, ["contiguous", "channels_last"], TOKEN_DTYPES
    ):
        if i == 0 or (in_dtype in (torch.uint8, torch.float32) and dtype == torch.float32):
            x = make_images(shape, in_dtype, "cpu", layout, seed=p)
            go(x, p, make_perm(shape[0], (shape[2] // p) * (shape[3] // p), seed=p), MEAN, STD, dtype)
    go(make_images((2, 3, 16, 24), torch.uint8), 8, None, None, None, torch.float32)  # no key
    go(make_images((1, 2, 4, 4), torch.float64), 2, make_perm(1, 4), [0.5], [2.0, 4.0], torch.float64)
    for in_dtype, layout in itertools.product([torch.uint8, torch.float32], ["contiguous", "channels_last"]):
        x = make_images((2, 3, 224, 224), in_dtype, "cpu", layout)
        for dtype in TOKEN_DTYPES:
            go(x, 16, make_perm(2, 196), MEAN, STD, dtype)


_PTX_CHECKS = """
import re

vector_cases = 0
for (sig, consts), k in ok:
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and len(k.asm["cubin"]) > 0, (sig, consts)
    # NCHW tile rows of p = 16 at a 16-element-aligned offset: uint8 rows are one 16-byte load (ld.global.v4.b32),
    # float32 tokens four 16-byte stores; float32 rows load as four 16-byte vectors too.
    if consts["PATCH"] == 16 and consts["ALIGN"] == 16 and not consts["CHANNELS_LAST"] and sig["dst"] == "*fp32":
        vectors = r"\\.global(?:\\.\\w+)*?\\.v4\\.b32"
        assert re.search("ld" + vectors, ptx), ("no 128-bit global load", sig, consts)
        assert re.search("st" + vectors, ptx), ("no 128-bit global store", sig, consts)
        vector_cases += 1
assert vector_cases >= 2, f"only {vector_cases} p = 16 float32-token specialisations (uint8, float32 images) checked"
# channels_last (NHWC) C = 3, p = 16: a tile row's 48 contiguous uint8 (or 192 float32) source elements load as
# 16-byte vectors and no byte-wide loads remain; the de-interleaved tokens still store as 16-byte vectors.
cl_cases = 0
for (sig, consts), k in ok:
    if consts.get("CL_CHANS") == 3 and consts["PATCH"] == 16 and sig["dst"] == "*fp32":
        ptx = k.asm["ptx"]
        assert re.search("ld" + vectors, ptx) and not re.search(r"ld\\.global(?:\\.\\w+)*?\\.b8", ptx), (sig, consts)
        assert re.search("st" + vectors, ptx), ("no 128-bit global store", sig, consts)
        cl_cases += 1
assert cl_cases >= 2, f"only {cl_cases} channels_last C = 3, p = 16 float32-token specialisations checked"
"""


@pytest.mark.skipif(INTERPRET, reason="AOT compile runs in the main (non-interpreter) run")
def test_triton_kernel_aot_compiles_for_sm90():
    run_aot_replay("test_patch_tokens_triton", "ppml.kernels.patch_tokens", "_patch_tokens_kernel", _PTX_CHECKS)
