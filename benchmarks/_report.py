"""How ``throughput.py`` shows its results: the Markdown table and title of a section, the environment line, and the
CSV + JSON files (every CSV row repeats the device and versions)."""

from __future__ import annotations

import csv
import datetime as _dt
import json
from pathlib import Path

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _harness import Section, _contended, _fmt

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

# Columns only the GPU rows fill (issue 19): appended to the CSV header when a run has them.
GPU_CSV_FIELDS = ["us", "bound_provider", "us_above_bound", "speedup_vs_native"]


def markdown_table(rows: list[dict], section: Section) -> str:
    """The section's rows as a Markdown table: its lead columns, median ms († when contended), its columns."""
    extra = section.columns if rows else []
    lead = section.lead
    cols = [c[0] for c in lead] + ["median ms"] + [c[0] for c in extra]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    for r in rows:
        cells = [str(r[key]) for _, key in lead] + [_fmt(r["ms"], ".3f") + _contended(r)]
        cells += [_fmt(r.get(key), spec, suffix) for _, key, spec, suffix in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section_title(rows: list[dict], section: Section) -> str:
    """The section's own title, else ``shuffle_patches [B, 3, 224, 224] p=16`` (``... g=2`` for mix) from the rows
    themselves."""
    if not rows:
        return "(no rows)"
    if section.title is not None:
        return section.title(rows)
    r = rows[0]
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
    # The GPU rows' own columns only when there are such rows, so a CPU run's CSV keeps its header.
    fields = CSV_FIELDS + [k for k in GPU_CSV_FIELDS if any(k in r for r in rows)]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        env_cols = {k: env.get(k) for k in ("device", "device_name", "torch", "triton", "ppml_commit", "date")}
        for r in rows:
            writer.writerow({**env_cols, **r})
    with open(json_path, "w") as f:
        json.dump({"environment": env, "args": args, "rows": rows, "targets": targets}, f, indent=2)
    return [csv_path, json_path]
