"""MI encryption, ``ppml::mix_subpatches``: [B, 3, 224, 224] -> [B, 3, 112, 112], p = 16, g = 2, every provider, dtype
and batch size.

Providers: ``bound`` (bytes read + written, the input plus the output in the op's output dtype, at the copy bandwidth
of ``out.copy_(x)`` for the same input measured in the same run), ``torch`` (what a user would write: a reshape and
``mean(dim=(3, 6))``), ``compiled`` (``torch.compile(ppml.reference.mix_subpatches)``, full runs only), ``native``
(``torch.ops.ppml.mix_subpatches``, the mean), ``native_weighted`` (keyed weights from ``ppml.random_mixing_weights``)
and ``triton`` (GPU only). There is no ``native_out``: the op has no ``out=`` overload. On CPU the bound's copy,
``native`` and ``native_weighted`` are finally timed again together, round-robin, and those figures are the ones
reported (column ``timing``: ``interleaved``).

GPU rows (issue 19, CUDA only: :data:`GPU_SECTION`): uint8 and float32, B in {64, 256}, ``native``, ``triton`` (the
mean), ``native_weighted`` and ``triton_weighted`` (keyed), and ``torch``, each as a share of the bytes-moved bound at
the same run's copy bandwidth. CUDA events, the median of ``Config.gpu_reps`` repetitions.
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
    Config,
    Provider,
    Section,
    Target,
    bit_equal,
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
from ppml.reference.mix_subpatches import output_dtype as mix_output_dtype


def mix_torch(images: torch.Tensor, patch_size: int, grid: int) -> torch.Tensor:
    """What a user would write for the MI mean: split each patch into its g×g sub-patches and average them.

    Args:
        images (Tensor[B, C, H, W]): the batch (uint8 is averaged in float32, like the op; float dtypes keep theirs).
        patch_size: p.
        grid: g.

    Returns:
        Tensor[B, C, H/g, W/g] in the op's output dtype. Differentiable in ``images`` (float dtypes).
    """
    B, C, H, W = images.shape
    p, g = patch_size, grid
    q = p // g
    x = images.reshape(B, C, H // p, g, q, W // p, g, q)
    if images.dtype == torch.uint8:
        x = x.float()
    return x.mean(dim=(3, 6)).reshape(B, C, H // g, W // g)


def torch_close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same shape and dtype, and within 1e-5 relative (one ulp of a bfloat16/float16 output): ``mean`` sums in its
    own order, so the last bit may differ from the reference's row-major adds."""
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    rtol = max(1e-5, torch.finfo(got.dtype).eps)
    return torch.allclose(got, expected, rtol=rtol, atol=0.0)


def mix_exact(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit where the output is float32/float64 (every uint8 and float32 row); within one ulp of a
    bfloat16/float16 output (the room ``tests/test_mix_subpatches_triton.py`` gives the GPU kernels there)."""
    if got.dtype in (torch.float32, torch.float64) or got.shape != expected.shape or got.dtype != expected.dtype:
        return bit_equal(got, expected)
    return torch.allclose(got, expected, rtol=torch.finfo(got.dtype).eps, atol=0.0)


MIX_EXACT = "bit for bit (one ulp for bfloat16)"


def _kernel_provider(backend: str, weighted: bool) -> Provider:
    """The op on ``backend`` (``native``: ``ppml::mix_subpatches``; ``triton``: ``ppml::mix_subpatches_triton``, GPU
    only), with the weights (row ``<backend>_weighted``, checked against ``weighted``) or without (the mean)."""
    op = "mix_subpatches_triton" if backend == "triton" else "mix_subpatches"
    if weighted:
        call = lambda x, p, g, w: getattr(torch.ops.ppml, op)(x, p, g, w)  # noqa: E731
    else:
        call = lambda x, p, g, w: getattr(torch.ops.ppml, op)(x, p, g, None)  # noqa: E731
    return Provider(
        f"{backend}_weighted" if weighted else backend,
        call,
        backend=backend,
        gpu_only=backend == "triton",
        expects="weighted" if weighted else "mean",
        check=mix_exact,
        check_desc=MIX_EXACT,
    )


def _mix_providers() -> list[Provider]:
    compiled = lazily_compiled(reference.mix_subpatches)  # the mean: weights left at None
    return [
        Provider("bound", None),
        # Seconds per call at B=256 on a 2-core CPU (about as long as the rest of the mix section together), while
        # B=64 already gives the speedup vs torch.
        Provider(
            "torch",
            lambda x, p, g, w: mix_torch(x, p, g),
            quick_max_batch=64,
            expects="mean",
            check=torch_close,
            check_desc="to 1e-5 relative (its own summation order)",
        ),
        Provider(
            "compiled",
            lambda x, p, g, w: compiled(x, p, g),
            skip_quick="torch.compile takes seconds per shape (--quick skips it; the full run includes it)",
            optional=True,
            expects="mean",
            check=mix_exact,
            check_desc=MIX_EXACT,
        ),
        _kernel_provider("native", weighted=False),
        _kernel_provider("native", weighted=True),
        _kernel_provider("triton", weighted=False),
    ]


def mix_bound_ms(x: torch.Tensor, nbytes: int, cfg: Config, timer: Callable[..., dict] | None = None) -> dict:
    """The bound of an op that reads ``x`` once and writes ``nbytes - x.nbytes`` bytes: ``nbytes`` at the bandwidth
    of ``out.copy_(x)`` measured now (:func:`_timing.copy_bound_ms`, which moves ``2 * x.nbytes`` bytes; or `timer`'s
    time of the same copy, for the GPU rows).

    Returns:
        The copy's :func:`_timing.time_fn` result scaled to ``nbytes``, plus ``copy_ms`` (the copy's own median).
    """
    if timer is None:
        copy = copy_bound_ms(x, budget_s=cfg.budget_s, warmup=cfg.warmup)
    else:
        copy = timer(copy_call(x))
    scale = nbytes / (2 * x.numel() * x.element_size())
    return {"ms": copy["ms"] * scale, "min_ms": copy["min_ms"] * scale, "reps": copy["reps"], "copy_ms": copy["ms"]}


def mix_expected(x: torch.Tensor, p: int, g: int, weights: torch.Tensor) -> Callable[[str], torch.Tensor]:
    """``expected(kind)``: the reference output for ``mean`` or ``weighted``, each computed once and only if asked."""
    cache: dict[str, torch.Tensor] = {}

    def expected(kind: str) -> torch.Tensor:
        if kind not in cache:
            cache[kind] = reference.mix_subpatches(x, p, g, weights if kind == "weighted" else None)
        return cache[kind]

    return expected


def section_mix(cfg: Config) -> list[dict]:
    """MI encryption, ``ppml::mix_subpatches``: [B, 3, 224, 224] -> [B, 3, 112, 112], p = 16, g = 2, every provider,
    dtype and batch size."""
    dtypes = (torch.uint8, torch.float32) + ((torch.bfloat16,) if cfg.device.type == "cuda" else ())
    return _mix_rows(cfg, _mix_providers(), (1, 64, 256), dtypes, 224, 16, 2, "mix_subpatches")


def _mix_rows(
    cfg: Config,
    providers: list[Provider],
    batches: tuple[int, ...],
    dtypes: tuple[torch.dtype, ...],
    size: int,
    p: int,
    g: int,
    section: str,
    timer: Callable[..., dict] | None = None,
) -> list[dict]:
    """The rows of `section` ([B, 3, size, size]): with `timer` (the GPU rows), every provider and the copy are timed by
    it and a wrong result is noted instead of aborting the run."""
    device = cfg.device
    C, H, W = 3, size, size
    n = (H // p) * (W // p)
    tag = "mix" if timer is None else "mix_gpu"
    runnable = runnable_providers(providers, "mix_subpatches", tag, cfg)
    rows = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for B in batches:
            x = random_images((B, C, H, W), dtype, device, seed=cfg.seed + B)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            weights = ppml.random_mixing_weights(B, n, g, generator=gen).to(device)
            # Bytes read + written: the images once, the output (a quarter of the pixels, float32 for uint8) once.
            # The weights (N·g² floats per image, 0.5% of a float32 image) are left out, as for native_weighted.
            nbytes = x.numel() * x.element_size() + x.numel() // (g * g) * mix_output_dtype(dtype).itemsize
            base_row = {"section": section, "dtype": dname, "B": B, "C": C, "H": H, "W": W, "patch_size": p, "grid": g}
            if timer is not None:
                base_row["timing"] = "events, L2 flushed"
            shape_rows = measure_shape(
                cfg,
                op="mix_subpatches",
                tag=tag,
                runnable=runnable,
                args=(x, p, g, weights),
                expected=mix_expected(x, p, g, weights),
                bound=functools.partial(mix_bound_ms, x, nbytes, cfg, timer),
                base_row=base_row,
                timer=timer,
                on_mismatch="raise" if timer is None else "skip",
            )
            if timer is None and device.type == "cpu":
                _retime_interleaved(shape_rows, runnable, (x, p, g, weights), nbytes, cfg)
            derive(shape_rows, nbytes=nbytes, bound="bound", baselines=("torch",))
            rows += shape_rows
            del x, weights
    return rows


def _retime_interleaved(rows: list[dict], runnable: list[Provider], args: tuple, nbytes: int, cfg: Config) -> None:
    """The bound's copy, ``native`` and ``native_weighted`` again, round-robin (``_timing.time_cpu_interleaved``): their
    ratios are the targets, and timed one after the other on a shared machine they drift with its load."""
    by_name = {r["provider"]: r for r in rows}
    x = args[0]
    calls = {"bound": copy_call(x)} if "bound" in by_name else {}
    for prov in runnable:
        if prov.name in ("native", "native_weighted") and prov.name in by_name:
            calls[prov.name] = prov.timed_fn(*args)
    if len(calls) < 2:
        return
    scale = {"bound": nbytes / (2 * x.numel() * x.element_size())}
    retime_rows(by_name, calls, budget_s=cfg.budget_s, warmup=cfg.warmup, scale=scale)


TARGETS: list[Target] = [
    Target("native float32 B=64 share of bound", "native", "float32", 64, "share_of_bound", 0.9, ("cpu",)),
    Target("native uint8 B=64 share of bound", "native", "uint8", 64, "share_of_bound", 0.8, ("cpu",)),
    *gpu_share_targets("share_of_bound", (64,)),
]

COLUMNS = [
    GB_PER_S_COLUMN,
    ("share of bound", "share_of_bound", ".2f", ""),
    ("vs torch", "speedup_vs_torch", ".2f", "×"),
    IMAGES_PER_S_COLUMN,
]


# ---- GPU rows (issue 19) -------------------------------------------------------------------------------------------

GPU_BATCHES = (64, 256)
GPU_DTYPES = (torch.uint8, torch.float32)


def _gpu_providers() -> list[Provider]:
    """The CPU section's providers but ``compiled``, plus ``triton_weighted``: every batch size in every run, and a
    failure is a note (the GPU check must get every row)."""
    providers = [pv for pv in _mix_providers() if pv.name != "compiled"]
    providers.append(_kernel_provider("triton", weighted=True))
    return [replace(pv, quick_max_batch=None, optional=True) for pv in providers]


def gpu_rows(
    cfg: Config,
    *,
    timer: Callable[..., dict] | None = None,
    batches: tuple[int, ...] = GPU_BATCHES,
    dtypes: tuple[torch.dtype, ...] = GPU_DTYPES,
    size: int = 224,
    patch_size: int = 16,
    grid: int = 2,
) -> list[dict]:
    """Issue 19's MI table on `cfg.device`: every kernel as a share of its bytes-moved bound and against the
    reshape-mean. Absent backends are noted and skipped; a failure or a wrong result is noted, never a crash.

    Args:
        cfg: the run's config (the GPU rows' timer and repetitions come from it).
        timer: ``timer(fn) -> {"ms", "min_ms", "reps"}`` (default: ``cfg.gpu_timer()``).
        batches, dtypes, size, patch_size, grid: the shapes; tests pass small ones.
    """
    timer = timer or cfg.gpu_timer()
    return _mix_rows(cfg, _gpu_providers(), batches, dtypes, size, patch_size, grid, "mix_subpatches_gpu", timer)


def _gpu_targets() -> list[Target]:
    """Issue 19, point 2: >= 0.85 of the bytes-moved bound at B >= 256, mean and keyed; native and Triton beat the
    reshape-mean at every size."""
    targets = []
    for dname in ("uint8", "float32"):
        for prov in ("native", "native_weighted", "triton", "triton_weighted"):
            targets.append(Target(f"{prov} {dname} B=256 share of bound", prov, dname, 256, "share_of_bound", 0.85,
                                  ("cuda",)))  # fmt: skip
        for prov in ("native", "triton"):
            for B in GPU_BATCHES:
                targets.append(Target(f"{prov} {dname} B={B} speedup vs torch", prov, dname, B, "speedup_vs_torch",
                                      1.0, ("cuda",)))  # fmt: skip
    return targets


def _gpu_title(rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"mix_subpatches GPU rows [B, {r['C']}, {r['H']}, {r['W']}] p={r['patch_size']} g={r['grid']}: each kernel "
        "as a share of its bytes-moved bound at the same run's copy bandwidth"
    )


GPU_SECTION = Section(
    name="mix_gpu",
    run=gpu_rows,
    targets=_gpu_targets(),
    columns=COLUMNS + [("copy ms", "copy_ms", ".3f", ""), ("reps", "reps", "d", "")],
    title=_gpu_title,
)

SECTION = Section(name="mix", run=section_mix, targets=TARGETS, columns=COLUMNS, gpu=GPU_SECTION)
