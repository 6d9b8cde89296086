"""RS encryption, ``ppml::shuffle_patches``: [B, 3, 224, 224], p = 16, every provider, dtype and batch size.

Providers: ``copy`` (``out.copy_(x)`` into a preallocated ``out``: the bound), ``clone`` (allocate and copy: the bound
for any op returning a fresh tensor, far below ``copy`` where first-touch page faults are slow), ``loop`` (the paper
code: a ``torch.randperm`` and an index per image, keys included in the time), ``vectorised`` (unfold ->
``take_along_dim`` -> fold), ``compiled`` (``torch.compile(ppml.reference.shuffle_patches)``, full runs only),
``native`` (``torch.ops.ppml.shuffle_patches``, a fresh output per call), ``native_out``
(``torch.ops.ppml.shuffle_patches.out`` into a preallocated ``out=``: the like-for-like comparison with ``copy``) and
``triton`` (GPU only). On CPU, ``copy``, ``native_out``, ``clone`` and ``native`` (whose ratios native_out ÷ copy
and native ÷ clone are the targets) are finally timed again together, round-robin, and those figures are the ones
reported (column ``timing``: ``interleaved``).

GPU rows (issue 19, CUDA only: :data:`GPU_SECTION`): B in {64, 256, 1024}, uint8 / bfloat16 / float32, each kernel as
a share of its same-run bound: ``native_out`` ÷ ``copy``, ``native`` (fresh output) ÷ ``clone``, ``triton`` ÷
``clone``; µs above the bound at B = 64; and at B = 1 the µs per call, 20 calls back to back between two events (so a
host round trip inside the op shows), against the copy's. CUDA events, the median of ``Config.gpu_reps`` repetitions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import torch

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _harness import (
    GB_PER_S_COLUMN,
    IMAGES_PER_S_COLUMN,
    BenchmarkMismatch,
    Config,
    Provider,
    Section,
    Target,
    derive,
    gpu_share_targets,
    lazily_compiled,
    measure_shape,
    random_images,
    runnable_providers,
)
from _timing import copy_bound_ms, copy_call, retime_rows

import ppml
from ppml import reference


def shuffle_loop(images: torch.Tensor, patch_size: int, perms: torch.Tensor | None = None) -> torch.Tensor:
    """The paper-style RS encryption: one ``torch.randperm`` per image, index its patches, fold back, stack.

    Args:
        images (Tensor[B, C, H, W]): the batch.
        patch_size: p.
        perms (Tensor[B, N] int64, optional): fixed keys for the correctness check; the timed runs draw a
            ``torch.randperm`` per image instead, because that is what the paper code does.

    Returns:
        Tensor[B, C, H, W], the shuffled batch. Differentiable in ``images``.
    """
    B, C, H, W = images.shape
    p = patch_size
    th, tw = H // p, W // p
    n = th * tw
    out = []
    for b in range(B):
        idx = torch.randperm(n, device=images.device) if perms is None else perms[b]
        # [C, H, W] -> [C, th, tw, p, p]: tile (ty, tx) at [:, ty, tx], row-major like ppml's tile numbering.
        patches = images[b].unfold(1, p, p).unfold(2, p, p).reshape(C, n, p, p)
        shuffled = patches[:, idx]
        out.append(shuffled.reshape(C, th, tw, p, p).permute(0, 1, 3, 2, 4).reshape(C, H, W))
    return torch.stack(out)


def shuffle_vectorised(images: torch.Tensor, perm: torch.Tensor, patch_size: int) -> torch.Tensor:
    """What a user would write in batched PyTorch: unfold into [B, N, C·p·p], ``take_along_dim``, fold back.

    Args:
        images (Tensor[B, C, H, W]): the batch.
        perm (Tensor[B, N] int64): one permutation per image.
        patch_size: p.

    Returns:
        Tensor[B, C, H, W], the shuffled batch. Differentiable in ``images``.
    """
    B, C, H, W = images.shape
    p = patch_size
    th, tw = H // p, W // p
    patches = images.unfold(2, p, p).unfold(3, p, p)  # [B, C, th, tw, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, th * tw, C * p * p)
    shuffled = torch.take_along_dim(patches, perm.unsqueeze(-1), dim=1)
    return shuffled.reshape(B, th, tw, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def _shuffle_providers() -> list[Provider]:
    # native_out writes into one preallocated buffer per shape: `run` poisons it and checks what the op wrote there,
    # then `timed` reuses that very buffer (a fresh output per call would pay first-touch page faults, which `copy`,
    # the bound it is compared with, does not).
    out_buf: dict[tuple, torch.Tensor] = {}

    def buffer_for(x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in out_buf:
            out_buf.clear()  # one shape at a time: B=256 float32 is 154 MB
            out_buf[key] = torch.empty_like(x)
        return out_buf[key]

    def run_out(x: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
        buf = buffer_for(x)
        buf.fill_(7)  # whatever was there before must not pass the check
        returned = torch.ops.ppml.shuffle_patches.out(x, perm, p, out=buf)
        if returned is not None:
            raise BenchmarkMismatch(f"shuffle_patches.out returned {type(returned).__name__}; its schema returns ()")
        return buf

    def timed_out(x: torch.Tensor, perm: torch.Tensor, p: int) -> Callable[[], object]:
        buf, op = buffer_for(x), torch.ops.ppml.shuffle_patches.out
        return lambda: op(x, perm, p, out=buf)

    return [
        Provider("copy", None),
        # Allocating the output and copying: the bound for any op that returns a fresh tensor. On a CPU where the
        # first touch of fresh pages is slow (large tensors come straight from mmap) it is far below `copy`.
        Provider("clone", None, lambda x, perm, p: x.clone),
        # B=256 of the Python loop costs more of a --quick minute than all the other rows together (and seconds per
        # call when another process holds a core), while B=64 already gives the speedup vs loop.
        Provider(
            "loop",
            lambda x, perm, p: shuffle_loop(x, p, perm),
            lambda x, perm, p: lambda: shuffle_loop(x, p),
            quick_max_batch=64,
        ),
        Provider("vectorised", shuffle_vectorised),
        Provider(
            "compiled",
            lazily_compiled(reference.shuffle_patches),
            skip_quick="torch.compile takes seconds per shape (--quick skips it; the full run includes it)",
            optional=True,
        ),
        Provider("native", lambda x, perm, p: torch.ops.ppml.shuffle_patches(x, perm, p), backend="native"),
        Provider("native_out", run_out, timed_out, backend="native"),
        Provider(
            "triton",
            lambda x, perm, p: torch.ops.ppml.shuffle_patches_triton(x, perm, p),
            backend="triton",
            gpu_only=True,
        ),
    ]


def _measure_batch(
    cfg: Config, tag: str, runnable: list[Provider], x: torch.Tensor, n: int, p: int, **kwargs
) -> tuple[list[dict], torch.Tensor]:
    """:func:`_harness.measure_shape` of ``runnable`` on the batch ``x`` (``n`` patches of p×p an image) under a fresh
    key from ``cfg.seed + 1``, checked against the reference; ``kwargs`` go to measure_shape (``bound``, ``base_row``,
    ...). Returns the rows and the key."""
    perm = ppml.random_permutations(x.shape[0], n, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(cfg.device)
    expected = reference.shuffle_patches(x, perm, p)
    rows = measure_shape(
        cfg,
        op="shuffle_patches",
        tag=tag,
        runnable=runnable,
        args=(x, perm, p),
        expected={"default": expected}.__getitem__,
        **kwargs,
    )
    return rows, perm


def section_shuffle(cfg: Config) -> list[dict]:
    """RS encryption, ``ppml::shuffle_patches``: [B, 3, 224, 224], p = 16, every provider, dtype and batch size."""
    device = cfg.device
    C, H, W, p = 3, 224, 224, 16
    n = (H // p) * (W // p)
    dtypes = [torch.uint8, torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    runnable = runnable_providers(_shuffle_providers(), "shuffle_patches", "shuffle", cfg)
    rows = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for B in (1, 64, 256):
            x = random_images((B, C, H, W), dtype, device, seed=cfg.seed + B)
            shape_rows, perm = _measure_batch(
                cfg, "shuffle", runnable, x, n, p,
                bound=functools.partial(copy_bound_ms, x, budget_s=cfg.budget_s, warmup=cfg.warmup),
                base_row={
                    "section": "shuffle_patches",
                    "dtype": dname,
                    "B": B,
                    "C": C,
                    "H": H,
                    "W": W,
                    "patch_size": p,
                },
            )
            if device.type == "cpu":
                retime_interleaved(shape_rows, runnable, (x, perm, p), cfg)
            derive(shape_rows, nbytes=2 * x.numel() * x.element_size(), baselines=BASELINES)
            rows += shape_rows
            del x, perm
    return rows


def retime_interleaved(rows: list[dict], runnable: list[Provider], args: tuple, cfg: Config) -> None:
    """Times ``copy``, ``native_out``, ``clone`` and ``native`` again, round-robin
    (``_timing.time_cpu_interleaved``), and puts those figures in their rows (``timing``: ``"interleaved"``): the
    targets are the ratios native_out ÷ copy and native ÷ clone. Timed one after the other on the shared 2-core VM
    such a ratio moved by more than ±0.15 between runs of the same binary, as the machine's load and the L3's contents
    drifted between the two measurements."""
    by_name = {r["provider"]: r for r in rows}
    x = args[0]
    calls = {"copy": copy_call(x)} if "copy" in by_name else {}
    if "clone" in by_name:
        calls["clone"] = x.clone
    for prov in runnable:
        if prov.name in ("native_out", "native") and prov.name in by_name:
            calls[prov.name] = prov.timed_fn(*args)
    if len(calls) < 2:
        return
    retime_rows(by_name, calls, budget_s=cfg.budget_s, warmup=cfg.warmup)


# The baselines of the speedup columns; `clone` is the bound of a fresh output (the "≥ 0.9× torch.clone").
BASELINES = ("loop", "vectorised", "compiled", "clone")

# Each CPU target twice: `native` returns a fresh tensor, like `clone` (first-touch page faults on every call where
# large allocations come straight from mmap), `native_out` writes into a preallocated one, like `copy` does.
TARGETS: list[Target] = [
    Target("native (fresh output) float32 B=64 vs clone", "native", "float32", 64, "speedup_vs_clone", 0.9),
    Target("native_out (preallocated) float32 B=64 share of copy", "native_out", "float32", 64, "share_of_copy", 0.9),
    Target("native (fresh output) uint8 B=64 vs clone", "native", "uint8", 64, "speedup_vs_clone", 0.9),
    Target("native_out (preallocated) uint8 B=64 share of copy", "native_out", "uint8", 64, "share_of_copy", 0.8),
    Target(
        "native (fresh output) float32 B=64 speedup vs vectorised",
        "native",
        "float32",
        64,
        "speedup_vs_vectorised",
        3.0,
    ),
    Target(
        "native_out (preallocated) float32 B=64 speedup vs vectorised",
        "native_out",
        "float32",
        64,
        "speedup_vs_vectorised",
        3.0,
    ),
    *gpu_share_targets("share_of_copy", (64, 256)),
]


COLUMNS = [
    GB_PER_S_COLUMN,
    ("share of copy", "share_of_copy", ".2f", ""),
    ("vs loop", "speedup_vs_loop", ".1f", "×"),
    ("vs vectorised", "speedup_vs_vectorised", ".2f", "×"),
    ("vs compiled", "speedup_vs_compiled", ".2f", "×"),
    ("vs clone", "speedup_vs_clone", ".2f", "×"),
    IMAGES_PER_S_COLUMN,
]


# ---- GPU rows (issue 19) -------------------------------------------------------------------------------------------

GPU_BATCHES = (64, 256, 1024)
GPU_DTYPES = (torch.uint8, torch.bfloat16, torch.float32)
# B = 1 is timed as this many calls back to back per pair of events: one call is a few µs, and a host round trip
# inside the op (what issue 19 measured: 34 µs against the copy's 5) only shows when calls queue behind each other.
LATENCY_INNER = 20
# Each kernel's bound: `out=` writes where `copy` writes; a fresh output pays the allocation `clone` pays.
GPU_BOUND = {"copy": None, "clone": "copy", "native_out": "copy", "native": "clone", "triton": "clone"}


def device_images(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Random images drawn on `device` itself: B = 1024 drawn on the host would cost the GPU check seconds per dtype."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8, device=device)
    return torch.rand(shape, generator=gen, dtype=torch.float32, device=device).to(dtype)


def derive_bound(rows: list[dict], nbytes: int) -> None:
    """The GPU rows' derived columns: µs per call, GB/s, and against the row's bound (:data:`GPU_BOUND`) its share
    (bound ms ÷ ms) and the µs above it."""
    ms = {r["provider"]: r["ms"] for r in rows}
    for row in rows:
        row["us"] = row["ms"] * 1e3
        row["gb_per_s"] = nbytes / (row["ms"] * 1e-3) / 1e9
        bound = GPU_BOUND.get(row["provider"])
        row["bound_provider"] = bound
        if bound is not None and bound in ms:
            row["share_of_bound"] = ms[bound] / row["ms"]
            row["us_above_bound"] = (row["ms"] - ms[bound]) * 1e3
        else:
            row["share_of_bound"] = row["us_above_bound"] = None


def gpu_rows(
    cfg: Config,
    *,
    timer: Callable[..., dict] | None = None,
    batches: tuple[int, ...] = GPU_BATCHES,
    dtypes: tuple[torch.dtype, ...] = GPU_DTYPES,
    size: int = 224,
    patch_size: int = 16,
    latency_batch: int | None = 1,
) -> list[dict]:
    """Issue 19's shuffle table on `cfg.device`: every kernel against its same-run bound. A provider whose backend is
    absent is noted and skipped; one that fails or gives a wrong result is noted and left untimed (never a crash).

    Args:
        cfg: the run's config (the GPU rows' timer and repetitions come from it).
        timer: ``timer(fn, inner=, flush_l2=) -> {"ms", "min_ms", "reps"}`` (default: ``cfg.gpu_timer()``).
        batches, dtypes, size, patch_size: the shapes ([B, 3, size, size]); tests pass small ones.
        latency_batch: the batch timed back to back (:data:`LATENCY_INNER` calls per repetition), None for none.
    """
    timer = timer or cfg.gpu_timer()
    device, C, p = cfg.device, 3, patch_size
    n = (size // p) ** 2
    names = set(GPU_BOUND)
    # Every batch size at every run (--quick included), and a failure is a note: the GPU check must get every row.
    providers = [replace(pv, quick_max_batch=None, optional=True) for pv in _shuffle_providers() if pv.name in names]
    runnable = runnable_providers(providers, "shuffle_patches", "shuffle_gpu", cfg)
    rows = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for B in ((latency_batch,) if latency_batch else ()) + tuple(batches):
            latency = B == latency_batch
            kw = {"inner": LATENCY_INNER, "flush_l2": False} if latency else {}
            x = device_images((B, C, size, size), dtype, device, seed=cfg.seed + B)
            shape_rows, perm = _measure_batch(
                cfg, "shuffle_gpu", runnable, x, n, p,
                bound=functools.partial(timer, copy_call(x), **kw),
                base_row={
                    "section": "shuffle_patches_gpu",
                    "dtype": dname,
                    "B": B,
                    "C": C,
                    "H": size,
                    "W": size,
                    "patch_size": p,
                    "timing": f"events, {LATENCY_INNER} calls back to back" if latency else "events, L2 flushed",
                },
                timer=functools.partial(timer, **kw),
                on_mismatch="skip",
            )
            derive_bound(shape_rows, nbytes=2 * x.numel() * x.element_size())
            rows += shape_rows
            del x, perm
    return rows


def _gpu_targets() -> list[Target]:
    """Issue 19, point 1: >= 0.85 of the bound at B >= 256 for every dtype, into `out=` and fresh (native and Triton);
    at most 10 µs above the bound at B = 64."""
    targets = []
    for dname in ("uint8", "bfloat16", "float32"):
        for prov in ("native_out", "native", "triton"):
            bound = GPU_BOUND[prov]
            for B in (256, 1024):
                targets.append(Target(f"{prov} {dname} B={B} share of {bound}", prov, dname, B, "share_of_bound", 0.85,
                                      ("cuda",)))  # fmt: skip
            targets.append(Target(f"{prov} {dname} B=64 µs above {bound}", prov, dname, 64, "us_above_bound", None,
                                  ("cuda",), maximum=10.0))  # fmt: skip
    return targets


def _gpu_title(rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"shuffle_patches GPU rows [B, {r['C']}, {r['H']}, {r['W']}] p={r['patch_size']}: each kernel against the "
        f"same-run copy (`out=`) or clone (fresh output)"
    )


GPU_SECTION = Section(
    name="shuffle_gpu",
    run=gpu_rows,
    targets=_gpu_targets(),
    columns=[
        ("µs", "us", ",.1f", ""),
        ("bound", "bound_provider", "s", ""),
        ("share of bound", "share_of_bound", ".2f", ""),
        ("µs above bound", "us_above_bound", ",.1f", ""),
        GB_PER_S_COLUMN,
        ("reps", "reps", "d", ""),
    ],
    title=_gpu_title,
)

SECTION = Section(name="shuffle", run=section_shuffle, targets=TARGETS, columns=COLUMNS, gpu=GPU_SECTION)
