"""The harness every op's benchmark (``bench_<op>.py``) is written against: providers, checking and timing one shape,
targets, and the section record :mod:`throughput` runs and reports.

A section is a :class:`Section`: ``run(cfg) -> list[row dict]``, its :class:`Target` list, its table columns and title.
A provider (:class:`Provider`) is one way to compute the op; :func:`measure_shape` checks every runnable provider's
output against the reference, then times it, at one (dtype, B). Whether a backend can run here comes from the public
``ppml.backend_info()``. Timing, the copy bound and the environment record live in :mod:`_timing`; the table, the
title and the result files in :mod:`_report`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import CpuContention, synchronize, time_events, time_fn, time_wall

import ppml


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

    @property
    def gpu_reps(self) -> int:
        """Timed repetitions of one GPU row (issue 19: the median of at least 30 event-timed calls)."""
        return 30 if self.quick else 100

    @property
    def gpu_max_s(self) -> float:
        """Time one GPU row may take: a slower call gets fewer repetitions (at least 5; the row's ``reps`` says)."""
        return 1.5 if self.quick else 6.0

    def gpu_timer(self) -> Callable[..., dict]:
        """The GPU rows' timer, ``timer(fn, inner=1, flush_l2=True) -> {"ms", "min_ms", "reps"}``: CUDA events and a
        fixed count of repetitions on CUDA (:func:`_timing.time_events`), wall clock on a CPU
        (:func:`_timing.time_wall`, so the tests run the rows' code without a GPU)."""
        base = time_events if self.device.type == "cuda" else time_wall
        kwargs = {"reps": self.gpu_reps, "warmup": 3, "max_s": self.gpu_max_s}
        if self.device.type == "cuda":
            kwargs["device"] = self.device
        return functools.partial(base, **kwargs)


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
        backend: the ppml backend that must be able to run the op here (``ppml.backend_info()``).
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
        return backend_reason(op, provider.backend, cfg.device.type)
    return None


def backend_reason(op: str, backend: str, device_type: str) -> str | None:
    """Why `backend` cannot run `op` on `device_type` here (None: it can), from the public ``ppml.backend_info``."""
    return ppml.backend_info(op)["ops"][op][backend][device_type]


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


def drop_failed(cfg: Config, runnable: list, prov, exc: Exception, where: str, op: str, tag: str) -> None:
    """Takes the optional provider ``prov``, which raised ``exc`` ``where`` (e.g. "on float32 B=64"), out of
    ``runnable``, with a log line and a note that give the first line of the error."""
    runnable.remove(prov)
    why = f"failed {where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    log(f"[{tag}] skipping {prov.name}: {why}")
    cfg.notes.append(f"skipped {op}/{prov.name} on {cfg.device.type}: {why}")


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
    timer: Callable[[Callable[[], object]], dict] | None = None,
    on_mismatch: str = "raise",
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
        timer: ``timer(fn)`` times a provider (default: :func:`_timing.time_fn` within ``cfg.budget_s``).
        on_mismatch: ``"raise"``, or ``"skip"``: a wrong provider is noted (``WRONG RESULT``) and left untimed, so
            one kernel in progress does not cost the GPU check every other row.

    Raises:
        BenchmarkMismatch: a provider's output differs from the reference (``on_mismatch="raise"``).
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
                drop_failed(cfg, runnable, prov, exc, f"on {dname} B={B}", op, tag)
                continue
            if not prov.check(got, expected(prov.expects)):
                msg = (
                    f"{op}/{prov.name} differs from ppml.reference.{op} ({prov.expects}, compared {prov.check_desc}) "
                    f"for {dname} [{B}, {base_row['C']}, {base_row['H']}, {base_row['W']}] p={base_row['patch_size']}"
                    + (f" g={base_row['grid']}" if "grid" in base_row else "")
                    + f" on {cfg.device}: refusing to time a wrong result"
                )
                if on_mismatch == "raise":
                    raise BenchmarkMismatch(msg)
                log(f"[{tag}] WRONG RESULT: {msg}")
                cfg.notes.append(f"WRONG RESULT: {msg}")
                continue
            del got
        with CpuContention() as contention:
            if prov.run is None and prov.timed is None:
                res = bound()
            elif timer is not None:
                res = timer(prov.timed_fn(*args))
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


# ---- memory ----------------------------------------------------------------------------------------------------------


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


# ---- targets ---------------------------------------------------------------------------------------------------------


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


def gpu_share_targets(metric: str, batches: tuple[int, ...], minimum: float = 0.85) -> list[Target]:
    """float32 GPU targets "``metric`` >= ``minimum``" for the CUDA kernel (provider ``native``) then the Triton one, at
    each of ``batches``; labelled "cuda float32 B=64 share of copy" for ``metric`` share_of_copy."""
    what = metric.replace("_", " ")
    return [
        Target(f"{name} float32 B={B} {what}", provider, "float32", B, metric, minimum, ("cuda",))
        for name, provider in (("cuda", "native"), ("triton", "triton"))
        for B in batches
    ]


# The columns every op section shows: (header, row key, format, suffix).
GB_PER_S_COLUMN = ("GB/s", "gb_per_s", ".1f", "")
IMAGES_PER_S_COLUMN = ("images/s", "images_per_s", ",.0f", "")


def check_targets(targets: list[Target], rows: list[dict], device: torch.device) -> list[str]:
    """One line per target of a section (whose rows are `rows`) that applies to `device`: value, threshold,
    met / NOT met / n/a."""
    lines = []
    for t in targets:
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


# ---- output ----------------------------------------------------------------------------------------------------------


def _contended(row: dict) -> str:
    busy = row.get("other_cpu")
    return " †" if busy is not None and busy > CONTENTION_LIMIT else ""


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


# Above this share of the CPU taken by other processes while a row was timed, the row is marked unreliable.
CONTENTION_LIMIT = 0.10


# ---- sections --------------------------------------------------------------------------------------------------------


DEFAULT_LEAD = [("provider", "provider"), ("dtype", "dtype"), ("B", "B")]


@dataclass
class Section:
    """One table of ``throughput.py``: an op's rows, their targets and how they are shown.

    Attributes:
        name: the ``--sections`` name (``shuffle``) or, for a GPU companion, its key in the results (``shuffle_gpu``).
        run: ``run(cfg)`` gives the rows.
        targets: checked against the rows after the table.
        columns: the table columns after the lead ones and median ms: (header, row key, format, suffix).
        lead: the columns before median ms: (header, row key).
        title: ``title(rows)`` for the table heading (None: ``op [B, C, H, W] p=.. g=..`` from the rows).
        gpu: the section's GPU rows, run after it when the device is CUDA (None: none).
    """

    name: str
    run: Callable[[Config], list[dict]]
    targets: list[Target]
    columns: list[tuple[str, str, str, str]]
    lead: list[tuple[str, str]] = field(default_factory=lambda: list(DEFAULT_LEAD))
    title: Callable[[list[dict]], str] | None = None
    gpu: Section | None = None
