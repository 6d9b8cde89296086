"""Training ViTs on encrypted images (``ppml train``): see :mod:`ppml.train.trainer`."""

from .trainer import DEFAULT_MODELS, ENCRYPTIONS, LOSSES, MODES, TrainConfig, build_model, run

__all__ = ["DEFAULT_MODELS", "ENCRYPTIONS", "LOSSES", "MODES", "TrainConfig", "build_model", "run"]
