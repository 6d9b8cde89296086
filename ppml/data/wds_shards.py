"""The ``ppml-wds`` format of an encrypted dataset DST: WebDataset tar shards (readable by ``webdataset``, Ray Data's
``read_webdataset`` and timm's wds reader) and a manifest. Nothing in DST names a source file::

    DST/shard-000000.tar    per sample (``__key__`` = its opaque id, 32 hex characters, see ppml.data.masterkey):
                              <id>.png  RS: the uint8 ciphertext [H, W, C] as a lossless PNG (RGB, or L for C = 1)
                              <id>.npy  MI: the exact integer sub-patch sums, uint16 [C, H/g, W/g] (np.save format)
                              <id>.cls  the label, ASCII decimal
    DST/manifest.json       {"format": "ppml-wds", "version": 1, "scheme", "patch_size", "image_size", "channels",
                             "mix_group" (MI), "count", "num_classes", "shards": [{"name", "count", "sha256"}],
                             "corrupt" (a count), "val_start", "key_fingerprint"} — written last: its presence = done

Shards are byte-reproducible: PNGs come from one encoder at a fixed compress level, tar members have mtime 0, uid/gid
0, empty user/group names and mode 0644 (USTAR), so a resumed or multi-process run writes the same bytes as a single
uninterrupted one. Every shard is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np

FORMAT = "ppml-wds"
VERSION = 1
PNG_COMPRESS_LEVEL = 1  # fixed (reproducibility); 1, not 6: ~2x faster for a few % more bytes (RESULTS.md)
MANIFEST = "manifest.json"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def png_bytes(img: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as a deterministic PNG (no metadata chunks)."""
    from PIL import Image

    hwc = np.ascontiguousarray(img.transpose(1, 2, 0))
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)  # uint8: L or RGB
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A ciphertext PNG back to uint8 [C, H, W]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_atomic(path: str, data: bytes, mode: int | None = None) -> None:
    """``data`` at ``path`` via a temporary name + rename: a killed process leaves the old file or the new one.
    ``mode`` (e.g. 0o600) is set before the rename, so the file never exists with wider permissions."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is not None else 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_tar_atomic(path: str, members: list[tuple[str, bytes]]) -> str:
    """Writes a reproducible tar of ``members`` (name, bytes) at ``path`` (temporary name + rename); its SHA-256."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tf.addfile(info, io.BytesIO(data))
            fh.flush()
            os.fsync(fh.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return digest


def sample_members(sid: str, scheme: str, cipher: np.ndarray, label: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample: the ciphertext (RS uint8 PNG, MI uint16 sums .npy) and its label."""
    if scheme == "rs":
        body = (f"{sid}.png", png_bytes(cipher))
    else:
        body = (f"{sid}.npy", npy_bytes(np.ascontiguousarray(cipher, dtype=np.uint16)))
    return [body, (f"{sid}.cls", str(int(label)).encode("ascii"))]


def read_tar_samples(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """``[(id, {extension: bytes})]`` in file order; members group by the name before the first dot (WebDataset)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, mode="r:") as tf:
        for info in tf:
            if not info.isfile():
                raise ValueError(f"ppml: {path} holds a non-file member {info.name!r} (not a ppml-wds shard)")
            sid, _, ext = info.name.partition(".")
            data = tf.extractfile(info).read()
            if not samples or samples[-1][0] != sid:
                samples.append((sid, {}))
            samples[-1][1][ext] = data
    return samples


def tar_ids(path: str) -> list[str]:
    """The sample ids of a shard, in order (only the tar headers are read)."""
    ids: list[str] = []
    with tarfile.open(path, mode="r:") as tf:
        for info in tf:
            sid = info.name.partition(".")[0]
            if not ids or ids[-1] != sid:
                ids.append(sid)
    return ids


def is_wds_dataset(dst: str) -> bool:
    try:
        with open(os.path.join(dst, MANIFEST)) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_manifest(dst: str, manifest: dict) -> None:
    """Raises a clear error for a manifest that does not describe a well-formed ppml-wds DST (a tampered one)."""
    where = f"ppml: {dst}/{MANIFEST}"
    if manifest.get("version") != VERSION:
        raise ValueError(f"{where}: version {manifest.get('version')!r}, this ppml reads {VERSION}")
    if manifest.get("scheme") not in ("rs", "mi"):
        raise ValueError(f"{where}: scheme must be 'rs' or 'mi', got {manifest.get('scheme')!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{where}: 'shards' must be a list")
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict) or shard.get("name") != shard_name(k):
            raise ValueError(
                f"{where}: shard {k} must be named {shard_name(k)!r}, got {shard!r:.80} (a tampered manifest?)"
            )
        if not isinstance(shard.get("count"), int) or shard["count"] < 0:
            raise ValueError(f"{where}: shard {k} has no valid count")
    if sum(s["count"] for s in shards) != manifest.get("count"):
        raise ValueError(
            f"{where}: the shard counts sum to {sum(s['count'] for s in shards)}, the manifest says "
            f"count={manifest.get('count')!r} (a tampered manifest?)"
        )


def read_shard(dst: str, manifest: dict, k: int, verify: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shard ``k`` of DST: (ids, ciphertext as stored — RS uint8 [n, C, H, W], MI uint16 sums [n, C, H/g, W/g] —,
    labels int64 [n]); with ``verify`` its SHA-256 and count are checked against the manifest."""
    shard = manifest["shards"][k]
    path = os.path.join(dst, shard_name(k))  # the name is fixed by k, never read from the manifest
    if verify and file_sha256(path) != shard.get("sha256"):
        raise ValueError(f"ppml: {path} does not match its SHA-256 in the manifest (corrupt or modified)")
    ext = "png" if manifest["scheme"] == "rs" else "npy"
    ids, xs, ys = [], [], []
    for sid, parts in read_tar_samples(path):
        if ext not in parts or "cls" not in parts:
            raise ValueError(f"ppml: {path}: sample {sid!r} lacks its .{ext} or .cls member")
        ids.append(sid)
        xs.append(decode_png(parts[ext]) if ext == "png" else np.load(io.BytesIO(parts[ext]), allow_pickle=False))
        ys.append(int(parts["cls"].decode("ascii")))
    if len(ids) != shard["count"]:
        raise ValueError(f"ppml: {path} holds {len(ids)} samples, the manifest says {shard['count']}")
    c, s = manifest["channels"], manifest["image_size"] // (manifest.get("mix_group") or 1)
    dtype = np.uint8 if ext == "png" else np.uint16
    x = np.stack(xs).astype(dtype, copy=False) if xs else np.zeros((0, c, s, s), dtype)
    return ids, x, np.asarray(ys, dtype=np.int64)
