"""The README's detection experiment: plain vs MI vs RS on the built-in synthetic COCO set, with `ppml detect train`
(each run is the printed command, in a subprocess), COCO AP from pycocotools.

Run from the repository root::

    python benchmarks/detect_synthetic.py                       # 6 runs, about 8 minutes on a 2-core CPU
    python benchmarks/detect_synthetic.py --epochs 30 --out runs/detect

Every run: the built-in set (1,000 train / 200 val images of 192×144, 1-4 rectangles / ellipses / triangles on
scikit-image photos), DETR-style augmentation on the plain side, a 64-pixel canvas, patch 8 (64 tokens; MI: 2×2
sub-patches → 32-pixel ciphertext), a ViT of width 64, depth 4, 4 heads, 10 [DET] tokens, AdamW lr 1e-3, batch 16,
seed 0, one torch thread per run (``--threads``). Rows:

- plain / MI with YOLOS's box head (the paper's PEYOLOS for MI);
- plain / MI / RS with the membership head (per-token object membership + in-patch extents; RS: decoded by the
  owner with the keys — the design ppml uses for RS);
- RS with the box head: the control that shows why boxes cannot be regressed from shuffled tokens without the key;
- the RS membership run's predictions decoded without the key (as if the tokens were in place).

The Markdown table goes to stdout: COCO AP, AP50, AP75, APs, APm, APl on the 200 validation images, and the wall
seconds of each run (training + final evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

from ppml.detection.engine import AP_NAMES

RUNS = [
    ("plain", "none", "box", "vit (PE)"),
    ("MI", "mi", "box", "mivit (PE)"),
    ("plain", "none", "membership", "vit (PE)"),
    ("MI", "mi", "membership", "mivit (PE)"),
    ("RS", "rs", "membership", "pevit (no PE, RPE)"),
    ("RS (control)", "rs", "box", "pevit (no PE, RPE)"),
]


def _without_key(checkpoint: str, root: str) -> dict:
    """The RS membership run's predictions decoded as if the tokens were in place (what someone without the owner's
    keys gets from them)."""
    from ppml.detection import DetectConfig, Owner, evaluate
    from ppml.detection.engine import load_splits

    class NoKeyOwner(Owner):
        def detections(self, outputs, keys=None):
            return super().detections(outputs, None)

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = DetectConfig(**ckpt["config"])
    cfg.synthetic_root = root
    model = cfg.build_model(len(ckpt["categories"]))
    model.load_state_dict(ckpt["model"])
    owner = NoKeyOwner(cfg.encryption, cfg.value("patch_size"), cfg.value("img_size"), head=cfg.value("head"))
    return evaluate(model, load_splits(cfg)[1], cfg, torch.device("cpu"), log=False, owner=owner)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="runs/detect-synthetic")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (1 is fastest on a busy CPU)")
    ap.add_argument("--only", nargs="+", default=None, help="run these rows only (indices into the table, from 0)")
    args = ap.parse_args()
    root = os.path.join(args.out, "synthetic")
    rows = []
    for i, (data, enc, head, model) in enumerate(RUNS):
        if args.only is not None and str(i) not in args.only:
            continue
        out = os.path.join(args.out, f"{enc}-{head}")
        cmd = [
            "python", "-m", "ppml", "detect", "train", "--data", "synthetic", "--synthetic-root", root,
            "--encryption", enc, "--head", head, "--img-size", "64", "--patch-size", "8", "--embed-dim", "64",
            "--depth", "4", "--num-heads", "4", "--num-det-tokens", "10", "--batch-size", "16", "--lr", "1e-3",
            "--epochs", str(args.epochs), "--eval-every", "0", "--seed", "0", "--out", out,
        ]
        seconds = None
        if os.path.exists(os.path.join(out, "summary.json")):
            print(f"[detect_synthetic] {out} is done already: reusing it", file=sys.stderr)
        else:
            if os.path.exists(os.path.join(out, "checkpoint.pt")):
                cmd.append("--resume")
            print(f"[detect_synthetic] {shlex.join(cmd)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            res = subprocess.run([sys.executable, *cmd[1:]], stdout=subprocess.PIPE, text=True, env=env)
            if res.returncode != 0:
                print(f"[detect_synthetic] failed ({res.returncode}): {shlex.join(cmd)}", file=sys.stderr)
                return res.returncode
            seconds = time.perf_counter() - t0
            print(f"[detect_synthetic] {seconds:.0f} s", file=sys.stderr)
        with open(os.path.join(out, "summary.json")) as fh:
            summary = json.load(fh)
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            metrics = [json.loads(line) for line in fh if line.strip()]
        rows.append({"data": data, "model": model, "head": head, **summary,
                     "train_s": sum(m["train_s"] for m in metrics), "eval_s": metrics[-1].get("eval_s", 0.0),
                     "wall_s": seconds, "cmd": shlex.join([c for c in cmd if c != "--resume"])})
    print(
        f"\nbuilt-in synthetic COCO set (1,000 train / 200 val), 64-px canvas, patch 8, {args.epochs} epochs each; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s) per run\n"
    )
    print("| data | backbone | head | AP | AP50 | AP75 | APs | APm | APl | train s | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        aps = " | ".join(f"{r[k]:.3f}" for k in AP_NAMES)
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—"
        print(f"| {r['data']} | {r['model']} | {r['head']} | {aps} | {r['train_s']:.0f} | {wall} |")
    rs = os.path.join(args.out, "rs-membership", "checkpoint.pt")
    if os.path.exists(rs):
        nokey = _without_key(rs, root)
        aps = " | ".join(f"{nokey[k]:.3f}" for k in AP_NAMES)
        print(f"| RS, decoded without the key | pevit (no PE, RPE) | membership | {aps} | — | — |")
    print("\nCommands:\n")
    for r in rows:
        print(f"    {r['cmd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
