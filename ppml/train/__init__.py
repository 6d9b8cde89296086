"""Training ViTs on encrypted images (``ppml train``): see :mod:`ppml.train.trainer`."""

from .trainer import DEFAULT_MODELS, LOSSES, MODES, ENCRYPTIONS, TrainConfig, build_model, run, train

__all__ = ["DEFAULT_MODELS", "ENCRYPTIONS", "LOSSES", "MODES", "TrainConfig", "build_model", "run", "train"]
