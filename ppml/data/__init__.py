"""Datasets for training on encrypted images: the built-in digits and user image folders, held in memory."""

from .datasets import TensorSplit, load_dataset, load_digits, load_image_folder

__all__ = ["TensorSplit", "load_dataset", "load_digits", "load_image_folder"]
