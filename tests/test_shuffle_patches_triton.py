"""ppml::shuffle_patches_triton: bit-exact vs the reference, opcheck, gradcheck, compile, fuzzing.

The `triton` tests run on a GPU, or here on CPU tensors in their own run: ``TRITON_INTERPRET=1 pytest -m triton``
(the variable must be set before ppml is imported). The AOT test compiles the kernel for sm_90 in a fresh process
without the interpreter, so it runs in the main run, GPU or not: every specialisation the tests launch (aot_launches).

Compile budget (see conftest.TRITON_CASES): compiled, every element width × layout class × shape whose int arguments
are 1 or multiples of 16 is a compile, so the op tests reuse the (2, 3, 8, 12), p = 4 images of
test_triton_matches_reference, whose GPU set runs every dtype there and float32 at the other shapes.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch
from conftest import (
    ALL_DTYPES,
    ALL_TRITON_CASES,
    INTERPRET,
    LAYOUTS,
    all_cases_only,
    make_images,
    make_perm,
    run_aot_replay,
)
from hypothesis import HealthCheck, given, settings
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


SHAPES = [((2, 3, 8, 12), 4), ((1, 2, 4, 4), 1), ((2, 1, 6, 6), 6), ((0, 3, 4, 4), 2)]


def reference_case_on_gpu(shape, p, layout, dtype):
    """The GPU set: every dtype (element width) and layout at the first shape, float32 at the others (p = 1, p = H)."""
    return shape == SHAPES[0][0] or shape[0] == 0 or dtype == torch.float32


def reference_inputs(shape, p, layout, dtype, device=DEVICE):
    x = make_images(shape, dtype, device, layout, seed=p)
    return x, make_perm(shape[0], (shape[2] // p) * (shape[3] // p), device, seed=p)


@triton_run
@pytest.mark.parametrize(
    "shape,p,layout,dtype",
    [
        pytest.param(
            shape, p, layout, dtype, id=f"shape{i}-{p}-{layout}-{dtype}",
            marks=() if reference_case_on_gpu(shape, p, layout, dtype) else all_cases_only,
        )
        for (i, (shape, p)), layout, dtype in itertools.product(enumerate(SHAPES), LAYOUTS, ALL_DTYPES)
    ],
)
def test_triton_matches_reference(shape, p, layout, dtype):
    x, perm = reference_inputs(shape, p, layout, dtype)
    out = triton_shuffle(x, perm, p)
    assert torch.equal(out, ref_shuffle(x, perm, p))
    assert torch.equal(ppml.unshuffle_patches(out, perm, p, backend="triton"), x)


@triton_run
def test_triton_big_patch_loops_over_blocks():
    # run_len = 64 * 3 = 192 and p = 64 rows: more than one inner block per program in channels_last.
    x = make_images((1, 3, 64, 128), torch.float32, DEVICE, "channels_last")
    perm = make_perm(1, 2, DEVICE)
    from ppml.kernels.shuffle_patches import block_sizes

    assert block_sizes(64, 192, 2)[0] < 64
    assert torch.equal(triton_shuffle(x, perm, 64), ref_shuffle(x, perm, 64))


@triton_run
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_triton_opcheck(layout):
    # The float32 images of test_triton_matches_reference: no new specialisation to compile.
    x = make_images((2, 3, 8, 12), torch.float32, DEVICE, layout).requires_grad_(True)
    perm = make_perm(2, 6, DEVICE)
    torch.library.opcheck(torch.ops.ppml.shuffle_patches_triton, (x, perm, 4))


@triton_run
def test_triton_gradcheck():
    x = make_images((1, 2, 4, 4), torch.float64, DEVICE).requires_grad_(True)
    perm = make_perm(1, 4, DEVICE)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ppml.shuffle_patches_triton(t, perm, 2), (x,))


@triton_run
def test_triton_compile_fullgraph():
    x = make_images((1, 3, 8, 12), torch.float32, DEVICE)  # shares test_triton_matches_reference's specialisation
    perm = make_perm(1, 6, DEVICE)
    fn = torch.compile(
        lambda t, k: torch.ops.ppml.shuffle_patches_triton(t, k, 4) + 1, fullgraph=True, backend="aot_eager"
    )
    assert torch.equal(fn(x, perm), ref_shuffle(x, perm, 4) + 1)


@triton_run
def test_triton_meta_and_bad_perm():
    out = torch.ops.ppml.shuffle_patches_triton(
        torch.empty(2, 3, 8, 8, device="meta"), torch.empty(2, 4, dtype=torch.int64, device="meta"), 4
    )
    assert out.shape == (2, 3, 8, 8) and out.device.type == "meta"
    with pytest.raises(ValueError, match=r"ppml\.shuffle_patches_triton: every row of perm must be a permutation"):
        torch.ops.ppml.shuffle_patches_triton(
            torch.zeros(1, 1, 4, 4, device=DEVICE), torch.tensor([[0, 0, 1, 2]], device=DEVICE), 2
        )
    with pytest.raises(ValueError, match=r"ppml\.shuffle_patches_triton: patch_size must divide H and W"):
        torch.ops.ppml.shuffle_patches_triton(
            torch.zeros(1, 1, 4, 4, device=DEVICE), torch.zeros(1, 4, dtype=torch.int64, device=DEVICE), 3
        )


@triton_run
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_groups_bands_and_int64_offsets(monkeypatch, layout):
    # Small grids make the launcher group bands (several per program, the last program part-empty) and INT64 forces the
    # 64-bit offsets of tensors past 2^31 elements: both paths stay bit-exact. 5 images x 3 channels x 3 bands = 45
    # bands (15 in channels_last), 4 per program.
    import ppml.kernels.shuffle_patches as k
    from ppml._layout import output_is_channels_last
    from ppml.kernels._common import plane_geometry

    x = make_images((5, 3, 12, 12), torch.float32, DEVICE, layout, seed=5)
    perm = make_perm(5, 9, DEVICE, seed=5)
    geo = plane_geometry(x.shape, output_is_channels_last(x), 4)
    monkeypatch.setattr(k, "_MIN_PROGRAMS", 2)
    monkeypatch.setattr(k, "_MIN_PROGRAM_BYTES", 4 * geo.patch * geo.row_units * 4)  # 4 bands of float32
    cfg = k.launch_config(geo, 4)
    assert cfg["bands_per_program"] == 4 and cfg["grid"][0] * 4 > cfg["num_bands"], cfg
    assert torch.equal(triton_shuffle(x, perm, 4), ref_shuffle(x, perm, 4))
    monkeypatch.setattr(k, "needs_int64", lambda *t: True)
    assert torch.equal(triton_shuffle(x, perm, 4), ref_shuffle(x, perm, 4))


def test_launch_config_fills_the_gpu():
    # Real images (224 x 224, p = 16): every B from 64 up gives a few waves of programs on 132 SMs, bands are grouped
    # only where they are small (uint8) and B is large, and no program moves more than _MAX_BLOCK elements a step.
    from ppml.kernels._common import plane_geometry
    from ppml.kernels.shuffle_patches import _MAX_BLOCK, launch_config

    for channels_last, size, batch in itertools.product([False, True], [1, 2, 4], [1, 64, 256, 1024]):
        cfg = launch_config(plane_geometry((batch, 3, 224, 224), channels_last, 16), size)
        assert cfg["BLOCK_R"] * cfg["BLOCK_T"] * cfg["BLOCK_X"] <= _MAX_BLOCK
        assert cfg["grid"][0] * cfg["bands_per_program"] >= cfg["num_bands"]
        if batch >= 64:
            assert cfg["grid"][0] >= 132 * 4, (channels_last, size, batch, cfg)
        if size == 4 or batch == 1:
            assert cfg["bands_per_program"] == 1, (channels_last, size, batch, cfg)


@st.composite
def tiny_cases(draw):
    p = draw(st.integers(1, 3))
    shape = (draw(st.integers(0, 2)), draw(st.integers(1, 3)), p * draw(st.integers(1, 3)), p * draw(st.integers(1, 3)))
    dtype, layout = draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(list(LAYOUTS)))
    return shape, p, dtype, layout, draw(st.integers(0, 2**31 - 1))


@triton_run
# Compiled, nearly every example is a new specialisation (~0.1 s): the GPU set draws fewer.
@settings(max_examples=200 if ALL_TRITON_CASES else 15, deadline=None)
@given(case=tiny_cases())
def test_triton_fuzz(case):
    shape, p, dtype, layout, seed = case
    x = make_images(shape, dtype, DEVICE, layout, seed)
    perm = make_perm(shape[0], (shape[2] // p) * (shape[3] // p), DEVICE, seed)
    assert torch.equal(triton_shuffle(x, perm, p), ref_shuffle(x, perm, p))


@pytest.fixture
def interpreter_asserts(monkeypatch):
    """Device asserts on in the Triton interpreter, which drops them whatever the launch asks (its options are fixed):
    the kernel's own key check then raises there as it stops the stream on a GPU."""
    if not INTERPRET:
        pytest.skip("interpreter only (TRITON_INTERPRET=1): on a GPU the assert ends the context (test_cuda_runtime)")
    import triton.runtime.interpreter as ti

    opts = dataclasses.replace(ti.interpreter_builder.options, debug=True, sanitize_overflow=False)
    monkeypatch.setattr(ti.interpreter_builder, "options", opts)


def _is_permutation(row: list[int]) -> bool:
    return sorted(row) == list(range(len(row)))


@pytest.mark.parametrize("multipass", [False, True], ids=["one-pass", "multipass"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernel_checks_every_images_key_itself(interpreter_asserts, monkeypatch, layout, multipass):
    # The check the kernel runs on a GPU (no host round trip), run by the interpreter: one program per image checks
    # its whole key. A bad row in any image, the last included, with bands grouped several per program (where the
    # image's first band is not its program's first) and the key histogrammed in several chunks (and passes over
    # the values), stops the launch with the op's message; good keys pass.
    import ppml.kernels.shuffle_patches as k

    monkeypatch.setattr(k, "_MIN_PROGRAMS", 2)
    monkeypatch.setattr(k, "_MIN_PROGRAM_BYTES", 3 * 4 * 12 * 3 * 4)  # 3 bands a program: image starts inside one
    monkeypatch.setattr(k, "_KEY_CHUNK", 4)  # N = 9: three chunks
    if multipass:
        monkeypatch.setattr(k, "_KEY_BINS", 4)  # and three passes of 4 values
    x = make_images((4, 3, 12, 12), torch.float32, "cpu", layout, seed=1)
    good = make_perm(4, 9, "cpu", seed=1)
    assert torch.equal(k.shuffle_patches_triton(x, good, 4), ref_shuffle(x, good, 4))
    for image, (pos, value) in itertools.product(range(4), [(0, 9), (8, -1), (3, 0), (8, 100)]):
        bad = good.clone()
        bad[image, pos] = value if value != 0 else bad[image, pos - 1]  # out of range, negative, repeated
        with pytest.raises(Exception, match=re.escape(k.KEY_MESSAGE)):
            k.shuffle_patches_triton(x, bad, 4)


@given(st.lists(st.lists(st.integers(-1, 6), min_size=1, max_size=6), min_size=1, max_size=3), st.data())
# the fixture only switches the interpreter's asserts on: the same for every example
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_key_check_fuzz(interpreter_asserts, rows, data):
    # The kernel's verdict (assert or not) is exactly "some row is not a permutation of 0..N-1".
    import ppml.kernels.shuffle_patches as k

    n = min(map(len, rows))
    rows = [r[:n] for r in rows]
    if data.draw(st.booleans()):  # half the draws: real permutations, to exercise the "pass" side
        rows = [data.draw(st.permutations(range(n))) for _ in rows]
    perm = torch.tensor(rows, dtype=torch.int64)
    x = torch.rand(len(rows), 2, 2, 2 * n)
    if all(_is_permutation(list(r)) for r in rows):
        assert torch.equal(k.shuffle_patches_triton(x, perm, 2), ref_shuffle(x, perm, 2))
    else:
        with pytest.raises(Exception, match=re.escape(k.KEY_MESSAGE)):
            k.shuffle_patches_triton(x, perm, 2)


def test_key_check_config():
    # Keys up to MAX_CHECKED_TILES are checked in the kernel, in one pass where the histogram covers N (p = 16 at
    # 224 px: N = 196), in several otherwise; longer keys by the op.
    from ppml.kernels.shuffle_patches import _KEY_BINS, MAX_CHECKED_TILES, key_check_config

    for n in (1, 4, 196, 3136, MAX_CHECKED_TILES):
        cfg = key_check_config(n)
        assert cfg["CHECK_KEY"] and cfg["KEY_CHUNK"] <= cfg["KEY_BINS"] <= _KEY_BINS, (n, cfg)
        assert (cfg["KEY_PASSES"] == 1) == (n <= cfg["KEY_BINS"]) and cfg["KEY_BINS"] < 2 * n, (n, cfg)
    assert key_check_config(196)["KEY_PASSES"] == 1
    assert not key_check_config(MAX_CHECKED_TILES + 1)["CHECK_KEY"]


@triton_run
@pytest.mark.parametrize("op", ["shuffle", "mix"])
def test_triton_b1_call_is_one_launch(monkeypatch, op):
    # At B = 1 a call costs what the host does around the kernel: the launchers make exactly one Triton launch and no
    # other aten compute (allocations and views only), so on a GPU a call is one kernel (the key check is inside it;
    # on CPU tensors the op still checks keys before the launch, the interpreter having no device asserts).
    from torch.utils._python_dispatch import TorchDispatchMode

    import ppml.kernels.mix_subpatches as km
    import ppml.kernels.shuffle_patches as ks

    mod, name = (ks, "_shuffle_patches_kernel") if op == "shuffle" else (km, "_mix_subpatches_kernel")
    launches = []

    class Counting:  # records the launch without running it (the interpreter's own host copies are no launcher's)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(grid)

    class AtenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(mod, name, Counting())
    x = make_images((1, 3, 32, 32), torch.float32, DEVICE, seed=2)
    perm = make_perm(1, 4, DEVICE, seed=2)
    weights = ppml.random_mixing_weights(1, 4, 2, device=DEVICE)
    calls = (
        [lambda: ks.shuffle_patches_triton(x, perm, 16)]
        if op == "shuffle"
        else [lambda: km.mix_subpatches_triton(x, 16, 2), lambda: km.mix_subpatches_triton(x, 16, 2, weights)]
    )
    allowed = {"empty", "empty_like", "empty_strided", "view", "permute", "detach", "alias"}
    for call in calls:
        launches.clear()
        with AtenOps() as mode:
            call()
        assert len(launches) == 1, launches
        assert set(mode.ops) <= allowed, mode.ops


def aot_launches(all_cases=ALL_TRITON_CASES):
    """The launches of the tests above through the launcher, on CPU tensors (test_triton_kernel_aot_compiles_for_sm90
    records and compiles them): the GPU set, what a GPU run compiles (on a GPU the AOT tests run first: the launches
    then hit Triton's cache), or with PPML_TRITON_CASES=all every parametrisation and a sample of the fuzz's shapes.
    Always, besides: real images' patches (p = 16 and 224 at 224 × 224, NCHW and channels_last, every width)."""
    from ppml.kernels.shuffle_patches import shuffle_patches_triton as launch

    for (shape, p), layout, dtype in itertools.product(SHAPES, LAYOUTS, ALL_DTYPES):
        if shape[0] and (all_cases or reference_case_on_gpu(shape, p, layout, dtype)):
            launch(*reference_inputs(shape, p, layout, dtype, device="cpu"), p)
    launch(make_images((1, 3, 64, 128), torch.float32, "cpu", "channels_last"), make_perm(1, 2), 64)  # big patch
    launch(make_images((1, 2, 4, 4), torch.float64, "cpu"), make_perm(1, 4), 2)  # gradcheck
    for dtype, layout, p in itertools.product(ALL_DTYPES, ["contiguous", "channels_last"], [16, 224]):
        launch(make_images((1, 3, 224, 224), dtype, "cpu", layout), make_perm(1, (224 // p) ** 2), p)
    # The widest in-kernel key check (p = 4 at 224 x 224: N = 3,136, a 4,096-count histogram in 4 chunks), and a key
    # too long for it (p = 2: N = 12,544, checked by the op, CHECK_KEY off).
    launch(make_images((1, 3, 224, 224), torch.uint8, "cpu"), make_perm(1, 56 * 56), 4)
    launch(make_images((1, 3, 224, 224), torch.uint8, "cpu"), make_perm(1, 112 * 112), 2)
    # Real batches: uint8 NCHW at B = 256 groups bands (bands_per_program > 1), and 64-bit offsets (INT64), which only
    # tensors past 2^31 elements take: compiled here by forcing the flag on a small launch.
    launch(make_images((256, 3, 224, 224), torch.uint8, "cpu"), make_perm(256, 196), 16)
    import ppml.kernels.shuffle_patches as k

    needs_int64, k.needs_int64 = k.needs_int64, lambda *t: True
    try:
        launch(make_images((1, 3, 224, 224), torch.float32, "cpu"), make_perm(1, 196), 16)
    finally:
        k.needs_int64 = needs_int64
    if all_cases:  # the fuzz: every dtype, layout and p at a few shapes
        for dtype, layout, p, (b, c, th, tw) in itertools.product(
            ALL_DTYPES, LAYOUTS, [1, 2, 3], [(1, 1, 1, 1), (2, 3, 2, 3), (1, 2, 3, 1)]
        ):
            launch(make_images((b, c, th * p, tw * p), dtype, "cpu", layout), make_perm(b, th * tw), p)


_PTX_CHECKS = """
import re

vector_cases = 0
for (sig, consts), k in ok:
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and len(k.asm["cubin"]) > 0, (sig, consts)
    # Where a patch row is a multiple of 16 bytes at a multiple of 16 bytes (p = 16 or 224 at 224 x 224, every width
    # and layout, and the big-patch case), the loads and stores are 128-bit vectors: v4.b32, or v2.b64 for 8-byte
    # elements.
    width = {"*i8": 1, "*i16": 2, "*i32": 4, "*i64": 8}[sig["src"]]
    if consts["PATCH"] in (16, 64, 224) and consts["RUN_UNITS"] * width % 16 == 0:
        vectors = r"\\.global(?:\\.\\w+)*?\\.(?:v4\\.b32|v2\\.b64)"
        assert re.search("ld" + vectors, ptx), ("no 128-bit global load", sig, consts)
        assert re.search("st" + vectors, ptx), ("no 128-bit global store", sig, consts)
        vector_cases += 1
# 4 widths (float16 and bfloat16 share int16) x 2 layouts x p = 16, 224, the big patch, grouped bands and INT64
assert vector_cases >= 19, f"only {vector_cases} real-image specialisations checked for 128-bit vectors"
# The key check: where on, one device-side assert carrying the op's message, and no other (debug=True compiles every
# tl.device_assert; sanitize_overflow=False keeps Triton's int32 overflow asserts out of the index arithmetic).
from ppml.kernels.shuffle_patches import KEY_MESSAGE
message = ", ".join(str(b) for b in KEY_MESSAGE.encode())  # how the PTX spells the assert's message: its bytes
checked = 0
for (sig, consts), k in ok:
    ptx = k.asm["ptx"]
    calls = ptx[ptx.index(".entry"):].count("call.uni __assertfail")
    if consts["CHECK_KEY"]:
        assert calls == 1 and message in ptx, (calls, sig, consts)
        checked += 1
    else:
        assert calls == 0, (calls, sig, consts)
assert 0 < checked < len(ok), "both the checked and the op-checked (long key) specialisations must be compiled"
"""


@pytest.mark.skipif(INTERPRET, reason="AOT compile runs in the main (non-interpreter) run")
def test_triton_kernel_aot_compiles_for_sm90():
    run_aot_replay(
        "test_shuffle_patches_triton", "ppml.kernels.shuffle_patches", "_shuffle_patches_kernel", _PTX_CHECKS
    )
