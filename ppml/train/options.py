"""The command-line options every training command shares (``ppml train``, ``ppml detect train``).

Here, below both commands, so that the top CLI (:mod:`ppml.cli`) may import the detection parser
(:mod:`ppml.detection.cli`) and both take these from one place without importing each other.
"""

from __future__ import annotations

import argparse
import dataclasses

from .._device import DEVICE_HELP

__all__ = ["add_run_options", "config_from_args", "run_training"]


def add_run_options(group, defaults) -> None:
    """The options every training command shares (``ppml train``, ``ppml detect train``): --seed, --device, --amp,
    --out, --resume, --stop-after; ``defaults`` is the command's config dataclass instance (seed, device, out)."""
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--device", default=defaults.device, help=DEVICE_HELP)
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on GPU)")  # fmt: skip
    group.add_argument("--out", default=defaults.out, help="run directory")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop (with a checkpoint) after this many steps (default: run to the end)")


def config_from_args(config_cls, args: argparse.Namespace):
    """``config_cls`` (a dataclass) built from the parsed options that are its fields."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in fields})


def run_training(args: argparse.Namespace, config_cls, train) -> int:
    """A training command's handler: ``train(config, resume=, stop_after=)`` with the config built from the parsed
    options (rank 0 prints the summary, or stop, JSON line); returns the exit status 0."""
    train(config_from_args(config_cls, args), resume=args.resume, stop_after=args.stop_after)
    return 0
