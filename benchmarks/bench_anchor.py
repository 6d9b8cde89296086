"""Anchor losses, ``ppml::anchor_loss``: the forward + ``.backward()`` at every (B, D, C) of :data:`ANCHOR_SIZES`.

Metric ``sqeuclidean``, γ = 1, pull = 0.1, float32 features [B, D] requiring grad, C classes (not channels), fixed
radius-1 anchors: ``simplex`` where C <= D+1, else ``random``. Providers: ``eager`` (what a user writes:
``F.cross_entropy(F.linear(features, γA, b), labels) + pull·½‖f − a_y‖²`` averaged, a frozen linear layer with a zero
bias), ``compiled`` (``torch.compile`` of that function, full runs only), ``native`` (``ppml.anchor_loss(...,
backend="native")``: loss and feature gradient in one chunked pass), ``native`` again with ``metric="cosine"``
(compared with the Euclidean ``eager``: there is no eager cosine row) and ``reference`` (``backend="reference"``,
autograd through ``ppml.reference``). With equal-norm anchors the two are the same function (z_c = −(γ/2)‖f − a_c‖² =
γ f·a_c − a per-row constant), so each Euclidean provider's loss and gradient are checked against ``eager``'s (cosine:
against ``reference``'s) to 1e-4 relative before it is timed; a mismatch aborts (the features are N(0, 1/D), norm ≈
the anchors' radius: the expanded ‖f‖² − 2f·a + ‖a‖² form loses float32 precision in the gradient as ‖f‖ grows, ~2e-4
relative at ‖f‖ ≈ √D with N(0, 1) features, eager's f·a form does not). Peak extra memory is measured on one warm
forward + backward (:func:`_harness.peak_extra_mb`). On CPU the providers of one size are timed round-robin
(``_timing.time_cpu_interleaved``): all of them are bound by the same two GEMMs, and timed one after the other their
ratio moved by ±10 % between runs on a shared machine.

GPU rows (issue 19, CUDA only: :data:`GPU_SECTION`), at :data:`GPU_ANCHOR_SIZES`: ``eager`` in float32 and under
bfloat16 autocast (dtype ``bfloat16``: float32 features, bf16 GEMMs), ``native`` and ``triton`` with float32 and with
bfloat16 features; milliseconds, peak MB above the inputs, the speedup over eager in the matching precision and, for
Triton, against native. Each is checked against float32 eager first (1e-4 relative in float32, 3e-2 in bfloat16); an
absent backend, a failure or a wrong result is noted and its row left out, never a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _harness import (
    BenchmarkMismatch,
    Config,
    Provider,
    Section,
    Target,
    _libc,
    backend_reason,
    drop_failed,
    lazily_compiled,
    log,
    peak_extra_mb,
    runnable_providers,
)
from _timing import CpuContention, synchronize, time_cpu_interleaved, time_fn

import ppml

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


def _row(
    section: str,
    provider: str,
    metric: str,
    dtype: str,
    shape: tuple[int, int, int, str],
    res: dict,
    peak: float | None,
    rel_loss: float,
    rel_grad: float,
    **extra,
) -> dict:
    """One timed row of an anchor section: ``shape`` is (B, D, C, anchors), ``res`` the timer's result, ``extra`` the
    section's own columns (they follow ``reps``)."""
    B, D, C, kind = shape
    return {
        "section": section,
        "provider": provider,
        "metric": metric,
        "dtype": dtype,
        "B": B,
        "D": D,
        "C": C,
        "anchors": kind,
        "scale": ANCHOR_SCALE,
        "pull": ANCHOR_PULL,
        "ms": res["ms"],
        "min_ms": res["min_ms"],
        "reps": res["reps"],
        **extra,
        "peak_extra_mb": peak,
        "check_rel_loss": rel_loss,
        "check_rel_grad": rel_grad,
    }


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
                drop_failed(cfg, runnable, prov, exc, f"at B={B} D={D} C={C}", op, tag)
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
                _row(op, prov.name, prov.metric, "float32", (B, D, C, kind), res, peak, rel_loss, rel_grad,
                     other_cpu=busy)
            )  # fmt: skip
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


COLUMNS = [
    ("peak extra MB", "peak_extra_mb", ".1f", ""),
    ("vs eager", "speedup_vs_eager", ".2f", "×"),
]
LEAD = [("provider", "provider"), ("metric", "metric"), ("B", "B"), ("D", "D"), ("C", "C")]


def _title(rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"anchor_loss forward + backward, {r['dtype']} features [B, D] (requires grad), C classes, "
        f"γ={r['scale']:g}, pull={r['pull']:g}, radius-1 anchors (simplex where C <= D+1, else random)"
    )


# ---- GPU rows (issue 19) -------------------------------------------------------------------------------------------

# (B, D, C) of issue 19's table: ImageNet-1k on a ViT-B feature, a big batch of wide features, a 32k vocabulary.
GPU_ANCHOR_SIZES = ((256, 768, 1000), (1024, 2048, 1000), (4096, 768, 32_000))
# Relative tolerance of a bfloat16 row against float32 eager: bf16 GEMM inputs round to 2^-8 relative.
GPU_BF16_RTOL = 3e-2


@dataclass
class GpuAnchorProvider:
    """One GPU row: ``loss(features, anchors, weight, bias, labels)`` with ``dtype`` features (``autocast``: float32
    features under bfloat16 autocast instead), run only where ``backend`` (None: plain torch) can run here."""

    name: str
    dtype: torch.dtype
    loss: Callable[..., torch.Tensor]
    backend: str | None = None
    autocast: bool = False


def _autocast(loss: Callable[..., torch.Tensor], device_type: str) -> Callable[..., torch.Tensor]:
    def run(*args):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return loss(*args)

    return run


def _gpu_providers(device_type: str) -> list[GpuAnchorProvider]:
    bf16 = torch.bfloat16
    return [
        GpuAnchorProvider("eager", torch.float32, anchor_eager),
        GpuAnchorProvider("eager", bf16, _autocast(anchor_eager, device_type), autocast=True),
        GpuAnchorProvider("native", torch.float32, anchor_ppml("sqeuclidean", "native"), "native"),
        GpuAnchorProvider("native", bf16, anchor_ppml("sqeuclidean", "native"), "native"),
        GpuAnchorProvider("triton", torch.float32, anchor_ppml("sqeuclidean", "triton"), "triton"),
        GpuAnchorProvider("triton", bf16, anchor_ppml("sqeuclidean", "triton"), "triton"),
    ]


def gpu_rows(
    cfg: Config,
    *,
    timer: Callable[..., dict] | None = None,
    sizes: tuple[tuple[int, int, int], ...] = GPU_ANCHOR_SIZES,
) -> list[dict]:
    """Issue 19's anchor table on `cfg.device`: every provider in both precisions, checked, then timed.

    Args:
        cfg: the run's config (the GPU rows' timer and repetitions come from it).
        timer: ``timer(fn) -> {"ms", "min_ms", "reps"}`` (default: ``cfg.gpu_timer()``).
        sizes: the (B, D, C) to run; tests pass small ones.
    """
    timer = timer or cfg.gpu_timer()
    device, op, tag = cfg.device, "anchor_loss", "anchor_gpu"
    runnable = []
    for prov in _gpu_providers(device.type):
        why = None if prov.backend is None else backend_reason(op, prov.backend, device.type)
        if why is None:
            runnable.append(prov)
        elif f"skipped {op}/{prov.backend}" not in " ".join(cfg.notes):
            log(f"[{tag}] skipping {prov.backend}: {why}")
            cfg.notes.append(f"skipped {op}/{prov.backend} on {device.type}: {why}")
    rows = []
    for B, D, C in sizes:
        kind, args32 = _anchor_data(B, D, C, device, cfg.seed + B + D + C)
        args16 = (args32[0].detach().to(torch.bfloat16).requires_grad_(), *args32[1:])
        want_loss = want_grad = None
        shape_rows = []
        for prov in runnable:
            args = args16 if prov.dtype == torch.bfloat16 and not prov.autocast else args32
            call = _fwd_bwd(prov.loss, args)
            dname = str(prov.dtype).replace("torch.", "")
            label = f"{op}/{prov.name} {dname} at B={B} D={D} C={C}"
            try:
                peak, loss = peak_extra_mb(call, device)  # also the warm call the check reads
                grad = args[0].grad.detach().float()
            except Exception as exc:  # a kernel in progress must not cost the GPU check the other rows
                why = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                log(f"[{tag}] skipping {label}: {why}")
                cfg.notes.append(f"skipped {label}: {why}")
                continue
            if want_loss is None:  # float32 eager comes first: the oracle of every other row
                want_loss, want_grad = loss, grad
            rtol = GPU_BF16_RTOL if prov.dtype == torch.bfloat16 else ANCHOR_RTOL
            rel_loss, rel_grad = _rel(loss, want_loss), _rel(grad, want_grad)
            if not (rel_loss <= rtol and rel_grad <= rtol):
                msg = (f"{label} differs from float32 eager: loss relative {rel_loss:.1e}, gradient max |Δ| / "
                       f"max |grad| {rel_grad:.1e} (tolerance {rtol:g}): not timed")  # fmt: skip
                log(f"[{tag}] WRONG RESULT: {msg}")
                cfg.notes.append(f"WRONG RESULT: {msg}")
                continue
            res = timer(call)
            log(f"[{tag}] {prov.name:<7} {dname:<9} B={B:<5} D={D:<5} C={C:<6} {res['ms']:10.3f} ms  "
                f"({res['reps']} reps)" + ("" if peak is None else f"  peak +{peak:.1f} MB"))  # fmt: skip
            timing = "events, L2 flushed" if device.type == "cuda" else "wall clock"
            shape_rows.append(
                _row("anchor_loss_gpu", prov.name, "sqeuclidean", dname, (B, D, C, kind), res, peak, rel_loss, rel_grad,
                     timing=timing)
            )  # fmt: skip
        derive_matching(shape_rows)
        rows += shape_rows
        del args32, args16, want_loss, want_grad
    return rows


def derive_matching(rows: list[dict]) -> None:
    """Speedup and peak memory against eager in the row's own precision (float32 vs float32, bfloat16 vs autocast),
    and speedup against native in the same precision (the Triton target)."""
    by = {(r["provider"], r["dtype"]): r for r in rows}
    for row in rows:
        eager, native = by.get(("eager", row["dtype"])), by.get(("native", row["dtype"]))
        row["speedup_vs_eager"] = eager["ms"] / row["ms"] if eager else None
        row["speedup_vs_native"] = native["ms"] / row["ms"] if native and row["provider"] != "eager" else None
        e_peak, peak = (eager or {}).get("peak_extra_mb"), row["peak_extra_mb"]
        row["peak_vs_eager"] = peak / e_peak if peak is not None and e_peak else None


def _gpu_targets() -> list[Target]:
    """Issue 19, points 3 and 4: native >= 1.0x eager in the matching precision at every size, Triton >= 0.8x native,
    and at C >= 32k both at most half of eager's peak memory."""
    targets = []
    for B, D, C in GPU_ANCHOR_SIZES:
        where = (("D", D), ("C", C))
        for dname in ("float32", "bfloat16"):
            targets.append(Target(f"native {dname} B={B} D={D} C={C} speedup vs eager", "native", dname, B,
                                  "speedup_vs_eager", 1.0, ("cuda",), where))  # fmt: skip
            targets.append(Target(f"triton {dname} B={B} D={D} C={C} speedup vs native", "triton", dname, B,
                                  "speedup_vs_native", 0.8, ("cuda",), where))  # fmt: skip
            if C >= 32_000:
                for prov in ("native", "triton"):
                    targets.append(Target(f"{prov} {dname} B={B} D={D} C={C} peak memory vs eager", prov, dname, B,
                                          "peak_vs_eager", None, ("cuda",), where, maximum=0.5))  # fmt: skip
    return targets


def _gpu_title(rows: list[dict]) -> str:
    r = rows[0]
    return (
        f"anchor_loss GPU rows, forward + backward, γ={r['scale']:g}, pull={r['pull']:g}: float32 and bfloat16 (eager: "
        "float32 features under bf16 autocast), against eager in the matching precision"
    )


GPU_SECTION = Section(
    name="anchor_gpu",
    run=gpu_rows,
    targets=_gpu_targets(),
    columns=[
        ("peak extra MB", "peak_extra_mb", ".1f", ""),
        ("vs eager", "speedup_vs_eager", ".2f", "×"),
        ("vs native", "speedup_vs_native", ".2f", "×"),
        ("peak vs eager", "peak_vs_eager", ".2f", ""),
        ("reps", "reps", "d", ""),
    ],
    lead=[("provider", "provider"), ("dtype", "dtype"), ("B", "B"), ("D", "D"), ("C", "C")],
    title=_gpu_title,
)

SECTION = Section(
    name="anchor", run=section_anchor, targets=_anchor_targets(), columns=COLUMNS, lead=LEAD, title=_title,
    gpu=GPU_SECTION,
)  # fmt: skip
