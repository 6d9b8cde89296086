"""The model's input path, ``ppml::patch_tokens``: uint8 [B, 3, 224, 224] → normalised, RS-shuffled float32 tokens
[B, 196, 768] (p = 16, ImageNet mean/std), B in {64, 256}.

Providers: ``copy`` (``out.copy_(y)`` of a float32 tensor the size of the tokens into a preallocated ``out``: the
same run's copy bandwidth), ``eager`` (what a user writes: to float, ``/ 255``, normalise, unfold by reshape/permute,
gather the tiles by the key — each pass reading and writing the batch), ``compiled`` (``torch.compile`` of
``ppml.reference.patch_tokens``, full runs only), ``native`` (``torch.ops.ppml.patch_tokens``, a fresh output per
call), ``native_out`` (``.out`` into a preallocated buffer, like ``copy``) and ``triton`` (GPU only). The bound is
the bytes the op must move, 1 byte read + 4 written per element, at the copy's bandwidth (8 bytes per element):
``bound ms = copy ms × 5 / 8``, and ``share of bound`` = bound ms ÷ ms. On CPU the targets' rows are timed
round-robin (``_timing.time_cpu_interleaved``), so their ratios hold on a shared machine (column ``timing``:
``interleaved``), in two groups: ``copy``, ``convert_out`` and ``native_out`` (reused buffers), then ``eager``,
``to_float`` and ``native`` (fresh outputs), so that neither group's cache and TLB churn lands in the other's
timings. ``native`` returns a fresh 38.5 MB tensor per call at B = 64: on a CPU where
fresh pages fault on first touch that is part of its time, and no op returning a fresh tensor can reach the copy's
bound. Its own bound is ``to_float`` (``images.to(torch.float32)``: PyTorch's conversion into a fresh tensor of the
tokens' size, the same 1 byte read + 4 written per element), timed round-robin with it; ``native`` ÷
``to_float`` is the fresh-output target, ``native_out`` ÷ the copy bound the bandwidth target. ``convert_out``
(``out.view(images.shape).copy_(images)``: PyTorch's own uint8 → float32 conversion into the reused buffer, the op's
bytes in order with no gather and no arithmetic) is PyTorch's streaming kernel with the same bytes; the streaming
kernels written to find this CPU's limit (non-temporal stores, the write path alone) are in
``benchmarks/experiments/cpu_stream_limit.py --ops tokens``.
"""

from __future__ import annotations

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
    lazily_compiled,
    measure_shape,
    random_images,
    runnable_providers,
)
from _timing import copy_bound_ms, copy_call, retime_rows

import ppml
from ppml import reference

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Bytes per token element: what the op must move (1 read + 4 written) and what the float32 copy moves (4 + 4).
NEEDED_BYTES, COPY_BYTES = 5, 8


def tokens_eager(images: torch.Tensor, perm: torch.Tensor, patch_size: int) -> torch.Tensor:
    """What a user would write in batched PyTorch: float, /255, normalise, reshape/permute into [B, N, C·p·p], gather.

    Args:
        images (Tensor[B, C, H, W] uint8): the batch.
        perm (Tensor[B, N] int64): one permutation per image.
        patch_size: p.

    Returns:
        Tensor[B, N, C·p·p] float32.
    """
    B, C, H, W = images.shape
    p = patch_size
    mean = torch.tensor(MEAN, device=images.device).view(1, C, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, C, 1, 1)
    x = (images.float() / 255 - mean) / std
    tiles = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    return torch.take_along_dim(tiles, perm.unsqueeze(-1), dim=1)


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    # eager / compiled may divide by a reciprocal (CUDA's scalar division, inductor): within 2 float32 ulps.
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=3e-7, atol=1e-6)


def _providers() -> list[Provider]:
    # native_out writes into one preallocated buffer per shape (`run` poisons it and checks what the op wrote, then
    # `timed` reuses it): a fresh 38.5 MB output per call pays first-touch page faults that `copy` does not.
    out_buf: dict[tuple, torch.Tensor] = {}

    def buffer_for(x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        key = (tuple(x.shape), x.device)
        if key not in out_buf:
            out_buf.clear()
            out_buf[key] = torch.empty(B, (H // 16) * (W // 16), C * 256, device=x.device)
        return out_buf[key]

    def run_out(x: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
        buf = buffer_for(x)
        buf.fill_(7)
        torch.ops.ppml.patch_tokens.out(x, perm, p, list(MEAN), list(STD), torch.float32, out=buf)
        return buf

    def timed_out(x: torch.Tensor, perm: torch.Tensor, p: int) -> Callable[[], object]:
        buf, op, m, s = buffer_for(x), torch.ops.ppml.patch_tokens.out, list(MEAN), list(STD)
        return lambda: op(x, perm, p, m, s, torch.float32, out=buf)

    def timed_convert(x: torch.Tensor, perm: torch.Tensor, p: int) -> Callable[[], object]:
        dst = buffer_for(x).view(x.shape)
        return lambda: dst.copy_(x)

    return [
        Provider("copy", None),
        # The fresh-output limit: the same bytes read and written, into a fresh tensor, by PyTorch's own kernel.
        Provider("to_float", None, lambda x, perm, p: lambda: x.to(torch.float32)),
        # The streaming limit of `out=`: PyTorch's uint8 -> float32 copy into a reused buffer, the op's bytes in
        # order, no gather, no arithmetic.
        Provider("convert_out", None, timed_convert),
        Provider("eager", tokens_eager, check=_close, check_desc="within 2 float32 ulps"),
        Provider(
            "compiled",
            lazily_compiled(lambda x, perm, p: reference.patch_tokens(x, p, perm, MEAN, STD)),
            skip_quick="torch.compile takes seconds per shape (--quick skips it; the full run includes it)",
            optional=True,
            check=_close,
            check_desc="within 2 float32 ulps",
        ),
        Provider(
            "native",
            lambda x, perm, p: torch.ops.ppml.patch_tokens(x, perm, p, list(MEAN), list(STD), torch.float32),
            backend="native",
        ),
        Provider("native_out", run_out, timed_out, backend="native"),
        Provider(
            "triton",
            lambda x, perm, p: torch.ops.ppml.patch_tokens_triton(x, perm, p, list(MEAN), list(STD), torch.float32),
            backend="triton",
            gpu_only=True,
        ),
    ]


def section_tokens(cfg: Config) -> list[dict]:
    """uint8 [B, 3, 224, 224] → float32 tokens [B, 196, 768], p = 16, ImageNet statistics, a fresh key per image."""
    device = cfg.device
    C, H, W, p = 3, 224, 224, 16
    n = (H // p) * (W // p)
    runnable = runnable_providers(_providers(), "patch_tokens", "tokens", cfg)
    rows = []
    for B in (64, 256):
        x = random_images((B, C, H, W), torch.uint8, device, seed=cfg.seed + B)
        perm = ppml.random_permutations(B, n, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
        expected = reference.patch_tokens(x, p, perm, MEAN, STD)
        like_tokens = torch.empty(expected.shape, dtype=torch.float32, device=device)
        shape_rows = measure_shape(
            cfg,
            op="patch_tokens",
            tag="tokens",
            runnable=runnable,
            args=(x, perm, p),
            expected={"default": expected}.__getitem__,
            bound=lambda t=like_tokens: copy_bound_ms(t, budget_s=cfg.budget_s, warmup=cfg.warmup),
            base_row={"section": "patch_tokens", "dtype": "uint8", "B": B, "C": C, "H": H, "W": W, "patch_size": p},
        )
        del expected
        if device.type == "cpu":
            _retime_interleaved(shape_rows, runnable, (x, perm, p), like_tokens, cfg)
        _derive(shape_rows, elements=like_tokens.numel())
        rows += shape_rows
        del x, perm, like_tokens
    return rows


def _retime_interleaved(rows: list[dict], runnable: list[Provider], args: tuple, like: torch.Tensor, cfg: Config):
    """The targets' rows again, round-robin, in two groups: ``copy``, ``convert_out`` and ``native_out`` (buffers
    reused: the bandwidth target), then ``eager``, ``to_float`` and ``native`` (fresh outputs: the speedup and
    fresh-output targets). One round-robin of all six let the 100 ms eager path (a dozen 38.5 MB temporaries) and
    the fresh outputs' page faults run between the bandwidth calls, flushing the caches and TLB they compete on:
    there ``native_out`` measured 0.66-0.68 of the copy bound, in its own group 0.9-1.0 (Intel Xeon, 2 threads;
    benchmarks/RESULTS.md, "Issue 22 closed: ...")."""
    by_name = {r["provider"]: r for r in rows}
    timed = {prov.name: prov for prov in runnable if prov.name in by_name}
    for group in (("copy", "convert_out", "native_out"), ("eager", "to_float", "native")):
        calls = {name: copy_call(like) if name == "copy" else timed[name].timed_fn(*args)
                 for name in group if name == "copy" or name in timed}  # fmt: skip
        if len(calls) < 2:
            continue
        retime_rows(by_name, calls, budget_s=cfg.budget_s, warmup=cfg.warmup)


def _derive(rows: list[dict], elements: int) -> None:
    ms = {r["provider"]: r["ms"] for r in rows}
    bound_ms = ms["copy"] * NEEDED_BYTES / COPY_BYTES if "copy" in ms else None
    for row in rows:
        moved = (COPY_BYTES if row["provider"] == "copy" else NEEDED_BYTES) * elements
        row["gb_per_s"] = moved / (row["ms"] * 1e-3) / 1e9
        row["share_of_bound"] = bound_ms / row["ms"] if bound_ms is not None else None
        for base in ("eager", "compiled", "to_float", "convert_out"):
            row[f"speedup_vs_{base}"] = ms[base] / row["ms"] if base in ms else None
        row["images_per_s"] = row["B"] / (row["ms"] * 1e-3)


TARGETS: list[Target] = [
    Target("native uint8->float32 B=64 speedup vs eager", "native", "uint8", 64, "speedup_vs_eager", 5.0),
    Target(
        "native (fresh output) uint8->float32 B=64 vs to_float (the fresh-output limit)",
        "native",
        "uint8",
        64,
        "speedup_vs_to_float",
        0.9,
    ),
    Target(
        "native_out (preallocated) uint8->float32 B=64 share of the bytes-moved bound",
        "native_out",
        "uint8",
        64,
        "share_of_bound",
        0.7,
    ),
    Target(
        "native_out (preallocated) uint8->float32 B=64 vs convert_out (the same bytes streamed in order)",
        "native_out",
        "uint8",
        64,
        "speedup_vs_convert_out",
        0.9,
        ("cpu",),
    ),
]

COLUMNS = [
    GB_PER_S_COLUMN,
    ("share of bound", "share_of_bound", ".2f", ""),
    ("vs eager", "speedup_vs_eager", ".1f", "×"),
    ("vs compiled", "speedup_vs_compiled", ".2f", "×"),
    ("vs to_float", "speedup_vs_to_float", ".2f", "×"),
    ("vs convert_out", "speedup_vs_convert_out", ".2f", "×"),
    IMAGES_PER_S_COLUMN,
]


def _title(rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"patch_tokens uint8 [B, {r['C']}, {r['H']}, {r['W']}] → float32 tokens p={r['patch_size']} (bound: 5 bytes "
        f"per element at the same run's copy bandwidth)"
    )


# ---- GPU rows ------------------------------------------------------------------------------------------------------

GPU_BATCHES = (1, 64, 256)


def gpu_rows(
    cfg: Config,
    *,
    timer: Callable[..., dict] | None = None,
    batches: tuple[int, ...] = GPU_BATCHES,
    size: int = 224,
    patch_size: int = 16,
    channels_last_batches: tuple[int, ...] = (64,),
) -> list[dict]:
    """Every provider on `cfg.device` (CUDA events, L2 flushed, ``cfg.gpu_timer()``): the native and Triton kernels
    against the bytes-moved bound and the eager path. A provider whose backend is absent is noted and skipped; one
    that fails or gives a wrong result is noted and left untimed (never a crash).

    Args:
        cfg: the run's config.
        timer: ``timer(fn) -> {"ms", "min_ms", "reps"}`` (default: ``cfg.gpu_timer()``).
        batches, size, patch_size: the shapes ([B, 3, size, size]); tests pass small ones.
        channels_last_batches: batches also timed with channels_last (NHWC) images, as decoders hand them out
            (rows with ``layout`` "channels_last"; the others are "contiguous").
    """
    timer = timer or cfg.gpu_timer()
    device, C, p = cfg.device, 3, patch_size
    n = (size // p) ** 2
    providers = [replace(pv, quick_max_batch=None, skip_quick=None, optional=True) for pv in _providers()
                 if pv.name != "compiled"]  # fmt: skip
    runnable = runnable_providers(providers, "patch_tokens", "tokens_gpu", cfg)
    rows = []
    shapes = [(B, "contiguous") for B in batches] + [(B, "channels_last") for B in channels_last_batches]
    for B, layout in shapes:
        gen = torch.Generator(device=device).manual_seed(cfg.seed + B)
        x = torch.randint(0, 256, (B, C, size, size), generator=gen, dtype=torch.uint8, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        perm = ppml.random_permutations(B, n, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
        expected = reference.patch_tokens(x, p, perm, MEAN, STD)
        like_tokens = torch.empty(expected.shape, dtype=torch.float32, device=device)
        shape_rows = measure_shape(
            cfg,
            op="patch_tokens",
            tag="tokens_gpu",
            runnable=runnable,
            args=(x, perm, p),
            expected={"default": expected}.__getitem__,
            bound=lambda t=like_tokens: timer(copy_call(t)),
            base_row={
                "section": "patch_tokens_gpu",
                "dtype": "uint8",
                "B": B,
                "C": C,
                "H": size,
                "W": size,
                "patch_size": p,
                "layout": layout,
                "timing": "events, L2 flushed",
            },
            timer=timer,
            on_mismatch="skip",
        )
        _derive(shape_rows, elements=like_tokens.numel())
        for row in shape_rows:
            row["us"] = row["ms"] * 1e3
        rows += shape_rows
        del x, perm, expected, like_tokens
    return rows


GPU_TARGETS: list[Target] = [
    Target(f"{prov} uint8->float32 B={B} {what}{tag}", prov, "uint8", B, metric, minimum, ("cuda",), (("layout", lay),))
    for prov in ("native", "triton")
    for B, lay, tag in ((64, "contiguous", ""), (256, "contiguous", ""), (64, "channels_last", " (channels_last)"))
    for what, metric, minimum in (
        ("speedup vs eager", "speedup_vs_eager", 5.0),
        ("share of bound", "share_of_bound", 0.7),
    )
]

GPU_SECTION = Section(
    name="tokens_gpu",
    run=gpu_rows,
    targets=GPU_TARGETS,
    columns=[("µs", "us", ",.1f", ""), *COLUMNS[:3], ("reps", "reps", "d", ""), ("layout", "layout", "s", "")],
    title=lambda rows: "GPU rows: " + _title(rows),
)

SECTION = Section(name="tokens", run=section_tokens, targets=TARGETS, columns=COLUMNS, title=_title, gpu=GPU_SECTION)
