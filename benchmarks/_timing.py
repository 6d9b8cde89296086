"""Timing helpers shared by the ppml benchmarks: one way to time, one environment record, one copy bound.

CPU: warm-up, then the median of wall-clock repetitions (``time.perf_counter``), as many as fit a time budget but never
fewer than ``min_reps``. CUDA: CUDA events around each call with the L2 cache flushed between repetitions (a 256 MiB
buffer is written), median of the repetitions, the same method as ``triton.testing.do_bench``; the GPU rows use
:func:`time_events` instead, a fixed count of repetitions (:func:`time_wall` is its CPU twin, for tests). Every result
is in milliseconds. Numbers from different machines (or different processes, for the copy bound) are never compared.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Bigger than the L2 of any current GPU (H100: 50 MiB, H200: 60 MiB, B200: 126 MiB) so a write evicts it all.
_L2_FLUSH_BYTES = 256 * 1024 * 1024
_flush_buffer: dict[torch.device, torch.Tensor] = {}


def synchronize(device: torch.device | str) -> None:
    """Waits for the work queued on `device` (a no-op on CPU, where every op is synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(
    fn: Callable[[], object], *, budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 1000, warmup: int = 2
) -> dict:
    """Median wall-clock time of ``fn()`` on the CPU.

    Args:
        fn: the work to time, called with no arguments; its result is dropped.
        budget_s: rough time to spend on the timed repetitions (the warm-up is extra).
        min_reps: the fewest timed repetitions, whatever the budget: a median of fewer is noise.
        max_reps: the most timed repetitions (small kernels would otherwise run thousands of times).
        warmup: untimed calls first, so lazy init and one-off allocator growth are not timed (an op that returns a
            fresh tensor large enough to come from mmap still pays its page faults on every call, as it would in use).

    Returns:
        ``{"ms": median, "min_ms": fastest, "reps": timed repetitions}``.
    """
    est = []
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        est.append(time.perf_counter() - t0)
    # The fastest warm-up call is the best estimate of the steady state (the first one pays the lazy init).
    per_call = max(min(est), 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / per_call)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "reps": reps}


def time_cuda(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cuda",
    budget_s: float = 1.0,
    min_reps: int = 10,
    max_reps: int = 1000,
    warmup: int = 3,
    flush_l2: bool = True,
) -> dict:
    """Median device time of ``fn()`` from CUDA events, with a cold L2 before each repetition.

    Args:
        fn: enqueues the work on the current stream; called with no arguments.
        device: the CUDA device the work runs on.
        budget_s: rough time to spend on the timed repetitions (the flush time counts too).
        min_reps: the fewest timed repetitions.
        max_reps: the most timed repetitions.
        warmup: untimed calls first (Triton compiles on the first call; the caching allocator grows).
        flush_l2: write a 256 MiB buffer before each repetition, so a batch that fits in L2 is not read from a warm
            cache the real pipeline would not have.

    Returns:
        ``{"ms": median, "min_ms": fastest, "reps": timed repetitions}``.
    """
    device, cache = _cuda_device_and_flush(device, flush_l2)
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize(device)
    # Estimate from a few flushed, event-timed calls so the budget accounts for the flush as well.
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    for _ in range(3):
        if cache is not None:
            cache.zero_()
        fn()
    probe_end.record()
    torch.cuda.synchronize(device)
    per_call_s = max(probe_start.elapsed_time(probe_end) / 3 / 1e3, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / per_call_s)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def time_fn(fn: Callable[[], object], device: torch.device | str, **kwargs) -> dict:
    """:func:`time_cuda` for a CUDA device, else :func:`time_cpu`; keyword arguments are passed on."""
    device = torch.device(device)
    if device.type == "cuda":
        return time_cuda(fn, device=device, **kwargs)
    if device.type != "cpu":
        raise ValueError(f"time_fn: no timer for device type {device.type!r}")
    return time_cpu(fn, **kwargs)


def time_cpu_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    budget_s: float = 1.0,
    min_reps: int = 5,
    max_reps: int = 1000,
    warmup: int = 2,
) -> dict[str, dict]:
    """:func:`time_cpu` for several calls that are to be compared, timed round-robin: each round runs every call once,
    in an order rotated from round to round, so that drift on a shared machine (other processes, clock changes, a
    neighbour's memory traffic) falls on all of them alike and their ratio is fair. Timed one after the other instead,
    two calls doing the same work (both bound by the same GEMMs, say) can differ by ±10 % from run to run here.

    Args:
        calls: name -> the work to time; each call's result is dropped.
        budget_s: rough time per call for its timed repetitions (so about ``len(calls) * budget_s`` in all).
        min_reps, max_reps, warmup: as in :func:`time_cpu`, per call; every call gets the same number of rounds.

    Returns:
        name -> ``{"ms": median, "min_ms": fastest, "reps": timed repetitions}``.
    """
    names = list(calls)
    per_call = {}
    for name in names:
        est = []
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            calls[name]()
            est.append(time.perf_counter() - t0)
        per_call[name] = max(min(est), 1e-7)
    # The slowest call sets the rounds: budget_s of it, at least min_reps.
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_call.values()))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "reps": len(t)} for name, t in times.items()
    }


def copy_bound_ms(x: torch.Tensor, **kwargs) -> dict:
    """The memory-bandwidth bound of an op that reads ``x`` once and writes a tensor like it once.

    Times ``out.copy_(x)`` into a preallocated ``out`` in this process (same allocator, same thread count, same
    clocks as the rows it is compared with). Keyword arguments are passed on to :func:`time_fn`.

    Args:
        x (Tensor[...]): the input of the op being bounded, on its device.

    Returns:
        The :func:`time_fn` result for the copy.
    """
    return time_fn(copy_call(x), x.device, **kwargs)


def copy_call(x: torch.Tensor) -> Callable[[], object]:
    """The work :func:`copy_bound_ms` times: ``out.copy_(x)`` into an ``out`` allocated once, here."""
    out = torch.empty_like(x)
    return lambda: out.copy_(x)


def _proc_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from /proc; None where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            # The command name may contain spaces, so the fields are counted after its closing parenthesis.
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal: steal counts as busy, the hypervisor gave the core away.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy, int(own[11]) + int(own[12])  # utime + stime of all this process's threads


_MIN_OTHER_TICKS = 3


class CpuContention:
    """How much of the machine's CPU time other processes (or the hypervisor) took while a block ran.

    A benchmark on a shared or virtual machine is only as good as its quietest moment: OpenMP kernels in particular
    wait a whole scheduler tick for a preempted thread. Use as ``with CpuContention() as c: ...`` and read
    ``c.other_share`` (0 = nobody else ran, 1 = others had every core the whole time; None where /proc is missing).
    Resolution is one clock tick (10 ms): fewer than 3 ticks taken by others read as 0, so contention during a block
    of a few milliseconds goes unseen, and a short block's share is coarse.
    """

    other_share: float | None = None

    def __enter__(self) -> CpuContention:
        self._t0 = time.monotonic()
        self._ticks0 = _proc_ticks()
        return self

    def __exit__(self, *exc) -> None:
        ticks1 = _proc_ticks()
        elapsed = time.monotonic() - self._t0
        if self._ticks0 is None or ticks1 is None or elapsed <= 0:
            return
        other = (ticks1[0] - self._ticks0[0]) - (ticks1[1] - self._ticks0[1])
        # Ticks are sampled, so one or two stray ones say nothing about a block of a few milliseconds.
        if other < _MIN_OTHER_TICKS:
            self.other_share = 0.0
            return
        capacity = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        self.other_share = min(1.0, other / capacity)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The ppml commit benchmarked, with ``-dirty`` when the working tree has changes (None outside a checkout)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


def environment(device: torch.device | str) -> dict:
    """What a result row needs to be interpreted: the machine, the versions, the commit, the date.

    Args:
        device: the device the benchmark runs on.

    Returns:
        A JSON-serialisable dict (``device_name`` is the GPU name on CUDA, the CPU model on CPU).
    """
    device = torch.device(device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    env = {
        "device": device.type,
        "device_name": None,
        "cpu": _cpu_model(),
        "cores": affinity,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "ppml": _version("ppml"),
        "ppml_commit": _git_commit(),
        "cuda": torch.version.cuda,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        env["device_name"] = torch.cuda.get_device_name(index)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sms"] = props.multi_processor_count
    else:
        env["device_name"] = env["cpu"]
    return env


def time_events(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cuda",
    reps: int = 30,
    warmup: int = 3,
    inner: int = 1,
    flush_l2: bool = True,
    max_s: float | None = None,
    min_reps: int = 5,
) -> dict:
    """Median device time per call of ``fn()`` over a fixed number of repetitions, from CUDA events: the method of the
    GPU rows (issue 19's tables were measured this way), where a budget-sized count would vary from run to run.

    Args:
        fn: enqueues the work on the current stream; called with no arguments.
        device: the CUDA device the work runs on.
        reps: timed repetitions (each one a pair of events).
        warmup: untimed calls first (Triton compiles on the first call); fewer when they already took ``max_s / 4``.
        inner: calls back to back inside one pair of events, time per call = elapsed / inner. For calls of a few
            microseconds: a pair of events cannot resolve one, and back to back the host's launch cost (or a host
            round trip inside the op) shows, as it does in a training step.
        flush_l2: write a 256 MiB buffer before each repetition (not between the ``inner`` calls).
        max_s: when the warm-up says ``reps`` repetitions take longer than this, fewer (never below ``min_reps``): a
            call of 0.8 s would otherwise hold the GPU check for half a minute per row.
        min_reps: the fewest timed repetitions.

    Returns:
        ``{"ms": median per call, "min_ms": fastest per call, "reps": timed repetitions}``.
    """
    device, cache = _cuda_device_and_flush(device, flush_l2)
    per_call = _warm_up(fn, warmup, max_s, lambda: torch.cuda.synchronize(device))
    reps = _reps_within(reps, per_call * inner, max_s, min_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if cache is not None:
            cache.zero_()
        starts[i].record()
        for _ in range(inner):
            fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) / inner for s, e in zip(starts, ends, strict=True)]
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def time_wall(
    fn: Callable[[], object],
    *,
    reps: int = 30,
    warmup: int = 3,
    inner: int = 1,
    max_s: float | None = None,
    min_reps: int = 5,
    **_ignored,
) -> dict:
    """:func:`time_events` on the CPU (``time.perf_counter``, nothing to flush): the GPU rows' code path run on a CPU,
    for the tests and for a look at the rows without a GPU. Same arguments and result."""
    per_call = _warm_up(fn, warmup, max_s, lambda: None)
    reps = _reps_within(reps, per_call * inner, max_s, min_reps)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) * 1e3 / inner)
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def _cuda_device_and_flush(device: torch.device | str, flush_l2: bool) -> tuple[torch.device, torch.Tensor | None]:
    """The CUDA device with its index (the current one when ``device`` has none), and its L2 flush buffer (made once
    per device) when ``flush_l2``, else None."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cache = None
    if flush_l2:
        cache = _flush_buffer.get(device)
        if cache is None:
            cache = _flush_buffer[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    return device, cache


def _warm_up(fn: Callable[[], object], warmup: int, max_s: float | None, sync: Callable[[], None]) -> float:
    """Runs the warm-up calls (at least one; stops once they took ``max_s / 4``) and returns the fastest one's
    seconds, the estimate of a warm call (the first pays compilation and the allocator's growth)."""
    est = []
    spent = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        fn()
        sync()
        est.append(time.perf_counter() - t0)
        spent += est[-1]
        if max_s is not None and spent > max_s / 4:
            break
    return min(est)


def _reps_within(reps: int, rep_s: float, max_s: float | None, min_reps: int) -> int:
    """``reps``, or fewer (never below ``min_reps``) when ``reps`` repetitions of ``rep_s`` seconds exceed ``max_s``."""
    if max_s is None or rep_s * reps <= max_s:
        return reps
    return max(min_reps, min(reps, int(max_s / max(rep_s, 1e-9))))


def retime_rows(
    rows_by_name: dict[str, dict],
    calls: dict[str, Callable[[], object]],
    *,
    budget_s: float,
    warmup: int,
    scale: dict[str, float] | None = None,
) -> None:
    """Times ``calls`` round-robin (:func:`time_cpu_interleaved`) under :class:`CpuContention`, and puts the figures in
    the rows of the same names (``timing``: ``"interleaved"``); ``scale`` multiplies a row's times (a bound timed as a
    copy of other bytes)."""
    with CpuContention() as contention:
        res = time_cpu_interleaved(calls, budget_s=budget_s, warmup=warmup)
    for key, r in res.items():
        k = (scale or {}).get(key, 1.0)
        rows_by_name[key].update(ms=r["ms"] * k, min_ms=r["min_ms"] * k, reps=r["reps"],
                                 other_cpu=contention.other_share, timing="interleaved")  # fmt: skip
