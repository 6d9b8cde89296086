"""ppml::shuffle_patches_triton: bit-exact vs the reference, opcheck, gradcheck, compile, fuzzing.

The `triton` tests run on a GPU, or here on CPU tensors in their own run: ``TRITON_INTERPRET=1 pytest -m triton``
(the variable must be set before ppml is imported). The AOT test compiles the kernel for sm_90 in a fresh process
without the interpreter, so it runs in the main run, GPU or not.
"""

from __future__ import annotations


import pytest
import torch
from conftest import ALL_DTYPES, INTERPRET, LAYOUTS, make_images, make_perm, run_aot_script
from hypothesis import given, settings
from hypothesis import strategies as st

import ppml
from ppml.reference import shuffle_patches as ref_shuffle

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
triton_run = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton needs a GPU, or TRITON_INTERPRET=1 set before import (run: TRITON_INTERPRET=1 pytest -m triton)",
)
pytestmark = [pytest.mark.triton]


def triton_shuffle(x, perm, p):
    return ppml.shuffle_patches(x, p, perm, backend="triton")[0]


@triton_run
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), 4), ((1, 2, 4, 4), 1), ((2, 1, 6, 6), 6), ((0, 3, 4, 4), 2)])
def test_triton_matches_reference(dtype, layout, shape, p):
    x = make_images(shape, dtype, DEVICE, layout, seed=p)
    perm = make_perm(shape[0], (shape[2] // p) * (shape[3] // p), DEVICE, seed=p)
    out = triton_shuffle(x, perm, p)
    assert torch.equal(out, ref_shuffle(x, perm, p))
    assert torch.equal(ppml.unshuffle_patches(out, perm, p, backend="triton"), x)


@triton_run
def test_triton_big_patch_loops_over_blocks():
    # run_len = 64 * 3 = 192 and p = 64 rows: more than one inner block per program in channels_last.
    x = make_images((1, 3, 64, 128), torch.float32, DEVICE, "channels_last")
    perm = make_perm(1, 2, DEVICE)
    from ppml.kernels.shuffle_patches import block_sizes

    assert block_sizes(64, 192)[0] < 64
    assert torch.equal(triton_shuffle(x, perm, 64), ref_shuffle(x, perm, 64))


@triton_run
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_triton_opcheck(layout):
    x = make_images((2, 3, 4, 6), torch.float32, DEVICE, layout).requires_grad_(True)
    perm = make_perm(2, 6, DEVICE)
    torch.library.opcheck(torch.ops.ppml.shuffle_patches_triton, (x, perm, 2))


@triton_run
def test_triton_gradcheck():
    x = make_images((1, 2, 4, 4), torch.float64, DEVICE).requires_grad_(True)
    perm = make_perm(1, 4, DEVICE)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ppml.shuffle_patches_triton(t, perm, 2), (x,))


@triton_run
def test_triton_compile_fullgraph():
    x = make_images((1, 3, 4, 4), torch.float32, DEVICE)
    perm = make_perm(1, 4, DEVICE)
    fn = torch.compile(lambda t, k: torch.ops.ppml.shuffle_patches_triton(t, k, 2) + 1, fullgraph=True, backend="aot_eager")
    assert torch.equal(fn(x, perm), ref_shuffle(x, perm, 2) + 1)


@triton_run
def test_triton_meta_and_bad_perm():
    out = torch.ops.ppml.shuffle_patches_triton(
        torch.empty(2, 3, 8, 8, device="meta"), torch.empty(2, 4, dtype=torch.int64, device="meta"), 4
    )
    assert out.shape == (2, 3, 8, 8) and out.device.type == "meta"
    with pytest.raises(ValueError, match=r"ppml\.shuffle_patches_triton: every row of perm must be a permutation"):
        torch.ops.ppml.shuffle_patches_triton(torch.zeros(1, 1, 4, 4, device=DEVICE), torch.tensor([[0, 0, 1, 2]], device=DEVICE), 2)
    with pytest.raises(ValueError, match=r"ppml\.shuffle_patches_triton: patch_size must divide H and W"):
        torch.ops.ppml.shuffle_patches_triton(torch.zeros(1, 1, 4, 4, device=DEVICE), torch.zeros(1, 4, dtype=torch.int64, device=DEVICE), 3)


@st.composite
def tiny_cases(draw):
    p = draw(st.integers(1, 3))
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), p * draw(st.integers(1, 3)), p * draw(st.integers(1, 3)))
    return shape, p, draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(list(LAYOUTS))), draw(st.integers(0, 2**31 - 1))


@triton_run
@settings(max_examples=200, deadline=None)
@given(case=tiny_cases())
def test_triton_fuzz(case):
    shape, p, dtype, layout, seed = case
    x = make_images(shape, dtype, DEVICE, layout, seed)
    perm = make_perm(shape[0], (shape[2] // p) * (shape[3] // p), DEVICE, seed)
    assert torch.equal(triton_shuffle(x, perm, p), ref_shuffle(x, perm, p))


_AOT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ppml.kernels.shuffle_patches import _shuffle_patches_kernel, block_sizes

ints = ["planes_per_perm", "height", "row_len", "run_len", "patch", "tiles_x", "num_tiles"]
for elem in ("i8", "i16", "i32", "i64"):
    for patch, run_len in ((16, 16), (16, 48), (1, 1), (224, 672)):
        br, bx = block_sizes(patch, run_len)
        sig = {"src": "*" + elem, "dst": "*" + elem, "perm": "*i64", **{n: "i64" for n in ints},
               "BLOCK_R": "constexpr", "BLOCK_X": "constexpr"}
        k = triton.compile(ASTSource(_shuffle_patches_kernel, sig, {"BLOCK_R": br, "BLOCK_X": bx}),
                           target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in k.asm["ptx"] and len(k.asm["cubin"]) > 0, (elem, patch)
print("ok")
"""


@pytest.mark.skipif(INTERPRET, reason="AOT compile runs in the main (non-interpreter) run")
def test_triton_kernel_aot_compiles_for_sm90():
    run_aot_script(_AOT)
