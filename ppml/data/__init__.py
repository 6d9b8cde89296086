"""Datasets for training on encrypted images: the built-in digits, user image folders (held in memory) and the
encrypted shards that ``ppml encrypt`` writes."""

from .datasets import TensorSplit, load_dataset, load_digits, load_image_folder
from .decrypt import decrypt_dataset
from .encrypted import decrypt_one, encrypt_dataset, is_encrypted_dataset, load_encrypted, load_shards
from .masterkey import MasterKey, derive_permutation, read_key_file, sample_id

__all__ = [
    "TensorSplit",
    "MasterKey",
    "decrypt_dataset",
    "decrypt_one",
    "derive_permutation",
    "encrypt_dataset",
    "is_encrypted_dataset",
    "load_dataset",
    "load_digits",
    "load_encrypted",
    "load_image_folder",
    "load_shards",
    "read_key_file",
    "sample_id",
]
