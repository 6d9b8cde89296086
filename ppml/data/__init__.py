"""Datasets for training on encrypted images: the built-in digits, user image folders (held in memory) and the
encrypted shards that ``ppml encrypt`` writes."""

from .datasets import TensorSplit, load_dataset, load_digits, load_image_folder
from .encrypted import decrypt_dataset, encrypt_dataset, is_encrypted_dataset, load_encrypted, load_shards

__all__ = [
    "TensorSplit",
    "decrypt_dataset",
    "encrypt_dataset",
    "is_encrypted_dataset",
    "load_dataset",
    "load_digits",
    "load_encrypted",
    "load_image_folder",
    "load_shards",
]
