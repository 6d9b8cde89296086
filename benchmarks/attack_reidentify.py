"""Gallery linkage (``ppml.attacks.reidentify``): how often a ciphertext is linked to its plaintext among G candidates.

    python benchmarks/attack_reidentify.py                       # the RESULTS table: 224 px, G = 100 / 1,000 / 5,000
    python benchmarks/attack_reidentify.py --size 128 --galleries 100 1000 --queries 50    # quicker

The gallery (deterministic, ``--seed``): the 200 images of ``skimage.data.lfw_subset`` (faces and non-faces, 25×25
grey, upscaled), 20 % random crops of the training digits (8×8, upscaled; ``ppml.attacks.sample_crops``) and the rest
random crops of scikit-image's bundled public photos (height 60-100 % of the photo's, aspect 2/3-3/2, flips), shuffled.
Crops of one photo overlap, so the gallery is full of near-duplicates — the hard case for linkage. The queries are the
first ``--queries`` gallery images (so they are in every gallery size; a larger gallery only adds distractors),
encrypted with seeded keys, then left as they are, re-encoded as JPEG (Pillow, quality 90 / 75) or moved one pixel
right and down (edge repeated). RS: p = 8, 16, 32, without a defence, with 25 % of the tiles dropped, with a 2-pixel
gap; MI: p = 16, g = 2 and 4, the mean mix and the keyed mix (secret convex weights), the latter attacked both by the
affine fit (``keyed=True``) and by recomputing the mean mix as if there were no key.

Prints a Markdown table of top-1 accuracy with 95 % Wilson intervals and the seconds per query at the largest
gallery, with the machine; writes ``benchmarks/results/reidentify-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import environment
from PIL import Image

import ppml
from ppml.attacks import index_gallery, reidentify, sample_crops
from ppml.attacks.defences import encrypt_rs_defended

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PERTURBATIONS = ("none", "jpeg90", "jpeg75", "shift1")
RS_SETTINGS = [(p, drop, gap) for p in (8, 16, 32) for drop, gap in ((0.0, 0), (0.25, 0), (0.0, 2))]
# (p, g, the ciphertext's mix, the attacker's model): a keyed ciphertext is attacked both by the affine fit and by the
# plain recomputed mean mix (the weights average out in the descriptors' cell means).
MI_SETTINGS = [
    (16, g, mix, model) for g in (2, 4) for mix, model in (("mean", "mean"), ("keyed", "fit"), ("keyed", "mean"))
]


def build_gallery(n: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """uint8 [n, 3, S, S] and each image's source ("lfw", "digit", "photo"), shuffled by ``seed``."""
    from skimage import data

    gen = torch.Generator().manual_seed(seed)
    lfw = torch.from_numpy(np.asarray(data.lfw_subset(), dtype=np.float64))[:, None][:n]
    lfw = lfw / 255 if lfw.max() > 1 else lfw
    lfw = F.interpolate(lfw, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    n_digit = round(0.2 * n)
    n_photo = n - lfw.shape[0] - n_digit
    parts, kinds = [lfw.float()], ["lfw"] * lfw.shape[0]
    for kind, count in (("digits", n_digit), ("photos", n_photo)):
        for start in range(0, count, 256):
            parts.append(sample_crops(min(256, count - start), size, gen, data=kind))
        kinds += [kind.rstrip("s")] * count
    images = (torch.cat(parts) * 255).round().to(torch.uint8)
    order = torch.randperm(n, generator=gen)
    return images[order].contiguous(), [kinds[i] for i in order.tolist()]


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out)


def perturb(x: torch.Tensor, how: str) -> torch.Tensor:
    """The ciphertext as the attacker finds it: as made, JPEG re-encoded, or moved 1 px right and down."""
    if how == "none":
        return x
    if how.startswith("jpeg"):
        as_bytes = x if x.dtype == torch.uint8 else x.round().clamp(0, 255).to(torch.uint8)
        out = jpeg(as_bytes, int(how[4:]))
        return out if x.dtype == torch.uint8 else out.to(x.dtype)
    if how == "shift1":
        moved = F.pad(x.float(), (1, 0, 1, 0), mode="replicate")[..., :-1, :-1]
        return moved.round().to(x.dtype) if x.dtype == torch.uint8 else moved.to(x.dtype)
    raise ValueError(how)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(hits: int, n: int) -> str:
    lo, hi = wilson(hits, n)
    return f"{100 * hits / n:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--galleries", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("rs", "mi"), default=None, help="one scheme only")
    ap.add_argument("--shortlist", type=int, default=16, help="RS: candidates re-ranked per ciphertext")
    ap.add_argument("--fit-max-gallery", type=int, default=1000,
                    help="MI keyed fit: skip larger galleries (its cost is M·G·H·W·C multiply-adds)")  # fmt: skip
    args = ap.parse_args()
    sizes = sorted(args.galleries)
    m = min(args.queries, sizes[0])
    t_all = time.perf_counter()
    gallery, kinds = build_gallery(sizes[-1], args.size, args.seed)
    truth = torch.arange(m)
    print(f"gallery: {sizes[-1]} images at {args.size} px ({kinds.count('photo')} photo crops, "
          f"{kinds.count('digit')} digits, {kinds.count('lfw')} LFW); queries: the first {m} "
          f"({', '.join(f'{kinds[:m].count(k)} {k}' for k in ('photo', 'digit', 'lfw'))}); built in "
          f"{time.perf_counter() - t_all:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    head = "| scheme | setting | defence / MI variant | ciphertext | " + " | ".join(f"G = {g:,}" for g in sizes)
    table = [head + " | s / query |", "|" + "---|" * (5 + len(sizes))]
    record: list[dict] = []

    def report(scheme: str, setting: str, defence: str, index, make_cipher, index_s: float, **kw) -> None:
        for how in PERTURBATIONS:
            cipher, present = make_cipher()
            cipher = perturb(cipher, how)
            row, secs = {}, 0.0
            for g in sizes:
                if kw.get("keyed") and g > args.fit_max_gallery:
                    continue
                t0 = time.perf_counter()
                found = reidentify(cipher, index.head(g), scheme=scheme, present=present, **kw)
                secs = time.perf_counter() - t0
                hits = int((found.index == truth).sum())
                row[g] = {"hits": hits, "n": m, "seconds": secs, "exact": float(found.exact.mean())}
            table.append(f"| {scheme.upper()} | {setting} | {defence} | {how} | "
                         + " | ".join(cell(row[g]["hits"], m) if g in row else "—" for g in sizes)
                         + f" | {secs / m:.3f} (G = {max(row):,}) |")  # fmt: skip
            record.append({"scheme": scheme, "setting": setting, "defence": defence, "ciphertext": how,
                           "index_seconds": index_s, "galleries": row})  # fmt: skip
            print(table[-1], file=sys.stderr, flush=True)

    if args.only in (None, "rs"):
        for p, drop, gap in RS_SETTINGS:
            t0 = time.perf_counter()
            index = index_gallery(gallery, scheme="rs", patch_size=p, gap=gap)
            index_s = time.perf_counter() - t0
            defence = "drop 25 %" if drop else (f"gap {gap}" if gap else "none")

            def make(p=p, drop=drop, gap=gap):
                enc = encrypt_rs_defended(gallery[:m], p, drop=drop, gap=gap,
                                          generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
                return enc.encrypted, enc.present

            report("rs", f"p = {p}", defence, index, make, index_s, patch_size=p, gap=gap, shortlist=args.shortlist)
    if args.only in (None, "mi"):
        for p, g, mix, model in MI_SETTINGS:
            keyed = model == "fit"
            grid = p // g if keyed else 2  # the fit: full resolution (more numbers per block than weights)
            t0 = time.perf_counter()
            index = index_gallery(gallery, scheme="mi", patch_size=p, grid=grid, mix_grid=g, keyed=keyed)
            index_s = time.perf_counter() - t0
            n_patches = (args.size // p) ** 2

            def make(p=p, g=g, mix=mix, n_patches=n_patches):
                gen = torch.Generator().manual_seed(args.seed)
                w = ppml.random_mixing_weights(m, n_patches, grid=g, generator=gen) if mix == "keyed" else None
                return ppml.mix_subpatches(gallery[:m], p, g, w), None

            report("mi", f"p = {p}, g = {g}", f"{mix} mix, {model} attack", index, make, index_s, patch_size=p,
                   grid=grid, mix_grid=g, keyed=keyed)  # fmt: skip
    total = time.perf_counter() - t_all
    env = environment("cpu")
    machine = f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, ppml {env['ppml_commit']}"
    print(f"Gallery linkage, top-1 % [95 % Wilson interval] over {m} queries, {args.size} px; {machine}; whole run "
          f"{total:.0f} s\n")  # fmt: skip
    print("\n".join(table))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = {"size": args.size, "galleries": sizes, "queries": m, "seed": args.seed, "seconds": total,
           "rows": record, "environment": env}  # fmt: skip
    (RESULTS_DIR / f"reidentify-{stamp}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
