"""The README's detection experiment: plain vs MI vs RS on the built-in synthetic COCO set, with `ppml detect train`
(each run is the printed command, in a subprocess), COCO AP from pycocotools.

Run from the repository root::

    python benchmarks/experiments/detect_synthetic.py                       # 8 runs, about 70 minutes on a 2-core CPU
    python benchmarks/experiments/detect_synthetic.py --epochs 10 --out runs/detect-short   # about 6 minutes

Every run: the built-in set (1,000 train / 200 val images of 192×144, 1-4 rectangles / ellipses / triangles on
scikit-image photos), DETR-style augmentation on the plain side, a 64-pixel canvas, patch 8 (64 tokens; MI: 2×2
sub-patches → 32-pixel ciphertext), a ViT of width 64, depth 4, 4 heads, 10 [DET] tokens, AdamW lr 1e-3, batch 16,
seed 0, ``--epochs`` 150, one torch thread per run (``--threads``), ``--jobs`` runs at a time. Rows:

- plain / MI with YOLOS's box head and ppml's spatial prior on the [DET] tokens (``--det-prior gaussian``, the
  default; the paper's PEYOLOS for MI);
- the same two with ``--det-prior none`` (YOLOS as published, from scratch);
- plain / MI / RS with the membership head (per-token object membership + in-patch extents; RS: decoded by the
  owner with the keys — the design ppml uses for RS);
- RS with the box head: the control that shows why boxes cannot be regressed from shuffled tokens without the key
  (``--control-epochs``, 10);
- the RS membership run's predictions decoded without the key (as if the tokens were in place).

The Markdown table goes to stdout: COCO AP, AP50, AP75, APs, APm, APl on the 200 validation images, the epochs, and
the seconds of each run (training + final evaluation; runs share the CPU when ``--jobs`` > 1).
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

RUNS = [  # (data, encryption, head, det_prior, backbone, control?)
    ("plain", "none", "box", "gaussian", "vit (PE)", False),
    ("MI", "mi", "box", "gaussian", "mivit (PE)", False),
    ("plain", "none", "box", "none", "vit (PE)", False),
    ("MI", "mi", "box", "none", "mivit (PE)", False),
    ("plain", "none", "membership", "none", "vit (PE)", False),
    ("MI", "mi", "membership", "none", "mivit (PE)", False),
    ("RS", "rs", "membership", "none", "pevit (no PE, RPE)", False),
    ("RS (control)", "rs", "box", "none", "pevit (no PE, RPE)", True),
]


def _without_key(checkpoint: str, root: str) -> dict:
    """The RS membership run's predictions decoded as if the tokens were in place (what someone without the owner's
    keys gets from them)."""
    from ppml.detection import DetectConfig, Owner, evaluate
    from ppml.detection.engine import load_splits, saved_config

    class NoKeyOwner(Owner):
        def detections(self, outputs, keys=None):
            return super().detections(outputs, None)

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = DetectConfig(**saved_config(ckpt))
    cfg.synthetic_root = root
    model = cfg.build_model(len(ckpt["categories"]))
    model.load_state_dict(ckpt["model"])
    owner = NoKeyOwner(cfg.encryption, cfg.value("patch_size"), cfg.value("img_size"), head=cfg.value("head"))
    return evaluate(model, load_splits(cfg)[1], cfg, torch.device("cpu"), log=False, owner=owner)


def _run_pool(todo: list[dict], jobs: int, env: dict) -> tuple[int, dict[str, float]]:
    """Runs each row's command (resuming a run that has a checkpoint), ``jobs`` at a time. Returns (0, {out: wall
    seconds}), or the first failure's exit status after stopping the runs still going."""
    pending, running, seconds = list(todo), [], {}
    while pending or running:
        while pending and len(running) < jobs:
            p = pending.pop(0)
            cmd = p["cmd"] + (["--resume"] if os.path.exists(os.path.join(p["out"], "checkpoint.pt")) else [])
            print(f"[detect_synthetic] {shlex.join(cmd)}", file=sys.stderr, flush=True)
            proc = subprocess.Popen([sys.executable, *cmd[1:]], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env)
            running.append(dict(p, proc=proc, t0=time.perf_counter()))
        time.sleep(1)
        for r in [r for r in running if r["proc"].poll() is not None]:
            running.remove(r)
            if r["proc"].returncode != 0:
                print(f"[detect_synthetic] failed ({r['proc'].returncode}): {shlex.join(r['cmd'])}", file=sys.stderr)
                for other in running:
                    other["proc"].terminate()
                return r["proc"].returncode, seconds
            seconds[r["out"]] = time.perf_counter() - r["t0"]
            print(f"[detect_synthetic] {r['out']}: {seconds[r['out']]:.0f} s", file=sys.stderr)
    return 0, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=150, help="epochs of every run but the RS box-head control")
    ap.add_argument("--control-epochs", type=int, default=10, help="epochs of the RS box-head control")
    ap.add_argument("--out", default="runs/detect-synthetic")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (1 is fastest on a busy CPU)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--only", nargs="+", default=None, help="run these rows only (indices into the table, from 0)")
    args = ap.parse_args()
    root = os.path.join(args.out, "synthetic")
    from ppml.detection import make_synthetic_coco

    make_synthetic_coco(root, 1000, 200)  # once, before the runs start together
    plan = []
    for i, (data, enc, head, prior, model, control) in enumerate(RUNS):
        if args.only is not None and str(i) not in args.only:
            continue
        epochs = args.control_epochs if control else args.epochs
        out = os.path.join(args.out, f"{enc}-{head}-{prior}")
        cmd = [
            "python", "-m", "ppml", "detect", "train", "--data", "synthetic", "--synthetic-root", root,
            "--encryption", enc, "--head", head, "--det-prior", prior, "--img-size", "64", "--patch-size", "8",
            "--embed-dim", "64", "--depth", "4", "--num-heads", "4", "--num-det-tokens", "10", "--batch-size", "16",
            "--lr", "1e-3", "--epochs", str(epochs), "--eval-every", "0", "--seed", "0", "--out", out,
        ]
        plan.append(dict(data=data, model=model, head=head, prior=prior, epochs=epochs, out=out, cmd=cmd))
    todo = []
    for p in plan:
        done = os.path.join(p["out"], "summary.json")
        if not os.path.exists(done):
            todo.append(p)
            continue
        with open(done) as fh:
            had = json.load(fh)["epochs"]
        if had != p["epochs"]:
            print(f"[detect_synthetic] {p['out']} holds a finished run of {had} epochs, this row wants "
                  f"{p['epochs']}: remove the folder or choose another --out", file=sys.stderr)
            return 2
        print(f"[detect_synthetic] {p['out']} is done already: reusing it", file=sys.stderr)
    rc, seconds = _run_pool(todo, args.jobs, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if rc != 0:
        return rc
    rows = []
    for p in plan:
        with open(os.path.join(p["out"], "summary.json")) as fh:
            summary = json.load(fh)
        with open(os.path.join(p["out"], "metrics.jsonl")) as fh:
            metrics = [json.loads(line) for line in fh if line.strip()]
        rows.append({**p, **summary, "train_s": sum(m["train_s"] for m in metrics),
                     "wall_s": seconds.get(p["out"]), "cmd": shlex.join(p["cmd"])})
    print(
        f"\nbuilt-in synthetic COCO set (1,000 train / 200 val), 64-px canvas, patch 8; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time\n"
    )
    print("| data | backbone | head | [DET] prior | epochs | AP | AP50 | AP75 | APs | APm | APl | train s | wall s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        aps = " | ".join(f"{r[k]:.3f}" for k in AP_NAMES)
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—"
        print(f"| {r['data']} | {r['model']} | {r['head']} | {r['prior']} | {r['epochs']} | {aps} | "
              f"{r['train_s']:.0f} | {wall} |")
    rs = os.path.join(args.out, "rs-membership-none", "checkpoint.pt")
    if os.path.exists(rs):
        nokey = _without_key(rs, root)
        aps = " | ".join(f"{nokey[k]:.3f}" for k in AP_NAMES)
        print(f"| RS, decoded without the key | pevit (no PE, RPE) | membership | none | {args.epochs} | {aps} | — "
              f"| — |")
    print("\nCommands:\n")
    for r in rows:
        print(f"    {r['cmd']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
