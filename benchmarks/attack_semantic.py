"""Semantic inference on RS ciphertext without the key: an attacker's classifier against the owner's.

    python benchmarks/attack_semantic.py                  # trains what is not cached (a few minutes on 2 CPU cores)
    python benchmarks/attack_semantic.py --cache DIR      # weights kept in DIR (default: ppml.attacks.cache_dir())
    python benchmarks/attack_semantic.py --steps 40       # a smoke run

Data: scikit-learn's digits (``ppml.data.load_digits``) bilinearly upscaled to 32 px, RS at p = 8 (a 4×4 grid). The
fixed training split (1,437 images) is cut in two stratified halves: the attacker's **public** labelled set and the
**owner's** private training set; the 360 validation digits are the owner's held-out images, which the attacker sees
only as ciphertext under the owner's keys. Keys: one per image from a seed per party (owner's training set: 1,
attacker's: 2, owner's held-out images: 3).

Models (same ViT-Ti width, ``--depth`` blocks, default 4 to fit the CPU budget; identical training settings):

- **owner**: ``pevit_tiny`` trained on the owner's ciphertext (owner's keys), tested on the owner's held-out ciphertext;
- **attacker**: ``pevit_tiny`` trained on the public half under the attacker's own keys, applied to the owner's
  held-out ciphertext (keys it never saw: the PE-free ViT's logits do not depend on them);
- **plaintext**: the same ViT with a learned position embedding, trained and tested on the owner's plain images
  (what the owner would get without encryption).

Also printed: the share of held-out images on which the attacker's prediction is unchanged when the same images are
encrypted with fresh keys (1.0: the attack needs no key). Chance is 0.10. Threads: 1 (the machine is usually shared).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

OWNER_KEYS, ATTACKER_KEYS, HELD_OUT_KEYS, FRESH_KEYS = 1, 2, 3, 4


def semantic_rows(
    *,
    patch_size: int = 8,
    size: int = 32,
    depth: int = 4,
    steps: int = 300,
    batch_size: int = 32,
    checkpoint: str | None = "auto",
    progress: bool = False,
) -> list[dict]:
    """Trains (or loads from the cache) the three classifiers and scores them on the owner's held-out digits.

    Returns:
        dicts ``{"model", "trained on", "tested on", "accuracy", "train_s"}`` (owner, attacker, plaintext) and a
        last one for the attacker under fresh keys with ``"same_prediction"``.
    """
    from ppml.attacks.semantic import encrypt_with_seed, semantic_inference, train_semantic_classifier
    from ppml.data.datasets import load_digits, stratified_split

    data = load_digits(img_size=size)
    owner_idx, public_idx = stratified_split(data.train_y, 0.5, 0)
    test_x, test_y = data.val_x, data.val_y
    held_out = encrypt_with_seed(test_x, patch_size, HELD_OUT_KEYS)[0]
    common = dict(depth=depth, steps=steps, batch_size=batch_size, lr=1e-3, checkpoint=checkpoint,
                  progress=progress, threads=1)  # fmt: skip
    x_owner, y_owner = data.train_x[owner_idx], data.train_y[owner_idx]
    x_public, y_public = data.train_x[public_idx], data.train_y[public_idx]
    runs = [
        ("owner", "pevit", x_owner, y_owner, OWNER_KEYS, "owner's ciphertext", held_out, "owner's ciphertext"),
        ("attacker", "pevit", x_public, y_public, ATTACKER_KEYS, "public ciphertext, own keys", held_out,
         "owner's ciphertext"),
        ("plaintext", "vit", x_owner, y_owner, None, "owner's plain images", test_x, "owner's plain images"),
    ]  # fmt: skip
    rows, models = [], {}
    for name, arch, x, y, keys, trained_on, test, tested_on in runs:
        model = train_semantic_classifier(x, y, patch_size, key_seed=keys, arch=arch, num_classes=10, **common)
        models[name] = model
        acc = float((semantic_inference(model, test) == test_y).float().mean())
        rows.append({"model": name, "arch": arch, "trained on": trained_on, "tested on": tested_on,
                     "accuracy": acc, "train_s": model.train_info["seconds"], "n_train": int(x.shape[0])})  # fmt: skip
    fresh = encrypt_with_seed(test_x, patch_size, FRESH_KEYS)[0]
    a, b = semantic_inference(models["attacker"], held_out), semantic_inference(models["attacker"], fresh)
    rows.append({"model": "attacker", "arch": "pevit", "trained on": "public ciphertext, own keys",
                 "tested on": "owner's images, fresh keys", "accuracy": float((b == test_y).float().mean()),
                 "same_prediction": float((a == b).float().mean()), "train_s": 0.0,
                 "n_train": int(x_public.shape[0])})  # fmt: skip
    return rows


def semantic_row(row: dict) -> str:
    """One row of :func:`semantic_rows` as Markdown: ``| model | trained on | tested on | accuracy | train s |``."""
    return (
        f"| {row['model']} ({row['arch']}) | {row['trained on']} | {row['tested on']} | {row['accuracy']:.3f} | "
        f"{row['train_s']:.0f} |"
    )


SEMANTIC_HEADER = ["| model | trained on | tested on | accuracy | train s |", "|---|---|---|---|---|"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache", default=None, help="cache directory (default: ppml.attacks.cache_dir())")
    ap.add_argument("--no-cache", action="store_true", help="train from scratch, write nothing")
    args = ap.parse_args()
    if args.cache:
        import os

        os.environ["PPML_CACHE_DIR"] = args.cache
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from _timing import environment

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = semantic_rows(patch_size=args.patch_size, size=args.size, depth=args.depth, steps=args.steps,
                         batch_size=args.batch_size, checkpoint=None if args.no_cache else "auto",
                         progress=True)  # fmt: skip
    env = environment("cpu")
    print(
        f"Semantic inference on RS ciphertext: digits at {args.size} px, p = {args.patch_size}, ViT-Ti width, depth "
        f"{args.depth}, {args.steps} steps of {args.batch_size}; {env['cpu']}, {env['cores']} cores, 1 thread, "
        f"torch {env['torch']}, ppml {env['ppml_commit']}, load average {env['load_average_1min']:.1f}; "
        f"whole run {time.perf_counter() - t0:.0f} s. Chance: 0.100.\n"
    )
    print("\n".join([*SEMANTIC_HEADER, *(semantic_row(r) for r in rows)]))
    print(f"\nAttacker's predictions unchanged under fresh keys: {rows[-1]['same_prediction']:.3f} of the images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
