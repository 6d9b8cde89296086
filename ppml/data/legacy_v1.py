"""Reading the ``ppml-encrypted-v1`` datasets written before ``ppml-wds`` (read only; ``ppml encrypt`` no longer writes
them): NumPy shards ``shard-00000-{images,labels,index}.npy``, ``index.json`` with the source paths inside DST, and a
key file ``DST.keys.npy`` holding one permutation row per source image. ``ppml train --data``, ``ppml decrypt`` and
``ppml show`` still read them through :mod:`ppml.data.encrypted`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import Tensor

from .wds_shards import file_sha256

FORMAT = "ppml-encrypted-v1"


def read_manifest(dst: str) -> dict:
    with open(os.path.join(dst, "manifest.json")) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"ppml: {dst!r} has format {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def _read_shard(dst: str, shard: dict, parts, verify: bool) -> dict:
    from .._paths import safe_output_path

    arrays = {}
    for part in parts:
        # a manifest's file names stay inside DST (a tampered one could otherwise point the reader anywhere)
        path = safe_output_path(dst, shard["files"][part], f"ppml: {dst}/manifest.json")
        if verify and file_sha256(path) != shard["sha256"][part]:
            raise ValueError(f"ppml: {path} does not match its SHA-256 in the manifest (corrupt or modified)")
        arrays[part] = np.load(path, allow_pickle=False)
    return arrays


def load_shards(
    dst: str, manifest: dict, verify: bool = True, count: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(ciphertext as stored, labels int64 [N], source index int64 [N]) of the first ``count`` images (all: None)."""
    xs, ys, idx, n = [], [], [], 0
    for shard in manifest["shards"]:
        if count is not None and n >= count:
            break
        if not shard["count"]:
            continue
        arrays = _read_shard(dst, shard, ("images", "labels", "index"), verify)
        take = shard["count"] if count is None else min(count - n, shard["count"])
        xs.append(torch.from_numpy(arrays["images"][:take]))
        ys.append(torch.from_numpy(arrays["labels"][:take]))
        idx.append(torch.from_numpy(arrays["index"][:take]))
        n += take
    if not xs:
        shape = manifest["ciphertext_shape"]
        dtype = torch.uint8 if manifest["dtype"] == "uint8" else torch.float32
        return torch.zeros((0, *shape), dtype=dtype), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


def index_items(dst: str) -> list:
    """DST/index.json's items: one ``[source path, label, split]`` per source item."""
    with open(os.path.join(dst, "index.json")) as fh:
        return json.load(fh)["items"]


def val_mask(dst: str, manifest: dict, idx: Tensor) -> Tensor | None:
    """True where an image came from SRC's val/ folder; None when SRC had no train/val split."""
    if not manifest["splits"]:
        return None
    splits = [it[2] for it in index_items(dst)]
    return torch.tensor([splits[i] == "val" for i in idx.tolist()], dtype=torch.bool)


def check_key_file(dst: str, keys: str, manifest: dict, op: str) -> None:
    if not os.path.isfile(keys):
        raise FileNotFoundError(f"{op}: --keys {keys!r} is not a file")
    if file_sha256(keys) != manifest["keys_sha256"]:
        raise ValueError(f"{op}: {keys!r} is not the key file of {dst!r} (its SHA-256 differs from the manifest's)")


def permutations(keys: str, idx: Tensor) -> Tensor:
    """The legacy key file's rows for the source indices ``idx``: int64 [n, T]."""
    perms = np.load(keys, allow_pickle=False)
    return torch.as_tensor(perms[idx.numpy()].astype(np.int64))
