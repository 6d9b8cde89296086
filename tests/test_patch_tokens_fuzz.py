"""ppml::patch_tokens, property-based: random batches, channel counts, patch sizes, dtypes, layouts, keys and
statistics, each backend bit-exact against the reference. The draws cross the kernels' path choices: C = 3/4
channels_last with p·C a whole number of 16-byte vectors (the vector paths of csrc/cuda/patch_tokens.cu and
kernels/patch_tokens.py) or not (p = 2, 14; bfloat16 at p = 4), C = 1 (both layouts at once), and an image one
element into its storage (no aligned run anywhere). The Triton property runs in the interpreter job
(``TRITON_INTERPRET=1 pytest -m triton``) or on a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import INTERPRET
from hypothesis import given, settings
from hypothesis import strategies as st

import ppml
from ppml.reference import patch_tokens as ref_tokens

IN_DTYPES = [torch.uint8, torch.float32, torch.bfloat16]
TOKEN_DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "channels_last_offset"]


@st.composite
def token_cases(draw, max_tiles: int = 3):
    """(images, p, perm, mean, std, dtype): B <= 2, C in {1, 3, 4}, 1-3 x 1-3 tiles of p in {2, 4, 8, 14, 16}."""
    B = draw(st.integers(1, 2))
    C = draw(st.sampled_from([1, 3, 4]))
    p = draw(st.sampled_from([2, 4, 8, 14, 16]))
    H, W = p * draw(st.integers(1, max_tiles)), p * draw(st.integers(1, max_tiles))
    in_dtype = draw(st.sampled_from(IN_DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if in_dtype == torch.uint8:
        x = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    else:
        x = torch.randn((B, C, H, W), generator=g, dtype=torch.float64).mul(3).to(in_dtype)
    if layout != "contiguous":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_offset":  # the same NHWC strides, one element into a larger buffer
        buf = torch.empty(x.numel() + 1, dtype=in_dtype)[1:]
        x = buf.as_strided(x.shape, x.stride()).copy_(x)
    n = (H // p) * (W // p)
    perm = ppml.random_permutations(B, n, generator=g) if draw(st.booleans()) else None
    stat = st.floats(-2.0, 2.0, allow_nan=False)
    scale = st.floats(0.0625, 4.0, allow_nan=False)
    if draw(st.booleans()):
        mean = draw(st.lists(stat, min_size=C, max_size=C))
        std = draw(st.lists(scale, min_size=C, max_size=C))
    else:
        mean, std = None, None
    return x, p, perm, mean, std, draw(st.sampled_from(TOKEN_DTYPES))


def _check(case, backend: str, device: str) -> None:
    x, p, perm, mean, std, dtype = case
    expected = ref_tokens(x, p, perm, mean, std, dtype)
    xd = x.to(device)
    if x.storage_offset():  # the offset image: rebuild it (same strides, same offset) on the device
        buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=device)[1:]
        xd = buf.as_strided(x.shape, x.stride()).copy_(x)
    key = perm.to(device) if perm is not None else None
    out = ppml.patch_tokens(xd, p, key, mean=mean, std=std, dtype=dtype, backend=backend)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out.cpu(), expected), (tuple(x.shape), x.dtype, x.stride(), p, perm is None, mean, dtype)


@settings(max_examples=25, deadline=None)
@given(case=token_cases())
def test_cpu_backend_bit_exact_property(case):
    _check(case, "native", "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=60, deadline=None)
@given(case=token_cases())
def test_cuda_backend_bit_exact_property(case):
    _check(case, "native", "cuda")


@pytest.mark.triton
@pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()),
    reason="Triton needs a GPU, or TRITON_INTERPRET=1 set before import (run: TRITON_INTERPRET=1 pytest -m triton)",
)
@settings(max_examples=25, deadline=None)
@given(case=token_cases(max_tiles=2))
def test_triton_backend_bit_exact_property(case):
    _check(case, "triton", "cuda" if torch.cuda.is_available() else "cpu")
