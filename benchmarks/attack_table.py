"""The README's attack table: every attacker against every defence setting, on the held-out bundled photos.

    python benchmarks/attack_table.py                  # the README table (learned attackers: cached or trained first)
    python benchmarks/attack_table.py --quick          # jigsaw and the closed-form MI inversions only
    python benchmarks/attack_table.py --images skimage:astronaut path/to/photo.jpg

Each setting is one ``ppml attack`` run (``ppml.cli.main``), so the table is exactly what the command reports: RS at
p = 8, 16, 32 with 0 % and 25 % patch drop (jigsaw solver and the learned ViT attacker) and with a 2-pixel gap
between patches (jigsaw), and MI at p = 16 with g = 2 and 4 (thumbnail upsampling, least-norm, smoothed least-norm where the
command has it, learned decoder). Scores are means over the images (PSNR: the median, since an exact reconstruction scores +inf); seconds are per image (the attack only: the
learned attackers' one-off training is reported separately by their cache). Keys come from ``--seed`` (default 0)
so a rerun gives the same ciphertext. Prints Markdown with the machine and versions and writes
``benchmarks/results/attacks-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import environment

from ppml.cli import main as ppml_main

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMAGES = ("skimage:astronaut", "skimage:coffee", "skimage:chelsea")
RS_SETTINGS = [(p, drop, gap) for p in (32, 16, 8) for drop, gap in ((0.0, 0), (0.25, 0), (0.0, 2))]
MI_SETTINGS = [(16, 2), (16, 4)]


def run_setting(argv: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):  # its per-image table
        rc = ppml_main([*argv, "--out", out, "--no-progress"])
        if rc != 0:
            raise SystemExit(f"ppml {' '.join(argv)} failed with exit status {rc}")
        return json.loads((Path(out) / "attack.json").read_text())["rows"]


def mean_rows(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    by_attacker: dict[str, list[dict]] = {}
    for r in rows:
        by_attacker.setdefault(r["attacker"], []).append(r)
    # PSNR is +inf for an exact reconstruction: its median stays meaningful where a mean would not.
    return {
        a: {k: (statistics.median if k == "psnr" else statistics.fmean)([r[k] for r in rs]) for k in [*keys, "seconds"]}
        for a, rs in by_attacker.items()
    }


def fmt(v: float, digits: int = 3) -> str:
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", default=list(IMAGES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="no learned attackers (nothing is trained)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    t0 = time.perf_counter()
    rs_keys = ["direct", "neighbour", "perfect", "psnr", "ssim"]
    rs_table = ["| p | drop | gap | attacker | direct | neighbour | perfect | PSNR median (dB) | SSIM | s / image |",
                "|---|---|---|---|---|---|---|---|---|---|"]
    record: dict = {"rs": [], "mi": []}
    for p, drop, gap in RS_SETTINGS:
        argv = ["attack", "--scheme", "rs", "--patch-size", str(p), "--drop", str(drop), "--gap", str(gap),
                "--size", str(args.size), "--seed", str(args.seed), "--threads", "1", *args.images]
        if args.quick or gap:
            # A gap changes the image size (224 -> 192 at p = 16), i.e. another learned attacker to train; it is near
            # chance without a gap already, so the gap rows are the jigsaw's.
            argv += ["--attackers", "jigsaw"]
        rows = run_setting(argv)
        for attacker, m in mean_rows(rows, rs_keys).items():
            rs_table.append(f"| {p} | {drop:.0%} | {gap} | {attacker} | {fmt(m['direct'])} | {fmt(m['neighbour'])} | "
                            f"{fmt(m['perfect'], 2)} | {fmt(m['psnr'], 1)} | {fmt(m['ssim'])} | {m['seconds']:.2f} |")
        record["rs"].append({"patch_size": p, "drop": drop, "gap": gap, "rows": rows})
        print(rs_table[-1], file=sys.stderr, flush=True)
    mi_table = ["| p | g | attacker | PSNR median (dB) | SSIM | s / image |", "|---|---|---|---|---|---|"]
    for p, g in MI_SETTINGS:
        argv = ["attack", "--scheme", "mi", "--patch-size", str(p), "--grid", str(g), "--size", str(args.size),
                "--seed", str(args.seed), "--threads", "1", *args.images]
        if args.quick:
            argv += ["--attackers", "thumbnail,least-norm"]
        rows = run_setting(argv)
        for attacker, m in mean_rows(rows, ["psnr", "ssim"]).items():
            mi_table.append(f"| {p} | {g} | {attacker} | {fmt(m['psnr'], 1)} | {fmt(m['ssim'])} | {m['seconds']:.2f} |")
        record["mi"].append({"patch_size": p, "grid": g, "rows": rows})
        print(mi_table[-1], file=sys.stderr, flush=True)
    # jig21: the gap-aware jigsaw on the gap settings' ciphertext, and semantic inference (trained models cached).
    from attack_gap_solver import gap_solver_row, gap_solver_rows
    from attack_semantic import SEMANTIC_HEADER, semantic_row, semantic_rows

    gap_settings = [s for s in RS_SETTINGS if s[2]]
    record["gap_aware"] = gap_solver_rows(args.images, size=args.size, seed=args.seed, settings=gap_settings,
                                          solvers=("gap-aware",))  # fmt: skip
    rs_table += [gap_solver_row(r) for r in record["gap_aware"]]
    record["semantic"] = [] if args.quick else semantic_rows()
    sem_table = [*SEMANTIC_HEADER, *(semantic_row(r) for r in record["semantic"])] if record["semantic"] else []
    total = time.perf_counter() - t0

    env = environment("cpu")
    machine = f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, ppml {env['ppml_commit']}"
    print(f"Attacks on {', '.join(args.images)} at {args.size}×{args.size} (means over the images; PSNR: median), "
          f"{machine}; whole run {total:.0f} s\n")
    print("\n".join(rs_table) + "\n\n" + "\n".join(mi_table))
    if sem_table:
        print("\nSemantic inference (benchmarks/attack_semantic.py: digits at 32 px, p = 8):\n" + "\n".join(sem_table))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record |= {"images": args.images, "size": args.size, "seed": args.seed, "seconds": total, "environment": env}
    (RESULTS_DIR / f"attacks-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
