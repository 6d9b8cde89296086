"""The README's training experiment: plain vs RS (owner) vs RS (in-model) vs MI, cross-entropy vs an anchor loss, on
the built-in digits, with `ppml train` (each run is the printed command, in a subprocess).

Run from the repository root::

    python benchmarks/experiments/train_digits.py                    # 12 runs, about 6 minutes on a 2-core CPU
    python benchmarks/experiments/train_digits.py --epochs 30 --out runs/digits

Every run: sklearn's digits upscaled to 32×32 (1,438 train / 359 validation, a fixed split), patch 8 (16 patches;
MI: 2×2 sub-patches of 4×4), a ViT of depth 4, width 96, 3 heads (timm's ``vit_tiny`` with position embedding for
plain images, ``pevit_tiny`` = no position embedding + RPE for RS, ``mivit_tiny`` = MI patch embedding for MI), AdamW
lr 2e-3, cosine with one warm-up epoch, batch 64, seed 0, brightness/contrast jitter 0.1 (in the encrypted domain in
owner mode). The Markdown table goes to stdout: the final validation accuracy, the best one, and the median seconds
per training epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

RUNS = [
    ("plain", "none", "owner"),
    ("RS (owner)", "rs", "owner"),
    ("RS (in-model)", "rs", "in-model"),
    ("MI (owner)", "mi", "owner"),
]
LOSSES = ["ce", "anchor-sqeuclidean", "anchor-cosine"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="runs/digits")
    ap.add_argument("--losses", nargs="+", default=LOSSES)
    ap.add_argument("--patch-size", type=int, default=8, help="RS / MI patch (the model's patch), dividing 32")
    args = ap.parse_args()
    rows = []
    for loss in args.losses:
        for name, enc, mode in RUNS:
            out = os.path.join(args.out, f"p{args.patch_size}-{enc}-{mode}-{loss}")
            cmd = [
                "python", "-m", "ppml", "train", "--data", "digits", "--encryption", enc, "--mode", mode,
                "--loss", loss, "--img-size", "32", "--patch-size", str(args.patch_size), "--depth", "4",
                "--embed-dim", "96",
                "--num-heads", "3", "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "2e-3",
                "--seed", "0", "--out", out,
            ]
            if os.path.exists(os.path.join(out, "summary.json")):
                print(f"[train_digits] {out} is done already: reusing it", file=sys.stderr)
            else:
                if os.path.exists(os.path.join(out, "checkpoint.pt")):
                    cmd.append("--resume")
                print(f"[train_digits] {shlex.join(cmd)}", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                res = subprocess.run([sys.executable, *cmd[1:]], stdout=subprocess.PIPE, text=True)
                if res.returncode != 0:
                    print(f"[train_digits] failed ({res.returncode}): {shlex.join(cmd)}", file=sys.stderr)
                    return res.returncode
                print(f"[train_digits] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            with open(os.path.join(out, "metrics.jsonl")) as fh:
                metrics = [json.loads(line) for line in fh if line.strip()]
            rows.append(
                {
                    "data": name,
                    "loss": loss,
                    "val_acc": metrics[-1]["val_acc"],
                    "best": max(m["val_acc"] for m in metrics),
                    "s_epoch": statistics.median(m["train_s"] for m in metrics),
                    "cmd": shlex.join([c for c in cmd if c != "--resume"]),
                }
            )
    print(
        f"\npatch {args.patch_size} on 32×32 ({(32 // args.patch_size) ** 2} patches), {args.epochs} epochs each; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| data | model | loss | val acc (last) | val acc (best) | s / epoch |")
    print("|---|---|---|---:|---:|---:|")
    model = {
        "plain": "vit_tiny (PE)", "RS (owner)": "pevit_tiny", "RS (in-model)": "pevit_tiny", "MI (owner)": "mivit_tiny"
    }
    for r in rows:
        print(f"| {r['data']} | {model[r['data']]} | {r['loss']} | {r['val_acc']:.3f} | {r['best']:.3f} "
              f"| {r['s_epoch']:.1f} |")
    print("\nCommands:\n")
    for r in rows:
        print(f"    {r['cmd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
