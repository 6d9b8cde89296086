"""The ``ppml`` command line (also ``python -m ppml``): ``train``, ``encrypt``, ``decrypt``, ``show``, ``attack``,
``detect``."""

from __future__ import annotations

import argparse
import sys

# config_from_args and add_run_options were defined here before ppml/train/options.py; still importable from here
from .train.options import add_run_options, config_from_args, run_training  # noqa: F401


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
    )
    g = p.add_argument_group("data and encryption")
    g.add_argument("--data", default=d.data,
                   help="'digits' (built in: sklearn's 1,797 digits), an ImageFolder path or a DST of `ppml encrypt`")
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
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read --data through DataLoader workers in bounded memory (default: on for an image folder "
                   "and a ppml-wds DST; the digits and old-format DSTs are held in memory)")
    g.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer,
                   help="streaming: samples each worker holds to shuffle (0: read order)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="streaming: DataLoader worker processes per rank (0: the main process reads); the batch order "
                   "depends on it, so --resume needs the same")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default=None, help=f"timm / ppml model name (default per encryption: {DEFAULT_MODELS})")
    g.add_argument("--depth", type=int, default=None, help="override the model's depth (default: the model's own)")
    g.add_argument("--embed-dim", type=int, default=None, help="override the model's width (default: the model's own)")
    g.add_argument("--num-heads", type=int, default=None, help="override the model's heads (default: the model's own)")
    g.add_argument("--drop-path", type=float, default=d.drop_path)
    g.add_argument("--loss", choices=LOSSES, default=d.loss)
    g.add_argument("--anchor-scale", type=float, default=None,
                   help="γ (default per metric: sqeuclidean 1, euclidean 4, cosine 16)")
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
    add_run_options(g, d)
    g.add_argument("--compile", nargs="?", const="inductor", default=d.compile, metavar="BACKEND",
                   help="torch.compile the model for training (as timm's --torchcompile): BACKEND 'inductor' when "
                   "given alone, 'eager' / 'aot_eager' to debug; checkpoints hold the plain module's weights, so a run "
                   "resumes and evaluates with or without it (default: off)")
    g.add_argument("--compile-mode", default=d.compile_mode, help="torch.compile mode with --compile: default, "
                   "reduce-overhead, max-autotune, ... (default: torch's)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train.trainer import TrainConfig, run

    return run_training(args, TrainConfig, run)


def _encrypt_parser(sub) -> None:
    p = sub.add_parser(
        "encrypt",
        help="encrypt an image folder (or the built-in digits) into shards, once",
        description=(
            "Encrypt SRC (an ImageFolder tree, a tree with train/ and val/, or 'digits') into DST: WebDataset tar "
            "shards (opaque ids, ciphertext, labels) and a manifest (SHA-256 per shard); no source name reaches DST. "
            "A 256-bit master key (every image's id and RS permutation derive from it) goes to a file outside DST "
            "(default DST.key, mode 0600), the id -> source path index and the report of unreadable images next to "
            "it (KEY.index.json). Re-run with the same arguments to resume an interrupted run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="image folder, or 'digits'")
    p.add_argument("dst", metavar="DST", help="output folder (must not hold another dataset)")
    p.add_argument("--scheme", choices=("rs", "mi"), default="rs")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--grid", type=int, default=2, help="MI: g×g sub-patches per patch")
    p.add_argument("--size", type=int, default=224, help="images are resized (shorter side) and centre-cropped")
    p.add_argument("--batch-size", type=int, default=256, help="images encrypted per op call")
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per shard, also what an interrupted run can lose (default: 1/16 of the images, "
                   "16..4096)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda")
    p.add_argument("--keys", default=None, help="master key file (default: DST.key, next to DST)")
    p.add_argument("--index", default=None, help="owner-side index: id -> source path (default: KEYS.index.json)")
    p.add_argument("--key-seed", type=int, default=None,
                   help="a master key derived from this seed: reproducible, NOT secret (default: OS entropy)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: 1, this process with decode threads; with --engine ray: every "
                   "CPU of the local Ray)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help='where shards are made: local processes, or Ray tasks (pip install "ppml[ray]")')
    p.add_argument("--ray-address", default=None, help="with --engine ray: a Ray cluster (default: a local Ray)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_encrypt)


def _run_encrypt(args: argparse.Namespace) -> int:
    import json

    from .data.encrypted import encrypt_dataset

    summary = encrypt_dataset(
        args.src, args.dst, scheme=args.scheme, patch_size=args.patch_size, grid=args.grid, size=args.size,
        batch_size=args.batch_size, shard_size=args.shard_size, device=args.device, keys=args.keys,
        key_seed=args.key_seed, workers=args.workers, progress=not args.no_progress, index=args.index,
        engine=args.engine, ray_address=args.ray_address,
    )
    work = summary["decode_s"] + summary["encrypt_s"] + summary["write_s"]
    print(
        f"[ppml encrypt] {summary['images']} images ({summary['skipped']} skipped, {summary['resumed_images']} from an "
        f"earlier run) in {summary['seconds']:.1f} s, {summary['images_per_s']} img/s on {summary['device']}: "
        f"decode+resize {summary['decode_s']:.2f} s ({summary['decode_s'] / max(work, 1e-9):.0%}), encryption "
        f"{summary['encrypt_s']:.2f} s ({summary['encrypt_share']:.0%}), writing {summary['write_s']:.2f} s"
        + f"; master key: {summary['keys']}, owner-side index: {summary['index']}"
        + f"; {summary['shards']} shard(s) of {summary['shard_size']} (the resume granularity)",
        file=sys.stderr,
    )
    print(json.dumps(summary), flush=True)
    return 0


def _decrypt_parser(sub) -> None:
    p = sub.add_parser(
        "decrypt",
        help="decrypt RS shards back to the exact (resized) images",
        description="Decrypt the RS dataset DST with its key file into OUT as lossless PNGs (OUT/<source path>.png; "
        "the names come from the owner-side index, each checked to stay inside OUT).",
    )
    p.add_argument("dst", metavar="DST")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--keys", required=True, help="the key file `ppml encrypt` wrote")
    p.add_argument("--index", default=None, help="the owner-side index (default: KEYS.index.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_decrypt)


def _run_decrypt(args: argparse.Namespace) -> int:
    from .data.decrypt import decrypt_dataset

    res = decrypt_dataset(args.dst, args.out, args.keys, index=args.index, progress=not args.no_progress)
    print(f"[ppml decrypt] {res['images']} images written to {res['out']}", file=sys.stderr)
    return 0


def say_defaults(parser: argparse.ArgumentParser) -> None:
    """Makes every option of ``parser`` and of its sub-commands state its default exactly once in ``--help``.

    argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every help string, so options whose help
    already explained their default showed two ("(default: OS entropy) (default: None)"), and it skips options
    without a help string (--epochs showed none). Instead, each help string that does not mention a default gets
    "(default: X)" here ("on" / "off" for flags); a None default has to be explained in the help string itself."""
    if issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter):
        parser.formatter_class = argparse.HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                say_defaults(sub)
            continue
        takes_default = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (not takes_default or action.required or action.help is argparse.SUPPRESS
                or action.default in (None, argparse.SUPPRESS) or "default" in (action.help or "").lower()):
            continue  # fmt: skip
        shown = ("on" if action.default else "off") if action.nargs == 0 else "%(default)s"
        action.help = f"{action.help or ''} (default: {shown})".lstrip()


def build_parser() -> argparse.ArgumentParser:
    """The ``ppml`` parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="ppml", description="Privacy-preserving vision learning on encrypted images")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _encrypt_parser(sub)
    _decrypt_parser(sub)
    from .show import add_show_parser

    add_show_parser(sub)
    from .attacks.cli import add_attack_parser

    add_attack_parser(sub)
    from .detection.cli import add_detect_parser

    add_detect_parser(sub)
    say_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (what was kept, how to continue), not a traceback
        print(str(exc) or f"[ppml {args.command}] interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
