"""On a GPU: the shuffle, mix and anchor calls never make the host wait for the device, and a bad key or label stops
the stream with a device-side assert that names the op (instead of a crash, an out-of-bounds access or a silently
wrong result). Skipped without CUDA; benchmarks/gpu_check.sh runs them on the lent GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ppml
from ppml import _dispatch, reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BACKENDS = ("native", "triton", "reference")


def _available(op: str, backend: str) -> None:
    why = _dispatch.unavailable_reason(op, backend, "cuda")
    if why is not None:
        pytest.skip(f"{backend} cannot run {op} on cuda: {why}")


def _calls(backend: str):
    """Every public entry point of the three ops on CUDA tensors, forward and backward; returns what to compare."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=gen).cuda().requires_grad_(True)
    enc, perm = ppml.shuffle_patches(x, 16, backend=backend)  # keys drawn from OS entropy, moved to the GPU
    dec = ppml.unshuffle_patches(enc, perm, 16, backend=backend)
    out = torch.empty_like(x.detach())
    ppml.shuffle_patches(x.detach(), 16, perm, backend=backend, out=out)
    weights = ppml.random_mixing_weights(4, 16, 2, device="cuda")
    mixed = ppml.mix_subpatches(x, 16, 2, backend=backend) + ppml.mix_subpatches(x, 16, 2, weights, backend=backend)
    f = torch.randn(32, 24, generator=gen).cuda().requires_grad_(True)
    anchors = ppml.make_anchors(10, 24, "simplex").cuda()
    labels = torch.randint(0, 10, (32,), generator=gen).cuda()
    loss = sum(ppml.anchor_loss(f, anchors, labels, metric=m, scale=4.0, pull=0.1, backend=backend)
               for m in ("sqeuclidean", "euclidean", "cosine"))
    (dec.square().sum() + mixed.sum() + loss).backward()
    return x, enc, perm, dec, out, x.grad, f.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_never_synchronise(backend):
    for op in ("shuffle_patches", "mix_subpatches", "anchor_loss"):
        _available(op, backend)
    _calls(backend)  # first calls outside the check: Triton compiles, cuBLAS creates its handle
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, enc, perm, dec, out, grad_x, grad_f = _calls(backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # and the results are still right
    assert torch.equal(enc, reference.shuffle_patches(x.detach(), perm, 16))
    assert torch.equal(out, enc) and torch.equal(dec, x.detach())
    assert grad_x is not None and torch.isfinite(grad_x).all() and torch.isfinite(grad_f).all()


_BAD = {
    "shuffle native": "torch.ops.ppml.shuffle_patches(x, torch.zeros(2, 16, dtype=torch.long, device='cuda'), 8)",
    "shuffle native out-of-range": "torch.ops.ppml.shuffle_patches(x, torch.full((2, 16), 99, device='cuda'), 8)",
    "shuffle native negative": "torch.ops.ppml.shuffle_patches(x, torch.arange(16, device='cuda').repeat(2, 1) - 1, 8)",
    # one bad row among 300 images: each block checks its own image's row
    "shuffle native last row": "torch.ops.ppml.shuffle_patches(torch.rand(300, 3, 32, 32, device='cuda'), "
    "torch.cat([torch.arange(16, device='cuda').repeat(299, 1), torch.tensor([[0] * 15 + [15]], device='cuda')]), 8)",
    # N = 9,216 tiles: too long for the check fused into the gather, checked by the separate kernel
    "shuffle native long key": "torch.ops.ppml.shuffle_patches(torch.rand(2, 1, 96, 96, device='cuda'), "
    "torch.zeros(2, 9216, dtype=torch.long, device='cuda'), 1)",
    "shuffle native out=": "torch.ops.ppml.shuffle_patches.out(x, torch.full((2, 16), 16, device='cuda'), 8, "
    "out=torch.empty_like(x))",
    "shuffle triton": "torch.ops.ppml.shuffle_patches_triton(x, torch.zeros(2, 16, dtype=torch.long, device='cuda'), "
    "8)",
    # the Triton kernel checks each image's key in one of its programs: a bad last image among 300, an out-of-range
    # entry, and a key too long for the kernel's check (N = 9,216 > MAX_CHECKED_TILES: the op's queued check)
    "shuffle triton last row": "torch.ops.ppml.shuffle_patches_triton(torch.rand(300, 3, 32, 32, device='cuda'), "
    "torch.cat([torch.arange(16, device='cuda').repeat(299, 1), torch.tensor([[0] * 15 + [15]], device='cuda')]), 8)",
    "shuffle triton out-of-range": "torch.ops.ppml.shuffle_patches_triton(x, torch.full((2, 16), 16, device='cuda'), "
    "8)",
    "shuffle triton long key": "torch.ops.ppml.shuffle_patches_triton(torch.rand(2, 1, 96, 96, device='cuda'), "
    "torch.zeros(2, 9216, dtype=torch.long, device='cuda'), 1)",
    "shuffle reference": "ppml.shuffle_patches(x, 8, torch.zeros(2, 16, dtype=torch.long, device='cuda'), "
    "backend='reference')",
    "unshuffle": "ppml.unshuffle_patches(x, torch.zeros(2, 16, dtype=torch.long, device='cuda'), 8)",
    "anchor native": "torch.ops.ppml.anchor_loss(f, a, torch.tensor([0, 5], device='cuda'), 'cosine', 1.0, 0.0, True)",
    "anchor triton": "torch.ops.ppml.anchor_loss_triton(f, a, torch.tensor([0, -1], device='cuda'), 'cosine', 1.0, "
    "0.0, True)",
}
_EXPECTED = {"shuffle": "ppml.shuffle_patches", "unshuffle": "ppml.unshuffle_patches", "anchor": "ppml.anchor_loss"}


@pytest.mark.parametrize("case", sorted(_BAD))
def test_bad_key_stops_the_stream_with_a_named_assert(case):
    # In a child process: a device-side assert leaves the CUDA context unusable, as with torch's own index ops.
    if "triton" in case:
        _available("shuffle_patches" if "shuffle" in case else "anchor_loss", "triton")
    code = (
        "import torch, ppml\n"
        "x = torch.rand(2, 3, 32, 32, device='cuda'); f = torch.randn(2, 8, device='cuda')\n"
        "a = torch.randn(3, 8, device='cuda')\n"
        f"{_BAD[case]}\n"
        "torch.cuda.synchronize()\n"
        "print('NO ERROR')\n"
    )
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    text = out.stdout + out.stderr
    assert out.returncode > 0, f"{case}: exit status {out.returncode} (a crash, or no error):\n{text[-3000:]}"
    assert "NO ERROR" not in text
    assert "device-side assert" in text, text[-3000:]
    if "native" in case or ("triton" in case and "shuffle" in case and "long key" not in case):
        # ppml's CUDA kernels and the Triton shuffle kernel carry the message; the Python paths use
        # torch._assert_async, whose CUDA kernel prints torch's generic assertion instead (documented in the README).
        name = _EXPECTED[case.split()[0]]
        assert name in text, f"the assert does not name {name}:\n{text[-3000:]}"


def _kernels_launched(fn) -> list[str] | None:
    """Names of the CUDA kernels `fn` launches, from the profiler; None where the profiler sees no kernels at all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return names or None


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("batch", [1, 64])
def test_native_shuffle_is_one_launch_without_host_sync(dtype, batch):
    # The key check lives inside the gather kernel: one launch per call (no memset, no separate check kernel), and
    # the host never waits, for out= and for a fresh output alike.
    _available("shuffle_patches", "native")
    x = (torch.rand(batch, 3, 224, 224, device="cuda") * 255).to(dtype)
    perm = ppml.random_permutations(batch, 196, device="cuda")
    out = torch.empty_like(x)
    torch.ops.ppml.shuffle_patches.out(x, perm, 16, out=out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh = torch.ops.ppml.shuffle_patches(x, perm, 16)
        torch.ops.ppml.shuffle_patches.out(x, perm, 16, out=out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = reference.shuffle_patches(x.cpu(), perm.cpu(), 16)
    assert torch.equal(fresh.cpu(), expected) and torch.equal(out.cpu(), expected)
    control = _kernels_launched(lambda: out.add_(0) if dtype != torch.uint8 else out.bitwise_or_(0))
    if control is None:
        pytest.skip("the profiler sees no CUDA kernels here (no CUPTI)")
    launched = _kernels_launched(lambda: torch.ops.ppml.shuffle_patches.out(x, perm, 16, out=out))
    assert launched is not None and len(launched) == 1 and "shuffle_patches" in launched[0], launched


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_mix_never_synchronises(dtype, layout):
    _available("mix_subpatches", "native")
    x = (torch.rand(2, 3, 64, 64, device="cuda") * 255).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = ppml.random_mixing_weights(2, 16, 2, device="cuda")
    torch.ops.ppml.mix_subpatches(x, 16, 2, w)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mean, keyed = torch.ops.ppml.mix_subpatches(x, 16, 2, None), torch.ops.ppml.mix_subpatches(x, 16, 2, w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(mean.cpu(), reference.mix_subpatches(x.cpu(), 16, 2))
    assert torch.equal(keyed.cpu(), reference.mix_subpatches(x.cpu(), 16, 2, w.cpu()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 64])
def test_triton_shuffle_and_mix_are_one_launch_without_host_sync(layout, batch):
    # The Triton shuffle checks its keys inside its kernel (one program per image, a device-side assert) and MI has no
    # value check: each call is one kernel launch, and the host never waits.
    for op in ("shuffle_patches", "mix_subpatches"):
        _available(op, "triton")
    x = torch.rand(batch, 3, 224, 224, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    perm = ppml.random_permutations(batch, 196, device="cuda")
    w = ppml.random_mixing_weights(batch, 196, 2, device="cuda")
    calls = {
        "shuffle": lambda: torch.ops.ppml.shuffle_patches_triton(x, perm, 16),
        "public shuffle": lambda: ppml.shuffle_patches(x, 16, perm, backend="triton")[0],
        "mix": lambda: torch.ops.ppml.mix_subpatches_triton(x, 16, 2, None),
        "keyed mix": lambda: torch.ops.ppml.mix_subpatches_triton(x, 16, 2, w),
    }
    for call in calls.values():  # compile outside the checks
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = {name: call() for name, call in calls.items()}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = reference.shuffle_patches(x.cpu(), perm.cpu(), 16)
    assert torch.equal(results["shuffle"].cpu(), expected) and torch.equal(results["public shuffle"].cpu(), expected)
    assert torch.equal(results["keyed mix"].cpu(), reference.mix_subpatches(x.cpu(), 16, 2, w.cpu()))
    if _kernels_launched(lambda: x.add_(0)) is None:
        pytest.skip("the profiler sees no CUDA kernels here (no CUPTI)")
    for name, call in calls.items():
        launched = _kernels_launched(call)
        assert launched is not None and len(launched) == 1, (name, launched)
