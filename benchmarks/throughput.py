"""ppml's main benchmark: throughput of each op's kernels against the copy bound and what a user would write.

Run from the repository root::

    python benchmarks/throughput.py            # full run, a few minutes
    python benchmarks/throughput.py --quick    # about 1.5 minutes on a 2-core CPU
    python benchmarks/throughput.py --device cpu --sections shuffle --out /tmp/bench

Prints a Markdown table per section (with the device and the versions), then the targets and whether they are met,
and writes the rows plus the environment record to ``benchmarks/results/throughput-<device>-<timestamp>.{csv,json}``.
Every provider's output is checked bit for bit against ``ppml.reference`` before it is timed; a mismatch aborts.

Providers (shuffle): ``copy`` (``out.copy_(x)`` into a preallocated ``out``: the bound), ``clone`` (allocate and
copy: the bound for any op returning a fresh tensor, far below ``copy`` where first-touch page faults are slow),
``loop`` (the paper code: a ``torch.randperm`` and an index per image, keys included in the time), ``vectorised``
(unfold -> ``take_along_dim`` -> fold), ``compiled`` (``torch.compile(ppml.reference.shuffle_patches)``, full runs
only), ``native`` (``torch.ops.ppml.shuffle_patches``, a fresh output per call), ``native_out``
(``torch.ops.ppml.shuffle_patches.out`` into a preallocated ``out=``: the like-for-like comparison with ``copy``) and
``triton`` (GPU only). On CPU, ``copy`` and ``native_out`` (whose ratio is the bandwidth target) are finally timed
again together, round-robin, and those figures are the ones reported (column ``timing``: ``interleaved``).

Providers (mix): ``bound`` (bytes read + written, the input plus the output in the op's output dtype, at the copy
bandwidth of ``out.copy_(x)`` for the same input measured in the same run), ``torch`` (what a user would write: a
reshape and ``mean(dim=(3, 6))``), ``compiled`` (``torch.compile(ppml.reference.mix_subpatches)``, full runs only),
``native`` (``torch.ops.ppml.mix_subpatches``, the mean), ``native_weighted`` (keyed weights from
``ppml.random_mixing_weights``) and ``triton`` (GPU only). On CPU, ``copy`` and ``native_out`` (whose ratio is the bandwidth target) are finally timed
again together, round-robin, and those figures are the ones reported (column ``timing``: ``interleaved``).

A provider whose backend cannot run here is skipped with the reason from ``ppml._dispatch.unavailable_reason``. Rows
timed while other processes took more than 10% of the CPU are marked †.

Providers (anchor): the forward + ``.backward()`` of the anchor loss (metric ``sqeuclidean``, γ = 1, pull = 0.1,
float32 features [B, D] requiring grad, C classes, fixed radius-1 anchors: ``simplex`` where C <= D+1, else ``random``).
``eager`` (what a user writes: ``F.cross_entropy(F.linear(features, γA, b), labels) + pull·½‖f − a_y‖²`` averaged, a
frozen linear layer with a zero bias), ``compiled`` (``torch.compile`` of that function, full runs only), ``native``
(``ppml.anchor_loss(..., backend="native")``: loss and feature gradient in one chunked pass), ``native`` again with
``metric="cosine"`` (compared with the Euclidean ``eager``: there is no eager cosine row) and ``reference``
(``backend="reference"``, autograd through ``ppml.reference``). With equal-norm anchors the two are the same function
(z_c = −(γ/2)‖f − a_c‖² = γ f·a_c − a per-row constant), so each Euclidean provider's loss and gradient are checked
against ``eager``'s (cosine: against ``reference``'s) to 1e-4 relative before it is timed; a mismatch aborts (the
features are N(0, 1/D), norm ≈ the anchors' radius: the expanded ‖f‖² − 2f·a + ‖a‖² form loses float32 precision in
the gradient as ‖f‖ grows, ~2e-4 relative at ‖f‖ ≈ √D with N(0, 1) features, eager's f·a form does not). Peak
extra memory is measured on one warm forward + backward: on CPU the growth of the process's peak RSS (VmHWM reset
through /proc/self/clear_refs, minus VmRSS before), on CUDA ``max_memory_allocated`` minus the memory allocated before.
On CPU the providers of one size are timed round-robin (``_timing.time_cpu_interleaved``): all of them are bound by
the same two GEMMs, and timed one after the other their ratio moved by ±10 % between runs on a shared machine.
In the anchor rows C is the number of classes, not channels.

A section is a function ``(Config) -> list[row dict]`` registered in :data:`SECTIONS` (``shuffle``, ``mix`` and
``anchor``), with its targets in :data:`TARGETS`, its table columns in :data:`COLUMNS` (and :data:`LEAD_COLUMNS`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import (
    CpuContention,
    copy_bound_ms,
    copy_call,
    environment,
    synchronize,
    time_cpu_interleaved,
    time_fn,
)

import ppml
from ppml import reference
from ppml._dispatch import unavailable_reason
from ppml.reference.mix_subpatches import output_dtype as mix_output_dtype

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CSV_FIELDS = [
    "section",
    "provider",
    "dtype",
    "B",
    "C",
    "H",
    "W",
    "patch_size",
    "grid",
    "ms",
    "min_ms",
    "reps",
    "timing",
    "other_cpu",
    "gb_per_s",
    "share_of_copy",
    "share_of_bound",
    "speedup_vs_loop",
    "speedup_vs_vectorised",
    "speedup_vs_compiled",
    "speedup_vs_torch",
    "speedup_vs_eager",
    "metric",
    "D",
    "anchors",
    "scale",
    "pull",
    "peak_extra_mb",
    "peak_vs_eager",
    "check_rel_loss",
    "check_rel_grad",
    "copy_ms",
    "images_per_s",
    "device",
    "device_name",
    "torch",
    "triton",
    "ppml_commit",
    "date",
]


@dataclass
class Config:
    """What every section gets: where to run, how long to spend, and the environment record for the rows."""

    device: torch.device
    quick: bool
    env: dict
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # skipped providers and why, printed under the table

    @property
    def budget_s(self) -> float:
        """Time to spend timing one provider at one shape (the reps adapt to it; at least 5 on CPU, 10 on CUDA)."""
        return 0.15 if self.quick else 1.0

    @property
    def warmup(self) -> int:
        return 1 if self.quick else 3


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout stays the table a user can paste."""
    print(msg, file=sys.stderr, flush=True)


class BenchmarkMismatch(RuntimeError):
    """A provider's output differs from the reference: its timing would be meaningless."""


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (so -0.0 vs 0.0 and NaN payloads count, unlike ``torch.equal`` on floats)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(as_int), b.view(as_int))


def random_images(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Random images drawn on the CPU with a fixed seed, so every device benchmarks (and checks) the same data."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        x = torch.rand(shape, generator=gen, dtype=torch.float32).to(dtype)
    return x.to(device)


def derive(
    rows: list[dict],
    nbytes: int,
    bound: str = "copy",
    baselines: tuple[str, ...] = ("loop", "vectorised", "compiled"),
) -> None:
    """Fills the derived columns of the rows of one shape from their medians and the baselines among them.

    Args:
        rows: the rows of one (dtype, B), one per provider.
        nbytes: bytes read + written by one call (the GB/s column).
        bound: the provider whose time is the bound: ``share_of_<bound>`` = its ms / the row's ms.
        baselines: providers each row gets a ``speedup_vs_<name>`` column for.
    """
    base = {r["provider"]: r["ms"] for r in rows}
    for row in rows:
        ms = row["ms"]
        row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
        row[f"share_of_{bound}"] = base[bound] / ms if bound in base else None
        for name in baselines:
            row[f"speedup_vs_{name}"] = base[name] / ms if name in base else None
        row["images_per_s"] = row["B"] / (ms * 1e-3)


@dataclass
class Provider:
    """One way to compute an op.

    Every callable takes the section's argument tuple ``args``: ``(x, perm, p)`` for shuffle, ``(x, p, g, weights)``
    for mix.

    Attributes:
        name: the row label.
        run: ``run(*args)`` gives the output checked against the reference (None: not checked).
        timed: ``timed(*args)`` gives the zero-argument function that is timed (default: ``run`` with the same
            arguments; ``loop`` differs, drawing its own keys as the paper code does, and ``native_out`` writes into
            the buffer ``run`` was checked in). ``run`` and ``timed`` both None: the bound (``copy`` / ``bound``),
            which the section times with :func:`_timing.copy_bound_ms` (the one definition of the bound).
        backend: the ppml backend whose ``unavailable_reason`` decides whether it runs here.
        gpu_only: skipped on CPU (Triton on CPU exists only under the interpreter, which says nothing about speed).
        skip_quick: why it is left out of ``--quick`` runs, if it is.
        quick_max_batch: the largest batch it is timed at in ``--quick`` runs (None: every batch).
        optional: a failure to run (not a wrong result) skips it with the error instead of aborting, because it
            says something about this machine (no C++ compiler for inductor...) rather than about ppml.
        expects: which reference output it is checked against (the section's key: mix has ``mean`` and ``weighted``).
        check: ``check(got, expected)`` is True when the output is right (default: bit for bit).
        check_desc: how ``check`` compares, for the mismatch message.
    """

    name: str
    run: Callable[..., torch.Tensor] | None
    timed: Callable[..., Callable[[], object]] | None = None
    backend: str | None = None
    gpu_only: bool = False
    skip_quick: str | None = None
    quick_max_batch: int | None = None
    optional: bool = False
    expects: str = "default"
    check: Callable[[torch.Tensor, torch.Tensor], bool] = bit_equal
    check_desc: str = "bit for bit"

    def timed_fn(self, *args) -> Callable[[], object]:
        if self.timed is not None:
            return self.timed(*args)
        return lambda: self.run(*args)


def skip_reason(provider: Provider, op: str, cfg: Config) -> str | None:
    """Why `provider` does not run in this benchmark here, or None."""
    if provider.gpu_only and cfg.device.type != "cuda":
        return f"GPU only (benchmarking on {cfg.device.type})"
    if cfg.quick and provider.skip_quick:
        return provider.skip_quick
    if provider.backend is not None:
        return unavailable_reason(op, provider.backend, cfg.device.type)
    return None


def runnable_providers(providers: list[Provider], op: str, tag: str, cfg: Config) -> list[Provider]:
    """The providers that run here; the others are logged and noted under the table with the reason."""
    runnable = []
    for prov in providers:
        why = skip_reason(prov, op, cfg)
        if why is None:
            runnable.append(prov)
        else:
            log(f"[{tag}] skipping {prov.name}: {why}")
            cfg.notes.append(f"skipped {op}/{prov.name} on {cfg.device.type}: {why}")
    return runnable


def measure_shape(
    cfg: Config,
    *,
    op: str,
    tag: str,
    runnable: list[Provider],
    args: tuple,
    expected: Callable[[str], torch.Tensor],
    bound: Callable[[], dict],
    base_row: dict,
) -> list[dict]:
    """Checks, then times, every runnable provider at one (dtype, B); returns their rows (derived columns not yet
    filled).

    Args:
        cfg: the run's config.
        op: ``shuffle_patches`` or ``mix_subpatches`` (messages and notes).
        tag: the short section name for the progress log.
        runnable: the providers that run here; an optional one that fails is removed from it for the later shapes.
        args: what every provider's ``run`` / ``timed`` takes.
        expected: ``expected(prov.expects)`` gives the reference output a provider is checked against.
        bound: times the bound provider (``run`` and ``timed`` None) and gives its :func:`_timing.time_fn` result
            (extra keys go into its row).
        base_row: the columns every row of this shape shares (section, dtype, B, C, H, W, patch_size...).

    Raises:
        BenchmarkMismatch: a provider's output differs from the reference.
    """
    dname, B = base_row["dtype"], base_row["B"]
    rows = []
    for prov in list(runnable):
        if cfg.quick and prov.quick_max_batch is not None and B > prov.quick_max_batch:
            why = f"--quick times it up to B={prov.quick_max_batch} (the full run includes B={B})"
            log(f"[{tag}] skipping {prov.name} {dname} B={B}: {why}")
            note = f"skipped {op}/{prov.name} at B={B}: {why}"
            if note not in cfg.notes:  # once, not once per dtype
                cfg.notes.append(note)
            continue
        if prov.run is not None:
            try:
                got = prov.run(*args)
                synchronize(cfg.device)
            except Exception as exc:
                if not prov.optional:
                    raise
                runnable.remove(prov)
                why = f"failed on {dname} B={B}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log(f"[{tag}] skipping {prov.name}: {why}")
                cfg.notes.append(f"skipped {op}/{prov.name} on {cfg.device.type}: {why}")
                continue
            if not prov.check(got, expected(prov.expects)):
                raise BenchmarkMismatch(
                    f"{op}/{prov.name} differs from ppml.reference.{op} ({prov.expects}, compared {prov.check_desc}) "
                    f"for {dname} [{B}, {base_row['C']}, {base_row['H']}, {base_row['W']}] p={base_row['patch_size']}"
                    + (f" g={base_row['grid']}" if "grid" in base_row else "")
                    + f" on {cfg.device}: refusing to time a wrong result"
                )
            del got
        with CpuContention() as contention:
            if prov.run is None and prov.timed is None:
                res = bound()
            else:
                res = time_fn(prov.timed_fn(*args), cfg.device, budget_s=cfg.budget_s, warmup=cfg.warmup)
        busy = contention.other_share
        log(
            f"[{tag}] {prov.name:<15} {dname:<8} B={B:<4} {res['ms']:10.3f} ms  ({res['reps']} reps"
            + (f", other processes took {busy:.0%} of the CPU)" if busy and busy > 0.02 else ")")
        )
        extra = {k: v for k, v in res.items() if k not in ("ms", "min_ms", "reps")}
        rows.append(
            {
                **base_row,
                "provider": prov.name,
                "ms": res["ms"],
                "min_ms": res["min_ms"],
                "reps": res["reps"],
                "other_cpu": contention.other_share,
                **extra,
            }
        )
    return rows


# ---- section: shuffle_patches -------------------------------------------------------------------------------------


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


def compiled_reference(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile(fn)`` (a ``ppml.reference`` function), one static graph per (dtype, B)."""
    import torch._dynamo

    # Up to 9 (dtype, B) graphs on GPU: above dynamo's default limit of 8 it would fall back to eager silently.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            break
    return torch.compile(fn, dynamic=False)


def lazily_compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``compiled_reference(fn)`` on first call, so a run that skips it never imports inductor."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if compiled is None:
            compiled = compiled_reference(fn)
        return compiled(*args)

    return run


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
            perm = ppml.random_permutations(B, n, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
            expected = reference.shuffle_patches(x, perm, p)
            shape_rows = measure_shape(
                cfg,
                op="shuffle_patches",
                tag="shuffle",
                runnable=runnable,
                args=(x, perm, p),
                expected={"default": expected}.__getitem__,
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
                retime_against_copy(shape_rows, runnable, "native_out", (x, perm, p), cfg)
            derive(shape_rows, nbytes=2 * x.numel() * x.element_size())
            rows += shape_rows
            del x, perm, expected
    return rows


def retime_against_copy(rows: list[dict], runnable: list[Provider], name: str, args: tuple, cfg: Config) -> None:
    """Times ``copy`` and provider ``name`` again, round-robin (``_timing.time_cpu_interleaved``), and puts those
    figures in their rows (``timing``: ``"interleaved"``). Their ratio is the bandwidth target; timed one after the
    other on the shared 2-core VM it moved by more than ±0.15 between runs of the same binary, as the machine's load
    and the L3's contents drifted between the two measurements."""
    by_name = {r["provider"]: r for r in rows}
    prov = next((pv for pv in runnable if pv.name == name), None)
    if prov is None or "copy" not in by_name or name not in by_name:
        return
    x = args[0]
    with CpuContention() as contention:
        res = time_cpu_interleaved(
            {"copy": copy_call(x), name: prov.timed_fn(*args)}, budget_s=cfg.budget_s, warmup=cfg.warmup
        )
    for key, r in res.items():
        by_name[key].update(ms=r["ms"], min_ms=r["min_ms"], reps=r["reps"], other_cpu=contention.other_share,
                            timing="interleaved")  # fmt: skip


# ---- section: mix_subpatches --------------------------------------------------------------------------------------


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
        Provider(
            "native",
            lambda x, p, g, w: torch.ops.ppml.mix_subpatches(x, p, g, None),
            backend="native",
            expects="mean",
            check=mix_exact,
            check_desc=MIX_EXACT,
        ),
        Provider(
            "native_weighted",
            lambda x, p, g, w: torch.ops.ppml.mix_subpatches(x, p, g, w),
            backend="native",
            expects="weighted",
            check=mix_exact,
            check_desc=MIX_EXACT,
        ),
        Provider(
            "triton",
            lambda x, p, g, w: torch.ops.ppml.mix_subpatches_triton(x, p, g, None),
            backend="triton",
            gpu_only=True,
            expects="mean",
            check=mix_exact,
            check_desc=MIX_EXACT,
        ),
    ]


def mix_bound_ms(x: torch.Tensor, nbytes: int, cfg: Config) -> dict:
    """The bound of an op that reads ``x`` once and writes ``nbytes - x.nbytes`` bytes: ``nbytes`` at the bandwidth
    of ``out.copy_(x)`` measured now (:func:`_timing.copy_bound_ms`, which moves ``2 * x.nbytes`` bytes).

    Returns:
        The copy's :func:`_timing.time_fn` result scaled to ``nbytes``, plus ``copy_ms`` (the copy's own median).
    """
    copy = copy_bound_ms(x, budget_s=cfg.budget_s, warmup=cfg.warmup)
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
    device = cfg.device
    C, H, W, p, g = 3, 224, 224, 16, 2
    n = (H // p) * (W // p)
    dtypes = [torch.uint8, torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    runnable = runnable_providers(_mix_providers(), "mix_subpatches", "mix", cfg)
    rows = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for B in (1, 64, 256):
            x = random_images((B, C, H, W), dtype, device, seed=cfg.seed + B)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            weights = ppml.random_mixing_weights(B, n, g, generator=gen).to(device)
            # Bytes read + written: the images once, the output (a quarter of the pixels, float32 for uint8) once.
            # The weights (N·g² floats per image, 0.5% of a float32 image) are left out, as for native_weighted.
            nbytes = x.numel() * x.element_size() + x.numel() // (g * g) * mix_output_dtype(dtype).itemsize
            shape_rows = measure_shape(
                cfg,
                op="mix_subpatches",
                tag="mix",
                runnable=runnable,
                args=(x, p, g, weights),
                expected=mix_expected(x, p, g, weights),
                bound=functools.partial(mix_bound_ms, x, nbytes, cfg),
                base_row={
                    "section": "mix_subpatches",
                    "dtype": dname,
                    "B": B,
                    "C": C,
                    "H": H,
                    "W": W,
                    "patch_size": p,
                    "grid": g,
                },
            )
            derive(shape_rows, nbytes=nbytes, bound="bound", baselines=("torch",))
            rows += shape_rows
            del x, weights
    return rows


# ---- section: anchor_loss -----------------------------------------------------------------------------------------

# (B, D, C): a small head, ImageNet-1k on a ViT-B feature, a big batch of wide features, and a 100k-class head where the
# B×C logits (205 MB in float32) dwarf everything else.
ANCHOR_SIZES = ((256, 512, 10), (256, 768, 1000), (1024, 2048, 1000), (512, 512, 100_000))
ANCHOR_SCALE, ANCHOR_PULL = 1.0, 0.1
# Relative tolerance of the loss (|Δ| / |loss|) and of the gradient (max |Δ| / max |grad|) against the check's oracle.
ANCHOR_RTOL = 1e-4
# A forward + backward slower than this is timed after one warm-up and at least ANCHOR_SLOW_REPS repetitions: the
# budget would give fewer anyway, and a second warm-up of a multi-second call teaches nothing.
ANCHOR_SLOW_S, ANCHOR_SLOW_REPS = 1.0, 3


def anchor_eager(features, anchors, weight, bias, labels, pull: float = ANCHOR_PULL) -> torch.Tensor:
    """What a user writes: cross-entropy through a frozen linear layer whose weight is γA and whose bias is zero, plus
    the pull ½‖f − a_y‖², both averaged over the batch. With equal-norm anchors it equals ``ppml.anchor_loss`` with
    ``metric="sqeuclidean"``: −(γ/2)‖f − a_c‖² = γ f·a_c − (γ/2)(‖f‖² + r²), and a per-row constant leaves the softmax
    unchanged."""
    logits = F.linear(features, weight, bias)  # features @ (γA).T + b
    return F.cross_entropy(logits, labels) + pull * 0.5 * (features - anchors[labels]).square().sum(1).mean()


def anchor_ppml(metric: str, backend: str) -> Callable[..., torch.Tensor]:
    def loss(features, anchors, weight, bias, labels):
        return ppml.anchor_loss(
            features, anchors, labels, metric=metric, scale=ANCHOR_SCALE, pull=ANCHOR_PULL, backend=backend
        )

    return loss


@dataclass
class AnchorProvider(Provider):
    """An anchor-loss provider: ``run(features, anchors, weight, bias, labels)`` gives the scalar loss (its forward
    and ``.backward()`` are timed together).

    Attributes:
        metric: the row's metric.
        quick_max_classes: the largest C it runs at in ``--quick`` runs (None: every size).
        prime: one untimed call at every size before it is measured (``compiled``: the graph is built per shape).
    """

    metric: str = "sqeuclidean"
    quick_max_classes: int | None = None
    prime: bool = False


def _anchor_providers() -> list[AnchorProvider]:
    slow = 1000  # --quick leaves C = 100,000 to `eager` and `native`: the others take seconds per call there
    return [
        AnchorProvider("eager", anchor_eager),
        AnchorProvider(
            "compiled",
            lazily_compiled(anchor_eager),
            skip_quick="torch.compile takes seconds per shape (--quick skips it; the full run includes it)",
            optional=True,
            prime=True,
        ),
        AnchorProvider("native", anchor_ppml("sqeuclidean", "native"), backend="native"),
        AnchorProvider(
            "native", anchor_ppml("cosine", "native"), backend="native", metric="cosine", quick_max_classes=slow
        ),
        AnchorProvider(
            "reference", anchor_ppml("sqeuclidean", "reference"), backend="reference", quick_max_classes=slow
        ),
    ]


def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _malloc_trim() -> bool:
    """Returns the free heap memory malloc holds to the system (glibc); False where there is no malloc_trim."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> tuple[float | None, object]:
    """Runs ``fn()`` once and returns (the peak memory it added, in MB of 10^6 bytes, and its result).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before (the caching allocator's view: what the tensors
    of the call needed at once). CPU: the process's peak RSS during the call minus its RSS before — the high-water mark
    is reset by writing 5 to /proc/self/clear_refs. Free memory malloc holds from earlier calls (blocks under its mmap
    threshold, up to 32 MB, stay in the heap) is handed back first with glibc's ``malloc_trim(0)``, so a call that
    reuses it still counts it; without glibc such reuse goes uncounted. None where the memory cannot be read (no
    /proc, clear_refs not writable).
    """
    import gc

    gc.collect()
    if device.type == "cpu":
        _malloc_trim()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 1e6, result
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kb("VmRSS")
    except OSError:
        return None, fn()
    result = fn()
    try:
        return (_proc_status_kb("VmHWM") - before) * 1024 / 1e6, result
    except OSError:
        return None, result


def _anchor_data(B: int, D: int, C: int, device: torch.device, seed: int):
    """Features ~ N(0, 1/D) (norm ≈ 1, the anchors' radius; leaf tensor requiring grad), labels, radius-1 anchors
    (``simplex`` where C <= D+1, else ``random``), the frozen layer's weight γA and zero bias. Drawn on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    kind = "simplex" if C <= D + 1 else "random"
    anchors = ppml.make_anchors(C, D, kind, 1.0, generator=gen)
    features = (torch.randn(B, D, generator=gen) / D**0.5).to(device).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(device)
    anchors = anchors.to(device)
    return kind, (features, anchors, (ANCHOR_SCALE * anchors).contiguous(), torch.zeros(C, device=device), labels)


def _fwd_bwd(loss_fn: Callable[..., torch.Tensor], args: tuple) -> Callable[[], torch.Tensor]:
    """The timed call: a fresh gradient, the forward, ``.backward()``; returns the (detached) loss."""
    features = args[0]

    def call() -> torch.Tensor:
        features.grad = None
        loss = loss_fn(*args)
        loss.backward()
        return loss.detach()

    return call


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (for a scalar, the relative error), in float64."""
    got, want = got.detach().double(), want.detach().double()
    return (got - want).abs().max().item() / max(want.abs().max().item(), torch.finfo(torch.float64).tiny)


def section_anchor(cfg: Config) -> list[dict]:
    """Anchor losses, ``ppml::anchor_loss``: forward + backward at every (B, D, C) of :data:`ANCHOR_SIZES`, float32."""
    device = cfg.device
    op, tag = "anchor_loss", "anchor"
    runnable = runnable_providers(_anchor_providers(), op, tag, cfg)
    # Lazy initialisation (thread pools, dispatch caches) on a tiny shape, so the first measured call is a warm one.
    _, tiny = _anchor_data(4, 8, 3, device, cfg.seed)
    for prov in runnable:
        if not prov.prime:
            _fwd_bwd(prov.run, tiny)()
    del tiny
    rows = []
    for B, D, C in ANCHOR_SIZES:
        t_data = time.perf_counter()
        kind, args = _anchor_data(B, D, C, device, cfg.seed + B + D + C)
        features = args[0]
        log(f"[{tag}] B={B} D={D} C={C}: {kind} anchors and data in {time.perf_counter() - t_data:.1f} s")
        oracle: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # metric -> (loss, grad) it is checked against
        shape_rows = []
        checked = []  # (provider, call, first call s, peak MB, loss error, gradient error), timed together below
        for prov in list(runnable):
            if cfg.quick and prov.quick_max_classes is not None and C > prov.quick_max_classes:
                why = f"--quick runs it up to C={prov.quick_max_classes} (the full run includes C={C})"
                log(f"[{tag}] skipping {prov.name} {prov.metric} C={C}: {why}")
                cfg.notes.append(f"skipped {op}/{prov.name} ({prov.metric}) at C={C}: {why}")
                continue
            call = _fwd_bwd(prov.run, args)
            t0 = time.perf_counter()
            try:
                if prov.prime:
                    call()
                    t0 = time.perf_counter()
                # One warm call: its peak memory, its loss and gradient for the check, its time to size the timing.
                peak, loss = peak_extra_mb(call, device)
                synchronize(device)
            except Exception as exc:
                if not prov.optional:
                    raise
                runnable.remove(prov)
                why = f"failed at B={B} D={D} C={C}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log(f"[{tag}] skipping {prov.name}: {why}")
                cfg.notes.append(f"skipped {op}/{prov.name} on {device.type}: {why}")
                continue
            first_s = time.perf_counter() - t0
            grad = features.grad.detach().clone()
            if prov.metric not in oracle:
                # The first provider of a metric is the oracle of the others: eager for sqeuclidean; for cosine, the
                # reference backend (autograd through ppml.reference), run once here, untimed.
                if prov.metric == "sqeuclidean":
                    oracle[prov.metric] = (loss, grad)
                else:
                    ref_loss = _fwd_bwd(anchor_ppml(prov.metric, "reference"), args)()
                    oracle[prov.metric] = (ref_loss, features.grad.detach().clone())
            want_loss, want_grad = oracle[prov.metric]
            rel_loss, rel_grad = _rel(loss, want_loss), _rel(grad, want_grad)
            if not (rel_loss <= ANCHOR_RTOL and rel_grad <= ANCHOR_RTOL):
                against = "eager" if prov.metric == "sqeuclidean" else "reference"
                raise BenchmarkMismatch(
                    f"{op}/{prov.name} ({prov.metric}) differs from {against} at B={B} D={D} C={C} on {device}: "
                    f"loss {loss.item():.6g} vs {want_loss.item():.6g} (relative {rel_loss:.1e}), gradient max "
                    f"|Δ| / max |grad| = {rel_grad:.1e} (tolerance {ANCHOR_RTOL:g}): refusing to time a wrong result"
                )
            del loss, grad
            checked.append((prov, call, first_s, peak, rel_loss, rel_grad))
        if not checked:
            continue
        # Timed together: the providers run round-robin on CPU (_timing.time_cpu_interleaved), so that the machine's
        # drift does not decide a comparison between calls bound by the same two GEMMs.
        slow = max(first_s for _, _, first_s, *_ in checked) > ANCHOR_SLOW_S
        timing = {"warmup": 1, "min_reps": ANCHOR_SLOW_REPS} if slow else {"warmup": cfg.warmup}
        with CpuContention() as contention:
            if device.type == "cpu":
                results = time_cpu_interleaved(
                    {i: call for i, (_, call, *_) in enumerate(checked)}, budget_s=cfg.budget_s, **timing
                )
            else:
                results = {
                    i: time_fn(call, device, budget_s=cfg.budget_s, **timing) for i, (_, call, *_) in enumerate(checked)
                }
        busy = contention.other_share
        for i, (prov, _, _, peak, rel_loss, rel_grad) in enumerate(checked):
            res = results[i]
            log(
                f"[{tag}] {prov.name:<10} {prov.metric:<12} B={B:<5} D={D:<5} C={C:<6} {res['ms']:10.3f} ms  "
                f"({res['reps']} reps"
                + (f", other processes took {busy:.0%} of the CPU)" if busy and busy > 0.02 else ")")
                + ("" if peak is None else f"  peak +{peak:.1f} MB")
            )
            shape_rows.append(
                {
                    "section": op,
                    "provider": prov.name,
                    "metric": prov.metric,
                    "dtype": "float32",
                    "B": B,
                    "D": D,
                    "C": C,
                    "anchors": kind,
                    "scale": ANCHOR_SCALE,
                    "pull": ANCHOR_PULL,
                    "ms": res["ms"],
                    "min_ms": res["min_ms"],
                    "reps": res["reps"],
                    "other_cpu": busy,
                    "peak_extra_mb": peak,
                    "check_rel_loss": rel_loss,
                    "check_rel_grad": rel_grad,
                }
            )
        eager = next((r for r in shape_rows if r["provider"] == "eager"), None)
        for row in shape_rows:
            row["speedup_vs_eager"] = eager["ms"] / row["ms"] if eager else None
            e_peak, peak = (eager or {}).get("peak_extra_mb"), row["peak_extra_mb"]
            row["peak_vs_eager"] = peak / e_peak if peak is not None and e_peak else None
        rows += shape_rows
        del args, features, oracle
    worst: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        w = worst.setdefault((r["provider"], r["metric"]), [0.0, 0.0])
        w[0], w[1] = max(w[0], r["check_rel_loss"]), max(w[1], r["check_rel_grad"])
    checks = ", ".join(
        f"{name} {metric} vs {'eager' if metric == 'sqeuclidean' else 'reference'} {lo:.1e} / {gr:.1e}"
        for (name, metric), (lo, gr) in worst.items()
        if name != "eager"
    )
    cfg.notes.append(
        f"checked before timing (largest relative error of the loss / of the gradient, tolerance {ANCHOR_RTOL:g}): "
        f"{checks}"
    )
    cfg.notes.append(
        "cosine rows: `vs eager` compares with the Euclidean eager loss (the same work of one [B, D]×[D, C] product "
        "each way; there is no eager cosine provider). Peak extra MB: "
        + (
            "max_memory_allocated during one warm call minus memory_allocated before."
            if device.type == "cuda"
            else "peak RSS growth during one warm call (VmHWM after − VmRSS before), after malloc_trim(0) hands "
            "back the free heap memory earlier calls left" + ("." if _libc() is not None else " (no glibc here: "
            "memory malloc kept from earlier calls is reused uncounted, so small sizes read low).")
        )
    )
    return rows


# ---- targets ------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A goal for one row: ``metric`` (a row column) of ``provider`` at (dtype, B) and the ``where`` columns must be at
    least ``minimum`` (when not None) and at most ``maximum`` (when not None)."""

    label: str
    provider: str
    dtype: str
    B: int
    metric: str
    minimum: float | None
    devices: tuple[str, ...] = ("cpu", "cuda")
    where: tuple[tuple[str, object], ...] = ()
    maximum: float | None = None

    def matches(self, row: dict, provider: str | None = None) -> bool:
        """Whether `row` is this target's row (or, with `provider`, that provider's row at the same shape)."""
        key = (provider or self.provider, self.dtype, self.B)
        return (row["provider"], row["dtype"], row["B"]) == key and all(row.get(k) == v for k, v in self.where)

    def bound(self) -> str:
        parts = ([f">= {self.minimum:g}"] if self.minimum is not None else []) + (
            [f"<= {self.maximum:g}"] if self.maximum is not None else []
        )
        return "target " + " and ".join(parts)

    def met(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)


def _anchor_targets() -> list[Target]:
    """Native sqeuclidean forward + backward no slower than eager at every size (speedup >= 1, i.e. time <= 1.0x
    eager's), and at C = 100,000 at most half of eager's peak extra memory."""
    targets = []
    for B, D, C in ANCHOR_SIZES:
        where = (("D", D), ("C", C), ("metric", "sqeuclidean"))
        targets.append(
            Target(f"native fwd+bwd B={B} D={D} C={C} speedup vs eager", "native", "float32", B, "speedup_vs_eager",
                   1.0, where=where)
        )
    B, D, C = ANCHOR_SIZES[-1]
    targets.append(
        Target(f"native peak extra memory B={B} D={D} C={C} vs eager", "native", "float32", B, "peak_vs_eager", None,
               where=(("D", D), ("C", C), ("metric", "sqeuclidean")), maximum=0.5)
    )
    return targets


TARGETS: dict[str, list[Target]] = {
    # Each CPU target twice: `native` returns a fresh tensor (first-touch page faults on every call where large
    # allocations come straight from mmap), `native_out` writes into a preallocated one, like `copy` does.
    "shuffle": [
        Target("native (fresh output) float32 B=64 share of copy", "native", "float32", 64, "share_of_copy", 0.9),
        Target(
            "native_out (preallocated) float32 B=64 share of copy", "native_out", "float32", 64, "share_of_copy", 0.9
        ),
        Target("native (fresh output) uint8 B=64 share of copy", "native", "uint8", 64, "share_of_copy", 0.8),
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
        Target("cuda float32 B=64 share of copy", "native", "float32", 64, "share_of_copy", 0.85, ("cuda",)),
        Target("cuda float32 B=256 share of copy", "native", "float32", 256, "share_of_copy", 0.85, ("cuda",)),
        Target("triton float32 B=64 share of copy", "triton", "float32", 64, "share_of_copy", 0.85, ("cuda",)),
        Target("triton float32 B=256 share of copy", "triton", "float32", 256, "share_of_copy", 0.85, ("cuda",)),
    ],
    "mix": [
        Target("native float32 B=64 share of bound", "native", "float32", 64, "share_of_bound", 0.9, ("cpu",)),
        Target("cuda float32 B=64 share of bound", "native", "float32", 64, "share_of_bound", 0.85, ("cuda",)),
        Target("triton float32 B=64 share of bound", "triton", "float32", 64, "share_of_bound", 0.85, ("cuda",)),
    ],
    "anchor": _anchor_targets(),
}

SECTIONS: dict[str, Callable[[Config], list[dict]]] = {
    "shuffle": section_shuffle,
    "mix": section_mix,
    "anchor": section_anchor,
}


def check_targets(name: str, rows: list[dict], device: torch.device) -> list[str]:
    """One line per target of section `name` (whose rows are `rows`) that applies to `device`: value, threshold,
    met / NOT met / n/a."""
    lines = []
    for t in TARGETS.get(name, []):
        if device.type not in t.devices:
            continue
        hit = [r for r in rows if t.matches(r)]
        value = hit[0].get(t.metric) if hit else None
        if value is None:
            lines.append(f"- {t.label}: n/a (not measured here) ({t.bound()})")
            continue
        verdict = "met" if t.met(value) else "NOT met"
        # A ratio is as unreliable as either of its rows: the provider's and the baseline's at the same shape.
        baseline = t.metric.removeprefix("share_of_").split("_vs_")[-1]
        pair = hit + [r for r in rows if t.matches(r, provider=baseline)]
        mark = " †" if any(_contended(r) for r in pair) else ""
        lines.append(f"- {t.label}: {value:.2f} ({t.bound()}) {verdict}{mark}")
    return lines


# ---- output -------------------------------------------------------------------------------------------------------


def _contended(row: dict) -> str:
    busy = row.get("other_cpu")
    return " †" if busy is not None and busy > CONTENTION_LIMIT else ""


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


# Above this share of the CPU taken by other processes while a row was timed, the row is marked unreliable.
CONTENTION_LIMIT = 0.10


# The table columns after provider | dtype | B | median ms, per section: (header, row key, format, suffix).
COLUMNS: dict[str, list[tuple[str, str, str, str]]] = {
    "shuffle_patches": [
        ("GB/s", "gb_per_s", ".1f", ""),
        ("share of copy", "share_of_copy", ".2f", ""),
        ("vs loop", "speedup_vs_loop", ".1f", "×"),
        ("vs vectorised", "speedup_vs_vectorised", ".2f", "×"),
        ("vs compiled", "speedup_vs_compiled", ".2f", "×"),
        ("images/s", "images_per_s", ",.0f", ""),
    ],
    "mix_subpatches": [
        ("GB/s", "gb_per_s", ".1f", ""),
        ("share of bound", "share_of_bound", ".2f", ""),
        ("vs torch", "speedup_vs_torch", ".2f", "×"),
        ("images/s", "images_per_s", ",.0f", ""),
    ],
    "anchor_loss": [
        ("peak extra MB", "peak_extra_mb", ".1f", ""),
        ("vs eager", "speedup_vs_eager", ".2f", "×"),
    ],
}

# The columns before median ms, per section (default: provider | dtype | B): (header, row key).
LEAD_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "anchor_loss": [("provider", "provider"), ("metric", "metric"), ("B", "B"), ("D", "D"), ("C", "C")],
}
_DEFAULT_LEAD = [("provider", "provider"), ("dtype", "dtype"), ("B", "B")]


def markdown_table(rows: list[dict]) -> str:
    extra = COLUMNS[rows[0]["section"]] if rows else []
    lead = LEAD_COLUMNS.get(rows[0]["section"], _DEFAULT_LEAD) if rows else _DEFAULT_LEAD
    cols = [c[0] for c in lead] + ["median ms"] + [c[0] for c in extra]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        cells = [str(r[key]) for _, key in lead] + [_fmt(r["ms"], ".3f") + _contended(r)]
        cells += [_fmt(r.get(key), spec, suffix) for _, key, spec, suffix in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_title(rows: list[dict]) -> str:
    """``shuffle_patches [B, 3, 224, 224] p=16`` (``... g=2`` for mix), from the rows themselves so a new section
    needs no title table."""
    if not rows:
        return "(no rows)"
    r = rows[0]
    if r["section"] == "anchor_loss":
        return (
            f"anchor_loss forward + backward, {r['dtype']} features [B, D] (requires grad), C classes, "
            f"γ={r['scale']:g}, pull={r['pull']:g}, radius-1 anchors (simplex where C <= D+1, else random)"
        )
    title = f"{r['section']} [B, {r['C']}, {r['H']}, {r['W']}] p={r['patch_size']}"
    if r.get("grid") is not None:
        title += f" g={r['grid']}"
        title += f" -> [B, {r['C']}, {r['H'] // r['grid']}, {r['W'] // r['grid']}]"
    return title


def env_line(env: dict) -> str:
    parts = [
        f"{env['device']}: {env['device_name']}",
        f"{env['cores']} cores, {env['torch_threads']} torch threads",
        f"torch {env['torch']}",
        f"triton {env['triton'] or '—'}",
        f"python {env['python']}",
        f"numpy {env['numpy'] or '—'}",
        f"ppml {env['ppml_commit'] or env['ppml'] or '—'}",
        env["date"],
    ]
    return " · ".join(parts)


def write_results(out_dir: Path, env: dict, rows: list[dict], targets: dict[str, list[str]], args: dict) -> list[Path]:
    """Writes ``throughput-<device>-<timestamp>.{csv,json}``; every CSV row repeats the device and versions so a
    row pasted elsewhere still says where it was measured."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out_dir / f"throughput-{env['device']}-{stamp}"
    csv_path, json_path = base.with_suffix(".csv"), base.with_suffix(".json")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        env_cols = {k: env.get(k) for k in ("device", "device_name", "torch", "triton", "ppml_commit", "date")}
        for r in rows:
            writer.writerow({**env_cols, **r})
    with open(json_path, "w") as f:
        json.dump({"environment": env, "args": args, "rows": rows, "targets": targets}, f, indent=2)
    return [csv_path, json_path]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions and providers: ~1.5 minutes on a 2-core CPU"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from: {', '.join(SECTIONS)} (default: all)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"results folder (default: {RESULTS_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and keys")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        parser.error(f"--sections: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(SECTIONS)}")
    args.sections = names
    return args


def _huge_page_hint(device: torch.device) -> str | None:
    """Fresh multi-MB CPU outputs pay a page fault per 4 KiB page on first touch (slow in VMs); with transparent huge
    pages in `madvise` mode, PyTorch's own THP_MEM_ALLOC_ENABLE=1 asks for 2 MiB pages. Say so rather than set it."""
    if device.type != "cpu" or os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return None
    if "[madvise]" not in mode:
        return None
    return (
        "note: transparent huge pages are in madvise mode and THP_MEM_ALLOC_ENABLE is unset, so ops returning a fresh "
        "tensor of many MB (`native`, `clone`) pay 4 KiB page faults; `native_out` reuses a buffer. "
        "THP_MEM_ALLOC_ENABLE=1 (a PyTorch setting) makes such allocations use 2 MiB pages."
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("throughput: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    env = environment(device)
    cfg = Config(device=device, quick=args.quick, env=env, seed=args.seed)
    t0 = time.perf_counter()
    all_rows: list[dict] = []
    targets: dict[str, list[str]] = {}
    print(f"# ppml throughput{' (--quick)' if args.quick else ''}")
    print(env_line(env))
    hint = _huge_page_hint(device)
    if hint:
        print(hint)
    for name in args.sections:
        try:
            rows = SECTIONS[name](cfg)
        except BenchmarkMismatch as exc:
            print(f"\nMISMATCH — aborting: {exc}", file=sys.stderr)
            return 1
        print(f"\n## {section_title(rows)} on {env['device_name']}\n")
        print(markdown_table(rows))
        if any(_contended(r) for r in rows):
            print(
                f"\n† other processes took more than {CONTENTION_LIMIT:.0%} of the CPU while this row was timed: "
                "rerun on a quiet machine before trusting it"
            )
        if cfg.notes:
            print("\n" + "\n".join(cfg.notes))
            cfg.notes.clear()
        targets[name] = check_targets(name, rows, device)
        if targets[name]:
            print(f"\ntargets ({name}):")
            print("\n".join(targets[name]))
        all_rows += rows
    arg_record = {"device": str(device), "quick": args.quick, "sections": args.sections, "seed": args.seed}
    paths = write_results(args.out, env, all_rows, targets, arg_record)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
