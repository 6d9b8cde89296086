"""``ppml attack``: run the attacks on images encrypted here, print how much they recover, draw what they see.

    ppml attack --scheme rs --patch-size 16 skimage:astronaut skimage:coffee
    ppml attack --scheme rs --patch-size 16 --drop 0.25 --gap 2 photos/ --out runs/attack-rs16
    ppml attack --scheme mi --patch-size 16 --grid 4 skimage:chelsea

The images (files, folders, ``digits`` or ``skimage:NAME``, as for ``ppml show``) are encrypted with a fresh key from
``--seed`` (default OS entropy), then each attacker of the scheme runs on the ciphertext alone:

- RS: ``jigsaw`` (:func:`ppml.attacks.solve_jigsaw`, MGC compatibility, gap-aware with ``--gap``) and ``vit`` (the learned position attacker,
  :mod:`ppml.attacks.learned`, trained on public images: loaded from its cache, trained there first if missing — a
  line on stderr says so before training, with the cache file and a rough duration).
  Scores: direct / neighbour comparison and perfect reconstruction on the present tiles, and PSNR / SSIM of the
  reconstruction against the best one possible (the true key applied to the same ciphertext: dropped tiles stay
  blank in both).
- MI: the inversions of :mod:`ppml.attacks.mi_inversion` (``thumbnail``: bicubic upsampling of the exact patch means;
  ``least-norm``; ``smooth``: least-norm plus a smoothness prior, still exactly consistent; ``decoder``: the learned
  decoder, cached or trained first), scored by PSNR / SSIM against the plain image (reconstructions clamped to
  0..255).

Prints a Markdown table (one row per image and attacker, with the seconds each attack took) and, with ``--out DIR``,
writes ``DIR/attack.json`` and ``DIR/<attacker>.png`` (one row per image: plain | ciphertext | reconstruction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_CMD = "ppml attack"
DEFAULT_IMAGES = ("skimage:astronaut", "skimage:coffee", "skimage:chelsea")
RS_ATTACKERS = ("jigsaw", "vit")
MI_ATTACKERS = ("thumbnail", "least-norm", "smooth", "decoder")
# Seconds the first (training) run of a learned attacker took at its default budget on 224 px images, on the 2-core
# development VM (README: vit per p, decoder per g at p = 16): the base of the estimate printed before training.
_MEASURED_S = {"vit": {32: 114, 16: 144, 8: 77}, "decoder": {2: 69, 4: 52}}


@dataclass
class Attempt:
    """What one attacker produced for a batch: a key estimate (RS) or a reconstruction, and the seconds it took."""

    reconstruction: Tensor
    seconds: float
    perm_hat: Tensor | None = None


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _announce_training(name: str, what: str, default_steps: int, scale: float, args: argparse.Namespace):
    """The ``on_train`` hook of the learned attackers: before a first run trains one, says so on stderr — once, into
    the cache, how long roughly, reused next time."""
    table = _MEASURED_S[name]
    key = args.patch_size if name == "vit" else args.grid

    def announce(info: dict) -> None:
        base = table[min(table, key=lambda q: (abs(q - key), q))]
        secs = base * scale * (info["end"] - info["steps_done"]) / default_steps
        eta = f"about {secs / 60:.0f} min" if secs >= 90 else f"about {max(secs, 1):.0f} s"
        resumed = f", resuming at step {info['steps_done']}" if info["steps_done"] else ""
        print(f"[{_CMD}] {name}: training the {what} ({info['steps']} steps{resumed}; {eta} on 2 CPU cores, less on "
              f"more). This happens once: it is cached in {info['checkpoint']} and reused by the next runs with "
              "these settings (an interrupted run resumes).", file=sys.stderr, flush=True)  # fmt: skip

    return announce


def _rs_attack(name: str, encrypted: Tensor, missing: Tensor, p: int, args: argparse.Namespace) -> Attempt:
    from .. import unshuffle_patches

    if name == "jigsaw":
        from .jigsaw import solve_jigsaw

        perm_hat, secs = _timed(lambda: solve_jigsaw(encrypted, p, missing=missing, restarts=args.restarts, gap=args.gap))
    else:
        from .learned import assign_positions, attacker_settings, predict_position_logits, train_position_attacker

        # Loaded from the cache when a finished run with these settings is there; trained (resumably) otherwise.
        default = attacker_settings(p)
        settings = default | ({"steps": args.train_steps} if args.train_steps else {})
        size = encrypted.shape[-1]
        hook = _announce_training("vit", f"learned RS position attacker for p = {p}, {size} px", default["steps"],
                                  (size / 224) ** 2, args)  # fmt: skip
        model = train_position_attacker(p, size, **settings, checkpoint="auto", progress=not args.no_progress,
                                        threads=args.threads, on_train=hook)  # fmt: skip

        def solve() -> Tensor:
            logp = predict_position_logits(model, encrypted, p)
            # A blank (dropped) tile says nothing about its cell: a flat row lets the present tiles choose first.
            return assign_positions(logp.masked_fill(missing[..., None], 0.0))

        perm_hat, secs = _timed(solve)
    return Attempt(unshuffle_patches(encrypted, perm_hat, p), secs, perm_hat)


def _mi_attack(name: str, cipher: Tensor, p: int, g: int, args: argparse.Namespace) -> Attempt:
    from . import mi_inversion as inv

    decoder = None
    if name == "decoder":
        settings = inv.DECODER_SETTINGS | ({"steps": args.train_steps} if args.train_steps else {})
        hook = _announce_training("decoder", f"learned MI decoder for p = {p}, g = {g}",
                                  inv.DECODER_SETTINGS["steps"], (p / 16) ** 2, args)  # fmt: skip
        decoder = inv.train_unmix_decoder(p, g, img_size=cipher.shape[-1] * g, **settings, checkpoint="auto",
                                          progress=not args.no_progress, threads=args.threads,
                                          on_train=hook)  # fmt: skip
    method = name.replace("-", "_")
    recon, secs = _timed(lambda: inv.unmix(cipher, p, g, method, decoder=decoder, value_range=(0, 255)))
    return Attempt(recon, secs)


def _check_args(args: argparse.Namespace) -> list[str]:
    """Validates the options; returns the attackers to run."""
    known = RS_ATTACKERS if args.scheme == "rs" else MI_ATTACKERS
    attackers = list(known) if args.attackers in (None, "all") else [a.strip() for a in args.attackers.split(",")]
    bad = [a for a in attackers if a not in known]
    if bad or not attackers:
        raise ValueError(f"{_CMD}: --attackers for --scheme {args.scheme} must be 'all' or a comma list of "
                         f"{', '.join(known)}, got {args.attackers!r}")
    if args.patch_size < 2:
        raise ValueError(f"{_CMD}: --patch-size must be an int >= 2, got {args.patch_size}")
    if not 0.0 <= args.drop < 1.0:
        raise ValueError(f"{_CMD}: --drop must be a share in [0, 1), got {args.drop}")
    if args.gap < 0:
        raise ValueError(f"{_CMD}: --gap must be an int >= 0, got {args.gap}")
    if args.scheme == "mi":
        if args.drop or args.gap:
            raise ValueError(f"{_CMD}: --drop and --gap are RS defences; --scheme mi takes --grid only")
        if args.grid < 1 or args.patch_size % args.grid:
            raise ValueError(f"{_CMD}: --grid must be an int >= 1 dividing --patch-size {args.patch_size}, got "
                             f"{args.grid}")
    if args.size % args.patch_size and not args.gap:
        raise ValueError(f"{_CMD}: --size {args.size} must be divisible by --patch-size {args.patch_size}")
    if args.out is not None and os.path.exists(os.path.join(args.out, "attack.json")) and not args.force:
        raise FileExistsError(f"{_CMD}: {os.path.join(args.out, 'attack.json')} exists; pass --force to overwrite")
    return attackers


def run_attack(args: argparse.Namespace) -> int:
    """Runs ``ppml attack``; returns 0 (bad options raise ValueError / FileNotFoundError naming the option)."""
    from .. import mix_subpatches
    from ..show import compose_columns, load_inputs, mi_display, to_uint8
    from .defences import encrypt_rs_defended
    from .metrics import direct_comparison, neighbor_comparison, perfect_reconstruction, psnr, ssim

    attackers = _check_args(args)
    inputs = list(args.images) or list(DEFAULT_IMAGES)
    names, batches = [], []
    for item in inputs:
        batch = load_inputs(item, size=args.size, count=args.count, op=_CMD)
        batches.append(batch)
        names += [item] if batch.shape[0] == 1 else [f"{item}[{i}]" for i in range(batch.shape[0])]
    images = torch.cat(batches)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    p, rows, figures = args.patch_size, [], {}

    if args.scheme == "rs":
        enc = encrypt_rs_defended(images, p, drop=args.drop, gap=args.gap, generator=generator)
        from .. import unshuffle_patches

        ideal = unshuffle_patches(enc.encrypted, enc.perm, p)  # the key holder's view: dropped tiles blank in place
        shown_cipher, plain = enc.encrypted, enc.plain
        for name in attackers:
            att = _rs_attack(name, enc.encrypted, ~enc.present, p, args)
            scores = {
                "direct": direct_comparison(att.perm_hat, enc.perm, enc.present),
                "neighbour": neighbor_comparison(att.perm_hat, enc.perm, enc.grid, enc.present),
                "perfect": perfect_reconstruction(att.perm_hat, enc.perm, enc.present).float(),
                "psnr": psnr(att.reconstruction, ideal),
                "ssim": ssim(att.reconstruction, ideal),
            }
            rows += _rows(names, name, scores, att.seconds)
            figures[name] = att.reconstruction
        setting = {"scheme": "rs", "patch_size": p, "drop": args.drop, "gap": args.gap, "grid": list(enc.grid)}
    else:
        g = args.grid
        cipher = mix_subpatches(images, patch_size=p, grid=g)  # float32, 0..255
        shown_cipher = mi_display(cipher, g)
        plain = images
        for name in attackers:
            att = _mi_attack(name, cipher, p, g, args)
            recon = att.reconstruction.float().clamp(0, 255)
            scores = {"psnr": psnr(recon, images), "ssim": ssim(recon, images)}
            rows += _rows(names, name, scores, att.seconds)
            figures[name] = recon
        setting = {"scheme": "mi", "patch_size": p, "grid": g}

    print(_markdown(rows, args.scheme))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        for name, recon in figures.items():
            fig = compose_columns(
                [to_uint8(plain), to_uint8(shown_cipher), to_uint8(recon)],
                ["plain", f"{args.scheme.upper()} ciphertext", f"{name} reconstruction"],
                ["plain", "cipher", name],
            )
            fig.save(os.path.join(args.out, f"{name}.png"))
        record = {"setting": setting, "size": args.size, "seed": args.seed, "images": names, "rows": rows}
        with open(os.path.join(args.out, "attack.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"[{_CMD}] wrote {args.out}/attack.json and {', '.join(f'{n}.png' for n in figures)}", file=sys.stderr)
    return 0


def _rows(names: list[str], attacker: str, scores: dict[str, Tensor], seconds: float) -> list[dict]:
    per_image = seconds / len(names)
    return [
        {"image": n, "attacker": attacker, **{k: float(v[i]) for k, v in scores.items()}, "seconds": per_image}
        for i, n in enumerate(names)
    ]


def _markdown(rows: list[dict], scheme: str) -> str:
    cols = ["direct", "neighbour", "perfect", "psnr", "ssim"] if scheme == "rs" else ["psnr", "ssim"]
    head = ["image", "attacker", *cols, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [f"{r[c]:.3f}" if c != "psnr" else f"{r[c]:.2f}" for c in cols]
        lines.append(f"| {r['image']} | {r['attacker']} | " + " | ".join(vals) + f" | {r['seconds']:.2f} |")
    return "\n".join(lines)


def add_attack_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``attack`` on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "attack",
        help="attack RS / MI ciphertext of your images and report what leaks",
        description="Encrypt the images here, run the attacks of the scheme on the ciphertext alone (plus p, the "
        "grid and which tiles are blank), print how much each recovers, and draw what it sees. The key is drawn "
        "here and used only to score them.",
    )
    p.add_argument("images", nargs="*", metavar="IMAGES",
                   help="image files, folders, 'digits' or 'skimage:NAME' (default: the held-out photos "
                   f"{' '.join(DEFAULT_IMAGES)})")
    p.add_argument("--scheme", choices=("rs", "mi"), required=True)
    p.add_argument("--patch-size", type=int, default=16, help="RS / MI patch size p")
    p.add_argument("--drop", type=float, default=0.0, help="RS: share of tiles blanked (patch-drop defence)")
    p.add_argument("--gap", type=int, default=0, help="RS: pixels discarded between neighbouring patches")
    p.add_argument("--grid", type=int, default=2, help="MI: g×g sub-patches per patch")
    p.add_argument("--attackers", default="all",
                   help=f"'all' or a comma list: rs {','.join(RS_ATTACKERS)}; mi {','.join(MI_ATTACKERS)}")
    p.add_argument("--size", type=int, default=224, help="images are resized and centre-cropped to S×S")
    p.add_argument("--count", type=int, default=4, help="images taken from a folder or 'digits'")
    p.add_argument("--restarts", type=int, default=1, help="jigsaw: seeds grown per image")
    p.add_argument("--train-steps", type=int, default=None,
                   help="vit / decoder: training steps (default: ppml.attacks.learned.ATTACKER_SETTINGS / "
                   "ppml.attacks.mi_inversion.DECODER_SETTINGS); "
                   "a finished attacker with the same settings is loaded from the cache (~/.cache/ppml/attacks or "
                   "$PPML_CACHE_DIR), an interrupted one resumed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training the learned attackers (default: torch's; 1 is faster on a busy "
                   "machine)")
    p.add_argument("--seed", type=int, default=None, help="seed the keys and dropped tiles (default: OS entropy)")
    p.add_argument("--out", default=None, help="folder for attack.json and one PNG per attacker (default: none, "
                   "the table is printed only)")
    p.add_argument("--force", action="store_true", help="overwrite an earlier --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_attack)
    return p
