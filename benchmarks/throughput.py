"""ppml's main benchmark: throughput of each op's kernels against the copy bound and what a user would write.

Run from the repository root::

    python benchmarks/throughput.py            # full run, a few minutes
    python benchmarks/throughput.py --quick    # about 1.5 minutes on a 2-core CPU
    python benchmarks/throughput.py --device cpu --sections shuffle --out /tmp/bench

Prints a Markdown table per section (with the device and the versions), then the targets and whether they are met,
and writes the rows plus the environment record to ``benchmarks/results/throughput-<device>-<timestamp>.{csv,json}``.
Every provider's output is checked bit for bit against ``ppml.reference`` before it is timed; a mismatch aborts.
A provider whose backend cannot run here is skipped with the reason from ``ppml.backend_info()``. Rows timed while
other processes took more than 10% of the CPU are marked †.

On a CUDA device every section is followed by its GPU rows (issue 19's tables: each kernel against the same run's
device copy, CUDA events, the median of 30 repetitions in ``--quick``, 100 otherwise), with their own targets; a
GPU row never aborts the run: a missing backend, a failure or a wrong result is a note under its table.

Layout (the Liger-Kernel way): this file is the command; each op's benchmark is ``bench_<op>.py`` (its providers,
rows, targets and GPU rows, documented there), the harness ``_harness.py`` (providers, checking and timing one shape,
targets, :class:`_harness.Section`), ``_timing.py`` (CPU and CUDA timing, the copy bound, the environment record) and
``_report.py`` (the table and the result files). One-off studies live in ``experiments/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
import bench_anchor
import bench_mix
import bench_shuffle
import bench_tokens
import torch
from _harness import CONTENTION_LIMIT, BenchmarkMismatch, Config, Section, _contended, check_targets
from _report import RESULTS_DIR, env_line, markdown_table, section_title, write_results
from _timing import environment

# --sections names, in the order they run.
SECTIONS: dict[str, Section] = {
    s.name: s for s in (bench_shuffle.SECTION, bench_mix.SECTION, bench_anchor.SECTION, bench_tokens.SECTION)
}


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


def run_sections(cfg: Config, names: list[str], *, gpu_rows: bool) -> tuple[list[dict], dict[str, list[str]]]:
    """Runs and prints every section of `names` in order, each followed by its GPU rows when `gpu_rows` (on CUDA;
    the tests run them on a CPU), each a table with its notes and targets.

    Returns:
        (every row, {section name: its target lines}).

    Raises:
        BenchmarkMismatch: a (CPU-section) provider gave a wrong result.
    """
    all_rows: list[dict] = []
    targets: dict[str, list[str]] = {}
    for name in names:
        for section in (SECTIONS[name], SECTIONS[name].gpu if gpu_rows else None):
            if section is None:
                continue
            rows = section.run(cfg)
            print(f"\n## {section_title(rows, section)} on {cfg.env['device_name']}\n")
            print(markdown_table(rows, section))
            if any(_contended(r) for r in rows):
                print(
                    f"\n† other processes took more than {CONTENTION_LIMIT:.0%} of the CPU while this row was timed: "
                    "rerun on a quiet machine before trusting it"
                )
            if cfg.notes:
                print("\n" + "\n".join(cfg.notes))
                cfg.notes.clear()
            targets[section.name] = check_targets(section.targets, rows, cfg.device)
            if targets[section.name]:
                print(f"\ntargets ({section.name}):")
                print("\n".join(targets[section.name]))
            all_rows += rows
    return all_rows, targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("throughput: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    env = environment(device)
    cfg = Config(device=device, quick=args.quick, env=env, seed=args.seed)
    t0 = time.perf_counter()
    print(f"# ppml throughput{' (--quick)' if args.quick else ''}")
    print(env_line(env))
    hint = _huge_page_hint(device)
    if hint:
        print(hint)
    try:
        all_rows, targets = run_sections(cfg, args.sections, gpu_rows=device.type == "cuda")
    except BenchmarkMismatch as exc:
        print(f"\nMISMATCH — aborting: {exc}", file=sys.stderr)
        return 1
    arg_record = {"device": str(device), "quick": args.quick, "sections": args.sections, "seed": args.seed}
    paths = write_results(args.out, env, all_rows, targets, arg_record)
    print(f"\nwrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
