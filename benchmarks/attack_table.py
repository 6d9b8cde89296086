"""The README's attack table: every attacker against every defence setting, on the evaluation set.

    python benchmarks/attack_table.py                  # the README table: 50 images, learned attackers cached/trained
    python benchmarks/attack_table.py --quick          # jigsaw and the closed-form MI inversions only
    python benchmarks/attack_table.py --n 20           # a smaller evaluation set
    python benchmarks/attack_table.py --images skimage:astronaut path/to/photo.jpg    # your images instead
    python benchmarks/attack_table.py --cache-dir DIR  # where the learned attackers are cached (default: ppml's)

The images: ``ppml.attacks.evaluation_images(n, size)`` (default 50 at 224 px: the three held-out photos whole and
cropped, validation digits, LFW faces — none of them seen by the learned attackers in training). Each setting is one
``ppml attack`` run (``ppml.cli.main``) on a folder of those images written as PNG, so the table is exactly what the
command reports: RS at p = 8, 16, 32 with 0 % and 25 % patch drop (jigsaw solver and the learned ViT attacker) and
with a 2-pixel gap between patches (jigsaw), and MI at p = 16 with g = 2 and 4 (thumbnail upsampling, least-norm,
smoothed least-norm, learned decoder). Each cell is the mean over the images with a 95 % bootstrap interval (2,000
resamples, seeded; PSNR: the median and its interval, since an exact reconstruction scores +inf); seconds are per
image (the attack only). The learned attackers train once into their cache (``--cache-dir``, else
``$PPML_CACHE_DIR`` or ``~/.cache/ppml/attacks``), under a file named by the hash of their training settings, and are
loaded from it by later runs. Keys come from ``--seed`` (default 0), so a rerun gives the same ciphertext. Prints
Markdown with the machine and versions and writes ``benchmarks/results/attacks-<timestamp>.json``.

Extending: a section is a function ``(ctx: Context) -> Section`` appended to :data:`ROW_BUILDERS`; it may run
``ppml attack`` through :meth:`Context.attack` and summarise per-image rows with :func:`summarise`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import environment

from ppml.cli import main as ppml_main

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RS_SETTINGS = [(p, drop, gap) for p in (32, 16, 8) for drop, gap in ((0.0, 0), (0.25, 0), (0.0, 2))]
MI_SETTINGS = [(16, 2), (16, 4)]
RS_KEYS = ["direct", "neighbour", "perfect", "psnr", "ssim"]


@dataclass
class Context:
    """What every section builder gets: the images (as ``ppml attack`` inputs), the options, and a runner."""

    inputs: list[str]  # ppml attack IMAGES arguments (a folder of the evaluation set, or --images)
    count: int  # --count for a folder
    names: list[str]  # one per image, in the order ppml attack reports them
    args: argparse.Namespace

    def attackers(self, names: list[str]) -> list[str]:
        """``names`` less those that ``--attackers`` leaves out."""
        return [a for a in names if self.args.attackers is None or a in self.args.attackers.split(",")]

    def attack(self, *argv: str) -> list[dict]:
        """Runs ``ppml attack ARGV IMAGES`` (size, seed, threads, count filled in); returns its per-image rows."""
        full = ["attack", *argv, "--size", str(self.args.size), "--seed", str(self.args.seed), "--threads", "1",
                "--count", str(self.count), *self.inputs]  # fmt: skip
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # its per-image table
            rc = ppml_main([*full, "--out", out, "--no-progress"])
            if rc != 0:
                raise SystemExit(f"ppml {' '.join(full)} failed with exit status {rc}")
            return json.loads((Path(out) / "attack.json").read_text())["rows"]


@dataclass
class Section:
    """One Markdown table of the report: a title line, the header cells, the rows, and what goes into the JSON."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    record: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [self.title, "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in self.rows])


def bootstrap(values: list[float], median: bool = False, reps: int = 2000, seed: int = 0):
    """(the mean — or median — of ``values``, and the 2.5th and 97.5th percentiles of its bootstrap distribution)."""
    v = np.asarray(values, dtype=np.float64)
    stat = np.median if median else np.mean
    draws = np.sort(stat(v[np.random.default_rng(seed).integers(0, len(v), (reps, len(v)))], axis=1))
    return float(stat(v)), float(draws[int(0.025 * reps)]), float(draws[min(reps - 1, int(0.975 * reps))])


def fmt(v: float, digits: int = 3) -> str:
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


def summarise(rows: list[dict], keys: list[str]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per attacker and score: (mean, low, high) over the images — PSNR: the median — and the mean seconds."""
    by_attacker: dict[str, list[dict]] = {}
    for r in rows:
        by_attacker.setdefault(r["attacker"], []).append(r)
    out = {}
    for attacker, rs in by_attacker.items():
        out[attacker] = {k: bootstrap([r[k] for r in rs], median=k == "psnr") for k in keys}
        out[attacker]["seconds"] = (statistics.fmean(r["seconds"] for r in rs),) * 3
    return out


def cell(stat: tuple[float, float, float], digits: int = 3) -> str:
    v, lo, hi = stat
    return f"{fmt(v, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def rs_section(ctx: Context) -> Section:
    """RS: jigsaw (and the learned ViT without a gap) at every patch size and defence."""
    sec = Section("RS (mean [95 % bootstrap interval]; PSNR: median)",
                  ["p", "drop", "gap", "attacker", "direct", "neighbour", "perfect", "PSNR (dB)", "SSIM",
                   "s / image"])  # fmt: skip
    for p, drop, gap in RS_SETTINGS:
        argv = ["--scheme", "rs", "--patch-size", str(p), "--drop", str(drop), "--gap", str(gap)]
        # A gap changes the image size (224 -> 192 at p = 16), i.e. another learned attacker to train; it is near
        # chance without a gap already, so the gap rows are the jigsaw's.
        attackers = ctx.attackers(["jigsaw"] if ctx.args.quick or gap else ["jigsaw", "vit"])
        if not attackers:
            continue
        rows = ctx.attack(*argv, "--attackers", ",".join(attackers))
        for attacker, m in summarise(rows, RS_KEYS).items():
            sec.rows.append([str(p), f"{drop:.0%}", str(gap), attacker, cell(m["direct"]), cell(m["neighbour"]),
                             cell(m["perfect"], 2), cell(m["psnr"], 1), cell(m["ssim"]),
                             f"{m['seconds'][0]:.2f}"])  # fmt: skip
            print("| " + " | ".join(sec.rows[-1]) + " |", file=sys.stderr, flush=True)
        sec.record.append({"patch_size": p, "drop": drop, "gap": gap, "rows": rows})
    return sec


def mi_section(ctx: Context) -> Section:
    """MI: the closed-form inversions and the learned decoder at p = 16, g = 2 and 4."""
    sec = Section("MI (mean [95 % bootstrap interval]; PSNR: median)",
                  ["p", "g", "attacker", "PSNR (dB)", "SSIM", "s / image"])  # fmt: skip
    for p, g in MI_SETTINGS:
        argv = ["--scheme", "mi", "--patch-size", str(p), "--grid", str(g)]
        attackers = ctx.attackers(["thumbnail", "least-norm", "smooth"] + ([] if ctx.args.quick else ["decoder"]))
        if not attackers:
            continue
        rows = ctx.attack(*argv, "--attackers", ",".join(attackers))
        for attacker, m in summarise(rows, ["psnr", "ssim"]).items():
            sec.rows.append([str(p), str(g), attacker, cell(m["psnr"], 1), cell(m["ssim"]), f"{m['seconds'][0]:.2f}"])
            print("| " + " | ".join(sec.rows[-1]) + " |", file=sys.stderr, flush=True)
        sec.record.append({"patch_size": p, "grid": g, "rows": rows})
    return sec


def semantic_section(ctx: Context) -> Section:
    """Semantic inference (benchmarks/attack_semantic.py: the digits at 32 px, RS p = 8; its own images, not the
    evaluation set: the attack needs a labelled set). Trained models come from the cache; --quick leaves it out."""
    from attack_semantic import semantic_rows

    sec = Section("Semantic inference (digits at 32 px, RS p = 8; chance 0.100)",
                  ["model", "trained on", "tested on", "accuracy", "train s"])  # fmt: skip
    if ctx.args.quick or not ctx.attackers(["semantic"]):
        return sec
    for r in semantic_rows():
        sec.rows.append([f"{r['model']} ({r['arch']})", r["trained on"], r["tested on"], f"{r['accuracy']:.3f}",
                         f"{r['train_s']:.0f}"])  # fmt: skip
        sec.record.append(r)
    return sec


# The report's sections, in order. Other attacks add theirs here (a builder: Context -> Section). The RS gap rows
# are the gap-aware solver's (ppml attack --gap runs solve_jigsaw(..., gap=g)).
ROW_BUILDERS: list[Callable[[Context], Section]] = [rs_section, mi_section, semantic_section]


def write_evaluation_set(folder: str, n: int, size: int) -> list[str]:
    """The evaluation set as lossless PNGs ``NNN-name.png`` (sorted = set order); returns the names."""
    from PIL import Image

    from ppml.attacks import evaluation_images

    images, names = evaluation_images(n, size)
    for i, (im, name) in enumerate(zip(images, names, strict=True)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:03d}-{name.replace('/', '_')}.png"))
    return list(names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="evaluation images (ppml.attacks.evaluation_images)")
    ap.add_argument("--images", nargs="+", default=None, help="ppml attack inputs instead of the evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="no learned attackers (nothing is trained)")
    ap.add_argument("--attackers", default=None,
                    help="comma list: only these attackers (vit,decoder: what --quick leaves out)")  # fmt: skip
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--cache-dir", default=None, help="where trained attackers are cached (sets PPML_CACHE_DIR)")
    ap.add_argument("--sections", default=None,
                    help="comma list of section builders to run (default: all of ROW_BUILDERS)")  # fmt: skip
    args = ap.parse_args()
    if args.cache_dir:
        os.environ["PPML_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    builders = ROW_BUILDERS
    if args.sections:
        wanted = args.sections.split(",")
        builders = [b for b in ROW_BUILDERS if b.__name__ in wanted]
        if len(builders) != len(wanted):
            raise SystemExit(f"--sections: choose from {', '.join(b.__name__ for b in ROW_BUILDERS)}")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        if args.images:
            ctx = Context(list(args.images), 4, list(args.images), args)
            what = ", ".join(args.images)
        else:
            names = write_evaluation_set(folder, args.n, args.size)
            ctx = Context([folder], args.n, names, args)
            what = (f"the evaluation set (ppml.attacks.evaluation_images({args.n}, {args.size}): "
                    f"{sum(not n.startswith(('digit', 'lfw')) for n in names)} photos, "
                    f"{sum(n.startswith('digit') for n in names)} digits, "
                    f"{sum(n.startswith('lfw') for n in names)} LFW faces)")  # fmt: skip
        sections = [build(ctx) for build in builders]
    total = time.perf_counter() - t0

    env = environment("cpu")
    machine = f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, ppml {env['ppml_commit']}"
    print(f"Attacks on {what} at {args.size}×{args.size}, one key per image (seed {args.seed}); {machine}; whole run "
          f"{total:.0f} s\n")  # fmt: skip
    print("\n\n".join(s.markdown() for s in sections))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {s.title: s.record for s in sections}
    record |= {"images": ctx.names, "size": args.size, "seed": args.seed, "seconds": total, "environment": env}
    (RESULTS_DIR / f"attacks-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
