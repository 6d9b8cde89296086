"""``ppml detect train|eval`` (registered on ``ppml``'s sub-commands by :func:`add_detect_parser`)."""

from __future__ import annotations

import argparse

from .._device import DEVICE_HELP
from ..train.options import add_run_options, run_training


def _train_parser(sub) -> None:
    from .engine import COCO_DEFAULTS, SYNTHETIC_DEFAULTS, DetectConfig
    from .model import ENCRYPTIONS, HEADS, PRIORS

    d = DetectConfig()

    def per_data(name: str) -> str:  # what a None default of a data-dependent setting becomes
        coco = COCO_DEFAULTS[name]
        return (f"(default: {SYNTHETIC_DEFAULTS[name]} on the built-in data, "
                f"{coco if coco is not None else 'the backbone' + chr(39) + 's (ViT-S)'} on a COCO folder)")

    p = sub.add_parser(
        "train",
        help="train a YOLOS-style detector on encrypted images",
        description=(
            "Train a YOLOS-style ViT detector on encrypted images; evaluate with pycocotools (AP, AP50, AP75, APs, "
            "APm, APl). Single process, or `torchrun --nproc_per_node=N -m ppml detect train ...` for DDP (gloo on "
            "CPU, nccl on GPU). Writes DIR/checkpoint.pt every epoch, DIR/metrics.jsonl and DIR/summary.json; "
            "SIGINT/SIGTERM finish the step, save and exit; --resume continues exactly. Settings left unset take "
            f"data-dependent defaults: built-in data {SYNTHETIC_DEFAULTS}; a COCO folder (YOLOS-S-like) "
            f"{COCO_DEFAULTS} (None: the backbone's own size, ViT-S)."
        ),
    )
    g = p.add_argument_group("data and encryption")
    g.add_argument("--data", default=d.data, help="'synthetic' (built in, made offline into --synthetic-root) or a "
                   "COCO folder: ROOT/annotations/instances_<split>.json + ROOT/<split>/ (<split>2017 also found)")
    g.add_argument("--synthetic-root", default=None, help="where the built-in set is made or reused "
                   "(default: DIR/synthetic)")
    g.add_argument("--synthetic-train", type=int, default=d.synthetic_train, help="built-in set: training images")
    g.add_argument("--synthetic-val", type=int, default=d.synthetic_val, help="built-in set: validation images")
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split)
    g.add_argument("--encryption", choices=ENCRYPTIONS, default=d.encryption,
                   help="none: plain images; mi: MI ciphertext (mivit backbone); rs: RS ciphertext (pevit backbone)")
    g.add_argument("--img-size", type=int, default=None, help="square canvas side (the longer side is resized to it) "
                   + per_data("img_size"))
    g.add_argument("--patch-size", type=int, default=None,
                   help="RS / MI patch = the model's patch " + per_data("patch_size"))
    g.add_argument("--grid", type=int, default=d.grid, help="MI: g×g sub-patches per patch")
    g.add_argument("--key-seed", type=int, default=None, help="seed the RS keys (reproducible; default: OS entropy)")
    g = p.add_argument_group("model and loss")
    g.add_argument("--backbone", default=None, help="timm / ppml name (default: vit_small / mivit_small / "
                   "pevit_small _patch16_224 per encryption, resized by the options below)")
    g.add_argument("--head", choices=HEADS, default=None, help="box (YOLOS; default for none, mi) or membership "
                   "(per-token object membership decoded with the owner's RS keys; default for rs)")
    g.add_argument("--embed-dim", type=int, default=None, help="backbone width " + per_data("embed_dim"))
    g.add_argument("--depth", type=int, default=None, help="backbone blocks " + per_data("depth"))
    g.add_argument("--num-heads", type=int, default=None, help="attention heads " + per_data("num_heads"))
    g.add_argument("--num-det-tokens", type=int, default=None, help="[DET] tokens, as YOLOS's 100 "
                   + per_data("num_det_tokens"))
    g.add_argument("--det-prior", choices=PRIORS, default=None, help="gaussian: each [DET] slot gets a reference "
                   "point, a distance bias on its attention and a box centre relative to it (trains from scratch; "
                   "default for the box head on vit / mivit); none: YOLOS as published (default otherwise; the only "
                   "choice for RS, whose tokens have no grid position)")
    g.add_argument("--membership-dim", type=int, default=d.membership_dim)
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument("--eos-coef", type=float, default=d.eos_coef, help="weight of the 'no object' class")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help=per_data("epochs"))
    g.add_argument("--batch-size", type=int, default=None, help="per process " + per_data("batch_size"))
    g.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate " + per_data("lr"))
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    g = p.add_argument_group("augmentation (plain images, on the owner's side, before encryption)")
    g.add_argument("--hflip", type=float, default=d.hflip)
    g.add_argument("--crop", type=float, default=d.crop, help="probability of a random crop")
    g.add_argument("--crop-min", type=float, default=d.crop_min, help="smallest crop side (fraction)")
    g.add_argument("--scale-min", type=float, default=d.scale_min, help="smallest resize (fraction of the canvas)")
    g = p.add_argument_group("run")
    add_run_options(g, d)
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="COCO eval every N epochs (0: at the end)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .engine import DetectConfig, train

    return run_training(args, DetectConfig, train)


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO AP of a trained detector",
        description="Evaluate DIR/checkpoint.pt on its validation split with pycocotools' COCOeval; prints the "
        "summary (stderr) and a JSON line (stdout), writes DIR/eval.json.",
    )
    p.add_argument("--out", required=True, help="the run directory")
    p.add_argument("--checkpoint", default=None, help="the checkpoint to evaluate (default: DIR/checkpoint.pt)")
    p.add_argument("--data", default=None, help="another COCO folder (default: the run's data)")
    p.add_argument("--split", default=None, help="another split (default: the run's --val-split)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the run's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--key-seed", type=int, default=None, help="seed the owner's RS keys (default: the run's)")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .engine import evaluate_run

    evaluate_run(args.out, checkpoint=args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size,
                 device=args.device, key_seed=args.key_seed)
    return 0


def add_detect_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``detect`` (with ``train`` and ``eval``) on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "detect",
        help="object detection on encrypted images (YOLOS-style ViT, COCO format)",
        description="Object detection on encrypted images: `ppml detect train` and `ppml detect eval`.",
    )
    sub = p.add_subparsers(dest="detect_command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    return p
