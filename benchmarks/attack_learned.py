"""Learned attacks on the held-out photos: the ViT position attacker against RS, the MI inversions.

Run from the repository root::

    python benchmarks/attack_learned.py                 # trains what is not cached (about 8 min on a busy 2-core VM)
    python benchmarks/attack_learned.py --retrain       # ignore the cache
    python benchmarks/attack_learned.py --cache DIR     # weights kept in DIR (default: ~/.cache/ppml/attacks)
    python benchmarks/attack_learned.py --scale 0.02    # a smoke run: 2 % of the training steps

Targets: scikit-image's astronaut, coffee and chelsea (``ppml.attacks.HELD_OUT``), each resized whole to 224×224
(uint8, antialiased bilinear; ``ppml.attacks.load_photo``). The attackers train only on the other bundled
scikit-image photos and scikit-learn's digits (``ppml.attacks.public_images``; ``skimage.data.cat`` is chelsea and is
excluded with it).

RS table, per patch size p ∈ {8, 16, 32} (N = 784, 196, 49 tiles): one seeded key per image (the attacker has no
position embedding, so its per-tile predictions follow the tiles wherever a key puts them), the ViT attacker's
position accuracy (per-tile argmax), then the permutation from the Hungarian assignment scored by direct comparison,
neighbour comparison and perfect reconstruction (means over the 3 images), its training seconds (summed over
resumptions; from the checkpoint when cached) and inference seconds (3 images: forward + assignment). For context,
the same ciphertexts attacked by ``ppml.attacks.solve_jigsaw`` (MGC, no learning). Chance position accuracy is 1/N.

MI table, p = 16, g ∈ {2, 4} (plain mean): thumbnail (bicubic, clamped to 0..255), least-norm, smooth (CG, clamped),
the learned decoder (clamped): PSNR and SSIM (``ppml.attacks.psnr`` / ``ssim``, data range 255) as means over the 3
images, and seconds for the 3 images.

Threads: ``--threads 1`` by default. On the shared 2-core VM where this was written, other processes keep the cores
busy, and with 2 threads every small op waits for a scheduler tick: the p = 32 attacker's step took 50 ms per image
with 2 threads against 8 with 1, the CG solve 10× longer. Pass ``--threads 2`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

# Run as a script, so benchmarks/ is on sys.path and the shared helpers import by their module name.
from _timing import CpuContention, environment

import ppml
from ppml import attacks as A
from ppml.attacks.mi_inversion import DECODER_SETTINGS

IMG = 224
# Per patch size: the attacker's settings and training budget, the library's (so `ppml attack` shares the cache).
ATTACKERS = {p: A.attacker_settings(p) for p in (32, 16, 8)}  # copies: --scale may change them
DECODERS = {g: dict(DECODER_SETTINGS) for g in (2, 4)}
MI_PATCH = 16


def _log(msg: str) -> None:
    print(f"[attack_learned] {msg}", file=sys.stderr, flush=True)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _train(kind: str, fn, **kw):
    """Trains (resumes, or loads from the cache) one attacker; returns (model, cached?)."""
    model = fn(**kw, checkpoint="auto", progress=sys.stderr.isatty(), threads=torch.get_num_threads())
    cached = model.train_info["steps_this_call"] == 0
    _log(f"{kind}: {'cached' if cached else 'trained'} ({model.train_info['seconds']:.0f} s of training, "
         f"final loss {model.train_info['loss']:.3f}) -> {model.train_info['checkpoint']}")  # fmt: skip
    return model, cached


def rs_table(images: torch.Tensor) -> list[str]:
    rows = [
        "| p | N | attack | position acc. | chance | direct | neighbour | perfect | train s | infer s (3 img) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, cfg in ATTACKERS.items():
        n = (IMG // p) ** 2
        grid = (IMG // p, IMG // p)
        enc, perm = ppml.shuffle_patches(images, p, generator=torch.Generator().manual_seed(p))
        model, cached = _train(f"RS attacker p={p}", A.train_position_attacker, patch_size=p, img_size=IMG, **cfg)

        def attack(model=model, enc=enc, p=p):
            lp = A.predict_position_logits(model, enc, p)
            return lp, A.assign_positions(lp)

        (lp, perm_hat), infer_s = _timed(attack)
        acc = A.position_accuracy(lp, perm).mean().item()
        d, nb = A.direct_comparison(perm_hat, perm).mean().item(), A.neighbor_comparison(perm_hat, perm, grid).mean()
        pr = A.perfect_reconstruction(perm_hat, perm).float().mean().item()
        train_s = f"{model.train_info['seconds']:.0f}" + (" (cached)" if cached else "")
        rows.append(f"| {p} | {n} | ViT attacker ({cfg['dim']}×{cfg['depth']}, {cfg['steps']}×{cfg['batch_size']} "
                    f"images) | {acc:.3f} | {1 / n:.3f} | {d:.3f} | {nb.item():.3f} | {pr:.2f} | {train_s} | "
                    f"{infer_s:.2f} |")  # fmt: skip
        jig, jig_s = _timed(lambda enc=enc, p=p: A.solve_jigsaw(enc, p))
        rows.append(f"| {p} | {n} | solve_jigsaw (MGC) | – | – | {A.direct_comparison(jig, perm).mean():.3f} | "
                    f"{A.neighbor_comparison(jig, perm, grid).mean():.3f} | "
                    f"{A.perfect_reconstruction(jig, perm).float().mean():.2f} | – | {jig_s:.2f} |")  # fmt: skip
        _log(f"p={p}: position acc {acc:.3f}, direct {d:.3f}; jigsaw direct {A.direct_comparison(jig, perm).mean():.3f}"
             )  # fmt: skip
    return rows


def mi_table(images: torch.Tensor) -> list[str]:
    rows = [
        f"| g | method | PSNR dB | SSIM | per image PSNR ({', '.join(A.HELD_OUT)}) | s (3 img) | train s |",
        "|---:|---|---:|---:|---|---:|---:|",
    ]
    p, rng = MI_PATCH, (0, 255)
    for g, cfg in DECODERS.items():
        mixed = ppml.mix_subpatches(images, p, g)  # float32 0..255
        dec, cached = _train(f"MI decoder g={g}", A.train_unmix_decoder, patch_size=p, grid=g, img_size=IMG, **cfg)
        methods = {
            "thumbnail (bicubic)": lambda m=mixed, g=g: A.unmix_thumbnail(m, p, g, value_range=rng),
            "least-norm": lambda m=mixed, g=g: A.unmix_least_norm(m, p, g),
            "smooth (CG)": lambda m=mixed, g=g: A.unmix_smooth(m, p, g, value_range=rng),
            "learned decoder": lambda m=mixed, g=g, dec=dec: A.unmix_with_decoder(dec, m, p, g, value_range=rng),
        }
        for name, fn in methods.items():
            rec, secs = _timed(fn)
            ps, ss = A.psnr(rec, images), A.ssim(rec, images)
            train_s = "–"
            if name == "learned decoder":
                train_s = f"{dec.train_info['seconds']:.0f}" + (" (cached)" if cached else "")
            rows.append(f"| {g} | {name} | {ps.mean():.2f} | {ss.mean():.3f} | "
                        f"{', '.join(f'{v:.2f}' for v in ps.tolist())} | {secs:.2f} | {train_s} |")  # fmt: skip
            _log(f"MI g={g} {name}: PSNR {ps.mean():.2f} SSIM {ss.mean():.3f}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the module doc)")
    ap.add_argument("--cache", default=None, help="where trained attackers are kept (sets PPML_CACHE_DIR)")
    ap.add_argument("--retrain", action="store_true", help="train again even if a cached checkpoint exists")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training budget (steps) by this, e.g. "
                    "0.02 for a smoke run")  # fmt: skip
    args = ap.parse_args()
    if args.cache:
        os.environ["PPML_CACHE_DIR"] = args.cache
    torch.set_num_threads(args.threads)
    if args.scale != 1:
        for cfg in (*ATTACKERS.values(), *DECODERS.values()):
            cfg["steps"] = max(1, round(cfg["steps"] * args.scale))
    if args.retrain:  # every cached attacker of these kinds and sizes
        patterns = [f"rs-attacker-p{p}-{IMG}-*.pt" for p in ATTACKERS]
        patterns += [f"mi-decoder-p{MI_PATCH}-g{g}-*.pt" for g in DECODERS]
        for path in (f for pat in patterns for f in glob.glob(os.path.join(A.cache_dir(), pat))):
            _log(f"--retrain: removing {path}")
            os.remove(path)
    env = environment("cpu")
    images = torch.stack([A.load_photo(name, IMG) for name in A.HELD_OUT])  # uint8 [3, 3, 224, 224]
    t0 = time.perf_counter()
    with CpuContention() as contention:
        rs = rs_table(images)
        mi = mi_table(images)
    total = time.perf_counter() - t0
    share = contention.other_share
    print(f"\n{env['cpu']} · {env['cores']} cores, {args.threads} torch thread(s) · torch {env['torch']} · ppml "
          f"{env['ppml_commit']} · {env['date']} · total {total:.0f} s · load average at start "
          f"{env['load_average_1min']:.2f}, CPU taken by other processes during the run: "
          f"{'n/a' if share is None else f'{100 * share:.0f} %'}")  # fmt: skip
    print(f"\n### RS: learned position attacker vs the jigsaw solver, {IMG}×{IMG}, held-out {', '.join(A.HELD_OUT)}\n")
    print("\n".join(rs))
    print(f"\n### MI inversion, p = {MI_PATCH}, {IMG}×{IMG}, held-out {', '.join(A.HELD_OUT)}\n")
    print("\n".join(mi))
    print(f"\nCache: {A.cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
