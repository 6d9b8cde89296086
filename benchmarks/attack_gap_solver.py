"""The gap defence against the gap-aware jigsaw solver, next to the border-reading solver it was measured with.

    python benchmarks/attack_gap_solver.py                       # p = 32, 16, 8 with a 2-pixel gap, 0 % and 25 % drop
    python benchmarks/attack_gap_solver.py --patch-sizes 16 --gaps 2 4
    python benchmarks/attack_gap_solver.py --images skimage:astronaut path/to/photo.jpg

The images, sizes and keys are those of ``benchmarks/attack_table.py`` (and so of ``ppml attack``): each image loaded
by ``ppml.show.load_inputs`` at ``--size`` px, encrypted by ``ppml.attacks.defences.encrypt_rs_defended`` with a
generator seeded by ``--seed`` (default 0), so the "border" rows reproduce the attack table's gap rows. Solvers on
the same ciphertext:

- ``border``: ``solve_jigsaw(encrypted, p, missing=...)``, the solver of the attack table (MGC reading the borders
  as if the pieces touched, greedy placement, no refinement);
- ``gap MGC only``: ``solve_jigsaw(..., gap=g, refine=False)``: MGC measured across the gap, greedy placement only;
- ``gap-aware``: ``solve_jigsaw(..., gap=g)``: MGC measured across the gap plus the refinement (swaps and rolls);
- ``gap-aware ×4``: the same with ``restarts=4`` (four seeds, the best-scoring arrangement kept).

Scores (means over the images, on the present tiles): direct comparison, direct comparison up to one translation
(``shifted_direct_comparison``), neighbour comparison, perfect reconstruction, the largest correctly assembled block
(``largest_correct_component``), PSNR (median) and SSIM of the reconstruction against the key holder's, seconds per
image. Threads: 1 (as the attack table), since the machine is usually shared. Prints Markdown with the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SOLVERS = {
    "border": {},
    "gap MGC only": {"gap": None, "refine": False},
    "gap-aware": {"gap": None},
    "gap-aware ×4": {"gap": None, "restarts": 4},
}
KEYS = ("direct", "shifted", "neighbour", "perfect", "component", "psnr", "ssim", "seconds")


def gap_solver_rows(
    images: list[str] | None = None,
    *,
    size: int = 224,
    seed: int = 0,
    settings: list[tuple[int, float, int]] | None = None,
    solvers: tuple[str, ...] = tuple(SOLVERS),
) -> list[dict]:
    """One row per (p, drop, gap, solver): the scores as means over the images (PSNR: median).

    Args:
        images: ``ppml attack`` inputs (default: the attack table's three held-out photos).
        size, seed: as ``ppml attack --size --seed``.
        settings: ``(p, drop, gap)`` triples (default: p = 32, 16, 8 with gap 2, drop 0 and 0.25).
        solvers: names from :data:`SOLVERS`.

    Returns:
        dicts with ``p, drop, gap, attacker`` and :data:`KEYS` — the attack table's columns plus ``shifted`` and
        ``component``, so ``benchmarks/attack_table.py`` can print them as rows.
    """
    from ppml import unshuffle_patches
    from ppml.attacks import (
        direct_comparison,
        largest_correct_component,
        neighbor_comparison,
        perfect_reconstruction,
        psnr,
        shifted_direct_comparison,
        solve_jigsaw,
        ssim,
    )
    from ppml.attacks.defences import encrypt_rs_defended
    from ppml.show import load_inputs

    images = list(images or ("skimage:astronaut", "skimage:coffee", "skimage:chelsea"))
    settings = settings or [(p, drop, 2) for p in (32, 16, 8) for drop in (0.0, 0.25)]
    batch = torch.cat([load_inputs(item, size=size, op="attack_gap_solver") for item in images])
    out = []
    for p, drop, gap in settings:
        enc = encrypt_rs_defended(batch, p, drop=drop, gap=gap, generator=torch.Generator().manual_seed(seed))
        ideal = unshuffle_patches(enc.encrypted, enc.perm, p)
        for name in solvers:
            kwargs = {k: (gap if v is None else v) for k, v in SOLVERS[name].items()}
            t0 = time.perf_counter()
            perm_hat = solve_jigsaw(enc.encrypted, p, missing=~enc.present, **kwargs)
            secs = (time.perf_counter() - t0) / len(images)
            recon = unshuffle_patches(enc.encrypted, perm_hat, p)
            args = (perm_hat, enc.perm)
            scores = {
                "direct": direct_comparison(*args, enc.present),
                "shifted": shifted_direct_comparison(*args, enc.grid, enc.present),
                "neighbour": neighbor_comparison(*args, enc.grid, enc.present),
                "perfect": perfect_reconstruction(*args, enc.present).float(),
                "component": largest_correct_component(*args, enc.grid, enc.present),
            }
            row = {"p": p, "drop": drop, "gap": gap, "attacker": f"jigsaw {name}"}
            row |= {k: float(v.float().mean()) for k, v in scores.items()}
            row["psnr"] = statistics.median(psnr(recon, ideal).tolist())
            row["ssim"] = float(ssim(recon, ideal).mean())
            row["seconds"] = secs
            out.append(row)
    return out


def gap_solver_row(row: dict) -> str:
    """One row of :func:`gap_solver_rows` as a line of the attack table
    (``| p | drop | gap | attacker | direct | neighbour | perfect | PSNR | SSIM | s / image |``)."""
    psnr = "inf" if row["psnr"] == float("inf") else f"{row['psnr']:.1f}"
    return (
        f"| {row['p']} | {row['drop']:.0%} | {row['gap']} | {row['attacker']} | {row['direct']:.3f} | "
        f"{row['neighbour']:.3f} | {row['perfect']:.2f} | {psnr} | {row['ssim']:.3f} | {row['seconds']:.2f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patch-sizes", type=int, nargs="+", default=[32, 16, 8])
    ap.add_argument("--gaps", type=int, nargs="+", default=[2])
    ap.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.25])
    args = ap.parse_args()
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _timing import environment

    torch.set_num_threads(1)
    settings = [(p, d, g) for p in args.patch_sizes for g in args.gaps for d in args.drops]
    t0 = time.perf_counter()
    head = (
        "| p | drop | gap | solver | direct | shifted direct | neighbour | perfect | largest block | PSNR median (dB) "
        "| SSIM | s / image |"
    )
    lines = [head, "|" + "---|" * 12]
    rows = []
    for setting in settings:
        for r in gap_solver_rows(args.images, size=args.size, seed=args.seed, settings=[setting]):
            rows.append(r)
            psnr = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.1f}"
            lines.append(
                f"| {r['p']} | {r['drop']:.0%} | {r['gap']} | {r['attacker'].removeprefix('jigsaw ')} | "
                f"{r['direct']:.3f} | {r['shifted']:.3f} | {r['neighbour']:.3f} | {r['perfect']:.2f} | "
                f"{r['component']:.3f} | {psnr} | {r['ssim']:.3f} | {r['seconds']:.2f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    env = environment("cpu")
    print(
        f"Gap-aware jigsaw on {', '.join(args.images or ['the held-out photos'])} at {args.size} px, seed {args.seed}; "
        f"{env['cpu']}, {env['cores']} cores, 1 thread, torch {env['torch']}, ppml {env['ppml_commit']}, "
        f"load average {env['load_average_1min']:.1f}; whole run {time.perf_counter() - t0:.0f} s\n"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
