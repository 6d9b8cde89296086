"""The ``ppml`` command line: ``ppml train ...`` (also ``python -m ppml train ...``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _train_parser(sub) -> None:
    from .train.trainer import DEFAULT_MODELS, ENCRYPTIONS, LOSSES, MODES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a ViT on encrypted images",
        description=(
            "Train a ViT on encrypted images. Single process, or `torchrun --nproc_per_node=N -m ppml train ...` for "
            "DDP (gloo on CPU, nccl on GPU). Writes DIR/checkpoint.pt every epoch, DIR/metrics.jsonl (one JSON line "
            "per epoch) and DIR/summary.json; SIGINT/SIGTERM finish the step, save and exit; --resume continues "
            "exactly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and encryption")
    g.add_argument("--data", default=d.data, help="'digits' (built in: sklearn's 1,797 digits) or an ImageFolder path")
    g.add_argument("--encryption", choices=ENCRYPTIONS, default=d.encryption)
    g.add_argument(
        "--mode", choices=MODES, default=d.mode,
        help="owner: encrypted once before training, augmented in the encrypted domain; in-model: plaintext "
        "augmentation, fresh shuffle (or MI mix) inside the model every step (the paper's setting)",
    )
    g.add_argument("--img-size", type=int, default=d.img_size)
    g.add_argument("--patch-size", type=int, default=d.patch_size, help="RS / MI patch size = the model's patch size")
    g.add_argument("--grid", type=int, default=d.grid, help="MI: g×g sub-patches per patch")
    g.add_argument("--key-seed", type=int, default=None, help="seed the owner's RS keys (default: OS entropy)")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default=None, help=f"timm / ppml model name (default per encryption: {DEFAULT_MODELS})")
    g.add_argument("--depth", type=int, default=None, help="override the model's depth")
    g.add_argument("--embed-dim", type=int, default=None, help="override the model's width")
    g.add_argument("--num-heads", type=int, default=None, help="override the model's heads")
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--anchor-scale", type=float, default=None, help="γ (default per metric: sqeuclidean 1, euclidean 4, cosine 16)")
    g.add_argument("--anchor-pull", type=float, default=None, help="λ (default: 0.1 for sqeuclidean, else 0)")
    g.add_argument("--anchor-kind", default=d.anchor_kind, choices=("simplex", "onehot", "hadamard", "random"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the cosine schedule")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g = p.add_argument_group("augmentation (encrypted domain in owner mode)")
    g.add_argument("--hflip", type=float, default=None, help="probability (default 0 for digits, else 0.5)")
    g.add_argument("--brightness", type=float, default=d.brightness)
    g.add_argument("--contrast", type=float, default=d.contrast)
    g.add_argument("--saturation", type=float, default=d.saturation)
    g.add_argument("--mixup", type=float, default=d.mixup, help="Mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=d.cutmix, help="patch CutMix alpha (0: off)")
    g.add_argument("--patch-drop", type=float, default=d.patch_drop, help="share of patches erased")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on GPU)")
    g.add_argument("--out", default=d.out, help="run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, run

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    run(cfg, resume=args.resume, stop_after=args.stop_after)  # rank 0 prints the summary (or stop) JSON line
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ppml", description="Privacy-preserving vision learning on encrypted images")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
