"""Training ViTs on encrypted images (``ppml train``): see :mod:`ppml.train.trainer`.

:mod:`ppml.train.runtime` is the training runtime every ppml training loop shares (``ppml train``, ``ppml detect
train``, the learned attacks): torchrun set-up, checkpoints, stop requests, schedule, DDP checks.
:mod:`ppml.train.options` holds the command-line options the training commands share.
"""

from .trainer import DEFAULT_MODELS, ENCRYPTIONS, LOSSES, MODES, TrainConfig, build_model, run

__all__ = ["DEFAULT_MODELS", "ENCRYPTIONS", "LOSSES", "MODES", "TrainConfig", "build_model", "run"]
