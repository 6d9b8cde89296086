"""ppml's main benchmark: throughput of each op's kernels against the copy bound and what a user would write.

Run from the repository root::

    python benchmarks/throughput.py            # full run, a few minutes
    python benchmarks/throughput.py --quick    # under a minute on a 2-core CPU
    python benchmarks/throughput.py --device cpu --sections shuffle --out /tmp/bench

Prints a Markdown table per section (with the device and the versions), then the targets and whether they are met,
and writes the rows plus the environment record to ``benchmarks/results/throughput-<device>-<timestamp>.{csv,json}``.
Every provider's output is checked bit for bit against ``ppml.reference`` before it is timed; a mismatch aborts.

Providers (shuffle): ``copy`` (``out.copy_(x)`` into a preallocated ``out``: the bound), ``clone`` (allocate and
copy: the bound for any op returning a fresh tensor, far below ``copy`` where first-touch page faults are slow),
``loop`` (the paper code: a ``torch.randperm`` and an index per image, keys included in the time), ``vectorised``
(unfold -> ``take_along_dim`` -> fold), ``compiled`` (``torch.compile(ppml.reference.shuffle_patches)``, full runs
only), ``native`` (``torch.ops.ppml.shuffle_patches``) and ``triton`` (GPU only). A provider whose backend cannot run
here is skipped with the reason from ``ppml._dispatch.unavailable_reason``. Rows timed while other processes took
more than 10% of the CPU are marked †.

A section is a function ``(Config) -> list[row dict]`` registered in :data:`SECTIONS` (``shuffle`` now; ``mix`` and
``anchor`` later), with its targets in :data:`TARGETS`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import CpuContention, copy_bound_ms, environment, synchronize, time_fn

import ppml
from ppml import reference
from ppml._dispatch import unavailable_reason

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
    "ms",
    "min_ms",
    "reps",
    "other_cpu",
    "gb_per_s",
    "share_of_copy",
    "speedup_vs_loop",
    "speedup_vs_vectorised",
    "speedup_vs_compiled",
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


def derive(rows: list[dict], nbytes: int) -> None:
    """Fills the derived columns of the rows of one shape from their medians and the baselines among them."""
    base = {r["provider"]: r["ms"] for r in rows}
    for row in rows:
        ms = row["ms"]
        row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
        row["share_of_copy"] = base["copy"] / ms if "copy" in base else None
        for name in ("loop", "vectorised", "compiled"):
            row[f"speedup_vs_{name}"] = base[name] / ms if name in base else None
        row["images_per_s"] = row["B"] / (ms * 1e-3)


@dataclass
class Provider:
    """One way to compute an op.

    Attributes:
        name: the row label.
        run: ``run(x, perm, p)`` gives the output checked against the reference (None: not checked).
        timed: ``timed(x, perm, p)`` gives the zero-argument function that is timed (default: ``run`` with the same
            arguments; only ``loop`` differs, drawing its own keys as the paper code does). None for ``copy``, which
            :func:`_timing.copy_bound_ms` times (the one definition of the bound).
        backend: the ppml backend whose ``unavailable_reason`` decides whether it runs here.
        gpu_only: skipped on CPU (Triton on CPU exists only under the interpreter, which says nothing about speed).
        skip_quick: why it is left out of ``--quick`` runs, if it is.
        quick_max_batch: the largest batch it is timed at in ``--quick`` runs (None: every batch).
        optional: a failure to run (not a wrong result) skips it with the error instead of aborting, because it
            says something about this machine (no C++ compiler for inductor...) rather than about ppml.
    """

    name: str
    run: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None
    timed: Callable[[torch.Tensor, torch.Tensor, int], Callable[[], object]] | None = None
    backend: str | None = None
    gpu_only: bool = False
    skip_quick: str | None = None
    quick_max_batch: int | None = None
    optional: bool = False

    def timed_fn(self, x: torch.Tensor, perm: torch.Tensor, p: int) -> Callable[[], object]:
        if self.timed is not None:
            return self.timed(x, perm, p)
        return lambda: self.run(x, perm, p)


def skip_reason(provider: Provider, op: str, cfg: Config) -> str | None:
    """Why `provider` does not run in this benchmark here, or None."""
    if provider.gpu_only and cfg.device.type != "cuda":
        return f"GPU only (benchmarking on {cfg.device.type})"
    if cfg.quick and provider.skip_quick:
        return provider.skip_quick
    if provider.backend is not None:
        return unavailable_reason(op, provider.backend, cfg.device.type)
    return None


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


def compiled_reference() -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """``torch.compile(ppml.reference.shuffle_patches)``, one static graph per (dtype, B)."""
    import torch._dynamo

    # Up to 9 (dtype, B) graphs on GPU: above dynamo's default limit of 8 it would fall back to eager silently.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
            break
    return torch.compile(reference.shuffle_patches, dynamic=False)


def _shuffle_providers() -> list[Provider]:
    compiled = None

    def run_compiled(x: torch.Tensor, perm: torch.Tensor, p: int) -> torch.Tensor:
        nonlocal compiled  # compiled on first use, so a run that skips it never imports inductor
        if compiled is None:
            compiled = compiled_reference()
        return compiled(x, perm, p)

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
            run_compiled,
            skip_quick="torch.compile takes seconds per shape (--quick skips it; the full run includes it)",
            optional=True,
        ),
        Provider("native", torch.ops.ppml.shuffle_patches, backend="native"),
        Provider("triton", torch.ops.ppml.shuffle_patches_triton, backend="triton", gpu_only=True),
    ]


def section_shuffle(cfg: Config) -> list[dict]:
    """RS encryption, ``ppml::shuffle_patches``: [B, 3, 224, 224], p = 16, every provider, dtype and batch size."""
    device = cfg.device
    C, H, W, p = 3, 224, 224, 16
    n = (H // p) * (W // p)
    dtypes = [torch.uint8, torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    runnable = []
    for prov in _shuffle_providers():
        why = skip_reason(prov, "shuffle_patches", cfg)
        if why is None:
            runnable.append(prov)
        else:
            log(f"[shuffle] skipping {prov.name}: {why}")
            cfg.notes.append(f"skipped shuffle_patches/{prov.name} on {device.type}: {why}")

    rows = []
    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for B in (1, 64, 256):
            x = random_images((B, C, H, W), dtype, device, seed=cfg.seed + B)
            perm = ppml.random_permutations(B, n, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(device)
            expected = reference.shuffle_patches(x, perm, p)
            shape_rows = []
            for prov in list(runnable):
                if cfg.quick and prov.quick_max_batch is not None and B > prov.quick_max_batch:
                    why = f"--quick times it up to B={prov.quick_max_batch} (the full run includes B={B})"
                    log(f"[shuffle] skipping {prov.name} {dname} B={B}: {why}")
                    note = f"skipped shuffle_patches/{prov.name} at B={B}: {why}"
                    if note not in cfg.notes:  # once, not once per dtype
                        cfg.notes.append(note)
                    continue
                if prov.run is not None:
                    try:
                        got = prov.run(x, perm, p)
                        synchronize(device)
                    except Exception as exc:
                        if not prov.optional:
                            raise
                        runnable.remove(prov)
                        why = f"failed on {dname} B={B}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                        log(f"[shuffle] skipping {prov.name}: {why}")
                        cfg.notes.append(f"skipped shuffle_patches/{prov.name} on {device.type}: {why}")
                        continue
                    if not bit_equal(got, expected):
                        raise BenchmarkMismatch(
                            f"shuffle_patches/{prov.name} differs from ppml.reference.shuffle_patches for {dname} "
                            f"[{B}, {C}, {H}, {W}] p={p} on {device}: refusing to time a wrong result"
                        )
                    del got
                with CpuContention() as contention:
                    if prov.name == "copy":
                        res = copy_bound_ms(x, budget_s=cfg.budget_s, warmup=cfg.warmup)
                    else:
                        res = time_fn(prov.timed_fn(x, perm, p), device, budget_s=cfg.budget_s, warmup=cfg.warmup)
                busy = contention.other_share
                log(
                    f"[shuffle] {prov.name:<10} {dname:<8} B={B:<4} {res['ms']:10.3f} ms  ({res['reps']} reps"
                    + (f", other processes took {busy:.0%} of the CPU)" if busy and busy > 0.02 else ")")
                )
                shape_rows.append(
                    {
                        "section": "shuffle_patches",
                        "provider": prov.name,
                        "dtype": dname,
                        "B": B,
                        "C": C,
                        "H": H,
                        "W": W,
                        "patch_size": p,
                        "ms": res["ms"],
                        "min_ms": res["min_ms"],
                        "reps": res["reps"],
                        "other_cpu": contention.other_share,
                    }
                )
            derive(shape_rows, nbytes=2 * x.numel() * x.element_size())
            rows += shape_rows
            del x, perm, expected
    return rows


# ---- targets ------------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A goal for one row: ``metric`` (a row column) of ``provider`` at (dtype, B) must be at least ``minimum``."""

    label: str
    provider: str
    dtype: str
    B: int
    metric: str
    minimum: float
    devices: tuple[str, ...] = ("cpu", "cuda")


TARGETS: dict[str, list[Target]] = {
    "shuffle": [
        Target("native float32 B=64 share of copy", "native", "float32", 64, "share_of_copy", 0.9),
        Target("native uint8 B=64 share of copy", "native", "uint8", 64, "share_of_copy", 0.8),
        Target("native float32 B=64 speedup vs vectorised", "native", "float32", 64, "speedup_vs_vectorised", 3.0),
        Target("cuda float32 B=64 share of copy", "native", "float32", 64, "share_of_copy", 0.85, ("cuda",)),
        Target("cuda float32 B=256 share of copy", "native", "float32", 256, "share_of_copy", 0.85, ("cuda",)),
        Target("triton float32 B=64 share of copy", "triton", "float32", 64, "share_of_copy", 0.85, ("cuda",)),
        Target("triton float32 B=256 share of copy", "triton", "float32", 256, "share_of_copy", 0.85, ("cuda",)),
    ],
}

SECTIONS: dict[str, Callable[[Config], list[dict]]] = {
    "shuffle": section_shuffle,
}


def check_targets(name: str, rows: list[dict], device: torch.device) -> list[str]:
    """One line per target of section `name` (whose rows are `rows`) that applies to `device`: value, threshold,
    met / NOT met / n/a."""
    lines = []
    for t in TARGETS.get(name, []):
        if device.type not in t.devices:
            continue
        hit = [r for r in rows if (r["provider"], r["dtype"], r["B"]) == (t.provider, t.dtype, t.B)]
        value = hit[0].get(t.metric) if hit else None
        if value is None:
            lines.append(f"- {t.label}: n/a (not measured here) (target >= {t.minimum:g})")
            continue
        verdict = "met" if value >= t.minimum else "NOT met"
        # A ratio is as unreliable as either of its rows: the provider's and the baseline's at the same shape.
        baseline = "copy" if t.metric == "share_of_copy" else t.metric.removeprefix("speedup_vs_")
        pair = hit + [r for r in rows if (r["provider"], r["dtype"], r["B"]) == (baseline, t.dtype, t.B)]
        mark = " †" if any(_contended(r) for r in pair) else ""
        lines.append(f"- {t.label}: {value:.2f} (target >= {t.minimum:g}) {verdict}{mark}")
    return lines


# ---- output -------------------------------------------------------------------------------------------------------


def _contended(row: dict) -> str:
    busy = row.get("other_cpu")
    return " †" if busy is not None and busy > CONTENTION_LIMIT else ""


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else format(value, spec) + suffix


# Above this share of the CPU taken by other processes while a row was timed, the row is marked unreliable.
CONTENTION_LIMIT = 0.10


def markdown_table(rows: list[dict]) -> str:
    cols = ["provider", "dtype", "B", "median ms", "GB/s", "share of copy", "vs loop", "vs vectorised", "vs compiled"]
    cols.append("images/s")
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        lines.append(
            f"| {r['provider']} | {r['dtype']} | {r['B']} | {_fmt(r['ms'], '.3f')}{_contended(r)} "
            f"| {_fmt(r['gb_per_s'], '.1f')} "
            f"| {_fmt(r['share_of_copy'], '.2f')} | {_fmt(r['speedup_vs_loop'], '.1f', '×')} "
            f"| {_fmt(r['speedup_vs_vectorised'], '.2f', '×')} | {_fmt(r['speedup_vs_compiled'], '.2f', '×')} "
            f"| {_fmt(r['images_per_s'], ',.0f')} |"
        )
    return "\n".join(lines)


def section_title(rows: list[dict]) -> str:
    """``shuffle_patches [B, 3, 224, 224] p=16``, from the rows themselves so a new section needs no title table."""
    if not rows:
        return "(no rows)"
    r = rows[0]
    return f"{r['section']} [B, {r['C']}, {r['H']}, {r['W']}] p={r['patch_size']}"


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
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: under a minute on a 2-core CPU")
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
