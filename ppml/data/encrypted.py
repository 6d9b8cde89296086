"""The data owner's side: ``ppml encrypt`` (a folder or the digits → encrypted shards), ``ppml decrypt`` (RS shards +
keys → the exact resized images) and reading encrypted shards for training.

On-disk format ``ppml-encrypted-v1`` (NumPy ``.npy`` + JSON: readable without ppml or its kernels)::

    DST/manifest.json              scheme, patch size, grid, image size, classes, counts, per-shard files and SHA-256,
                                   the SHA-256 of the key file; written last (its presence = the dataset is complete)
    DST/index.json                 the source items (relative paths, labels, split) in encryption order
    DST/report.json                the unreadable images that were skipped, with the error
    DST/shard-00000-images.npy     RS: uint8 [n, 3, S, S] ciphertext; MI: float32 [n, 3, S/g, S/g] (0..255, exact)
    DST/shard-00000-labels.npy     int64 [n]
    DST/shard-00000-index.npy      int64 [n]: each image's position in index.json (and its row in the key file)
    DST/shard-00000-skipped.json   the shard's unreadable images
    DST/job.json                   the arguments; a re-run with the same ones resumes, other ones are refused
    KEYS (default DST.keys.npy)    RS: int16/int32 [N, (S/p)²] permutations, one row per source item; outside DST,
                                   never needed for training

Every file is written to a temporary name and renamed, shards one at a time, so a killed run leaves whole shards only;
keys are drawn once, before the first shard, so a resumed run's output is byte-identical to an uninterrupted one. A
shard (default :func:`auto_shard_size`: 1/16 of the images, 16..4096) is what an interrupted run can lose. Every
refusal is decided before the first write. ``ppml decrypt`` checks every output path read from ``index.json`` with
:func:`ppml._paths.safe_output_path` before writing, and resumes an interrupted OUT (marked by ``.ppml-decrypt.json``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._progress import progress as _progress_bar

FORMAT = "ppml-encrypted-v1"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_ENC, _DEC = "ppml encrypt", "ppml decrypt"


# ------------------------------------------------------------------------------------------------------------ source


@dataclass
class SourceItem:
    path: str  # relative to SRC ("<label>/<index>" for the built-in digits)
    label: int
    split: str | None  # "train" / "val" when SRC has train/ and val/, else None


def _scan_tree(
    root: str, prefix: str, split: str | None, classes: list[str] | None, op: str = _ENC
) -> tuple[list[SourceItem], list[str]]:
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    classes = classes if classes is not None else found
    if found != classes:
        raise ValueError(f"{op}: the class folders of {root!r} ({found}) differ from {classes}")
    items = []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(os.path.join(root, cls))):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    items.append(SourceItem(os.path.join(prefix, rel) if prefix else rel, label, split))
    return items, classes


def scan_source(src: str, op: str = _ENC) -> tuple[list[SourceItem], list[str]]:
    """The items of SRC in a fixed order: ``digits``, or an ImageFolder tree (``class/…/image``), or a tree with
    ``train/`` and ``val/`` ImageFolder subtrees (the split is kept). Errors name ``op`` (the command)."""
    if src == "digits":
        from sklearn.datasets import load_digits

        target = load_digits().target
        # "<label>/<index>": decrypted, the digits form an ImageFolder tree
        return [SourceItem(f"{t}/{i:04d}", int(t), None) for i, t in enumerate(target)], [str(c) for c in range(10)]
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{op}: {src!r} must be 'digits' or an image folder (it is not a directory)")
    tr, va = os.path.join(src, "train"), os.path.join(src, "val")
    if os.path.isdir(tr) and os.path.isdir(va):
        a, classes = _scan_tree(tr, "train", "train", None, op)
        b, _ = _scan_tree(va, "val", "val", classes, op)
        items = a + b
    else:
        items, classes = _scan_tree(src, "", None, None, op)
    if not items:
        raise ValueError(f"{op}: no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {src!r}")
    return items, classes


def load_source_image(src: str, item: SourceItem, size: int) -> Tensor:
    """One source image as uint8 [3, size, size]: RGB, shorter side resized to ``size`` (bilinear, antialiased),
    centre-cropped. The digits: the 8×8 image (0..16) bilinearly upscaled, scaled to 0..255 and rounded."""
    if src == "digits":
        x = _digits_images()[int(item.path.split("/")[-1])]
        x = torch.as_tensor(x, dtype=torch.float32)[None, None] / 16.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x[0].clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1).contiguous()
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with Image.open(os.path.join(src, item.path)) as im:
        im = im.convert("RGB")
        im = TF.resize(im, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        im = TF.center_crop(im, size)
        return TF.pil_to_tensor(im).contiguous()


_DIGITS = None


def _digits_images():
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        _DIGITS = load_digits().images
    return _DIGITS


# ------------------------------------------------------------------------------------------------------------ writing


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def auto_shard_size(n: int) -> int:
    """The default images per shard for ``n`` source images: n/16 rounded up, within 16..4096 — a small folder is cut
    into ~16 shards, so an interrupted run keeps all but at most 1/16 of its work (or 4,096 images)."""
    return int(min(4096, max(16, -(-n // 16))))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in ``ppml encrypt`` / ``ppml decrypt``; ``str()`` says what was kept and how to continue (one line)."""


def _key_dtype(n_tiles: int):
    return np.int16 if n_tiles <= np.iinfo(np.int16).max + 1 else np.int32


def encrypt_dataset(
    src: str,
    dst: str,
    *,
    scheme: str = "rs",
    patch_size: int = 16,
    grid: int = 2,
    size: int = 224,
    batch_size: int = 256,
    shard_size: int | None = None,
    device: str = "auto",
    keys: str | None = None,
    key_seed: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Encrypts SRC into DST (see the module docstring); resumes an interrupted run with the same arguments.

    ``workers`` threads decode and resize (default: min(8, CPUs)); the output does not depend on it.
    ``shard_size`` (default :func:`auto_shard_size`) is also the resume granularity: a resumed run keeps every
    finished shard and redoes at most one. Interrupted (Ctrl-C), it raises :class:`Interrupted` saying what was kept.

    Returns a summary: images written, skipped, seconds spent decoding/resizing, encrypting (the ppml op, including
    the host↔device copies), writing, and images/s.
    """
    import ppml

    if scheme not in ("rs", "mi"):
        raise ValueError(f"{_ENC}: --scheme must be 'rs' or 'mi', got {scheme!r}")
    for name, v in (("patch-size", patch_size), ("grid", grid), ("size", size), ("batch-size", batch_size),
                    ("shard-size", 1 if shard_size is None else shard_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{_ENC}: --{name} must be a positive int, got {v!r}")
    if size % patch_size:
        raise ValueError(f"{_ENC}: --patch-size must divide --size, got patch_size={patch_size}, size={size}")
    if scheme == "mi" and patch_size % grid:
        raise ValueError(f"{_ENC}: --grid must divide --patch-size, got grid={grid}, patch_size={patch_size}")
    dst = os.path.abspath(dst)
    keys = os.path.abspath(keys) if keys else (dst.rstrip(os.sep) + ".keys.npy" if scheme == "rs" else None)
    if keys and os.path.commonpath([keys, dst]) == dst:
        raise ValueError(f"{_ENC}: the key file must live outside DST (trainers get DST), got --keys {keys}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    items, classes = scan_source(src)
    shard_size = shard_size if shard_size is not None else auto_shard_size(len(items))
    job = {
        "format": FORMAT, "src": src if src == "digits" else os.path.abspath(src), "scheme": scheme,
        "patch_size": patch_size, "grid": grid if scheme == "mi" else None, "size": size, "shard_size": shard_size,
        "keys": keys, "num_items": len(items),
        "items_sha256": _sha256(json.dumps([[i.path, i.label, i.split] for i in items]).encode()),
    }
    n_tiles = (size // patch_size) ** 2
    side = size // grid if scheme == "mi" else size  # the ciphertext's side

    # Every check comes before the first write: a refused command leaves nothing that would refuse the fixed one.
    job_path = os.path.join(dst, "job.json")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f"{_ENC}: DST {dst} is a file, not a folder")
    if os.path.exists(os.path.join(dst, "manifest.json")):
        raise FileExistsError(f"{_ENC}: {dst} already holds a finished encrypted dataset; choose another DST")
    resuming = bool(os.path.isdir(dst) and os.listdir(dst))
    if resuming:
        if not os.path.exists(job_path):
            raise FileExistsError(f"{_ENC}: DST {dst} exists and is not an unfinished `ppml encrypt` output; refusing "
                                  "to write into it")
        with open(job_path) as fh:
            old = json.load(fh)
        if old != job:
            diff = {k: (old.get(k), v) for k, v in job.items() if old.get(k) != v}
            raise ValueError(f"{_ENC}: DST {dst} holds an unfinished run with other arguments (or other source "
                             f"files): {diff}; re-run with the same ones to resume, or choose another DST")
    perms = None
    if scheme == "rs":
        if os.path.exists(keys):
            if not resuming:
                raise FileExistsError(f"{_ENC}: the key file {keys} already exists; refusing to overwrite keys (pass "
                                      "another --keys, or move it away)")
            perms = np.load(keys, allow_pickle=False)
            if perms.shape != (len(items), n_tiles):
                raise ValueError(f"{_ENC}: the key file {keys} holds {perms.shape}, expected {(len(items), n_tiles)}")
        elif resuming and any(n.startswith("shard-") for n in os.listdir(dst)):
            raise FileNotFoundError(f"{_ENC}: resuming {dst} but its key file {keys} is gone")
        # (resuming with no shard yet, e.g. stopped between job.json and the keys: nothing used them, draw them now)

    os.makedirs(dst, exist_ok=True)
    if not resuming:
        _write_atomic(job_path, _json_bytes(job))
    key_sha = None
    if scheme == "rs":
        if perms is None:
            gen = torch.Generator().manual_seed(key_seed) if key_seed is not None else None
            perms = ppml.random_permutations(len(items), n_tiles, generator=gen).numpy().astype(_key_dtype(n_tiles))
            os.makedirs(os.path.dirname(keys) or ".", exist_ok=True)
            _write_atomic(keys, _npy_bytes(perms))
        key_sha = _file_sha256(keys)

    _write_atomic(os.path.join(dst, "index.json"),
                  _json_bytes({"classes": classes, "items": [[i.path, i.label, i.split] for i in items]}))
    n_shards = (len(items) + shard_size - 1) // shard_size
    timing = {"decode_s": 0.0, "encrypt_s": 0.0, "write_s": 0.0}
    skipped, written, done_before = [], 0, 0
    bar = _progress_bar(total=len(items), enabled=progress, desc="encrypt", unit="img")
    t_start = time.perf_counter()
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    covered = 0  # source items in finished shards
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for k in range(n_shards):
                lo, hi = k * shard_size, min(len(items), (k + 1) * shard_size)
                names = [os.path.join(dst, f"shard-{k:05d}-{part}") for part in
                         ("images.npy", "labels.npy", "index.npy", "skipped.json")]
                if all(os.path.exists(p) for p in names):  # a finished shard from an earlier run
                    done_before += hi - lo
                    with open(names[3]) as fh:
                        skipped += json.load(fh)
                    covered += hi - lo
                    bar.update(hi - lo)
                    continue
                outs, labels, index, shard_skipped = [], [], [], []
                for b0 in range(lo, hi, batch_size):
                    t0 = time.perf_counter()
                    imgs = []
                    batch = range(b0, min(hi, b0 + batch_size))
                    for i, img in decode_items(pool, src, items, batch, size, shard_skipped):
                        imgs.append(img)
                        labels.append(items[i].label)
                        index.append(i)
                    t1 = time.perf_counter()
                    timing["decode_s"] += t1 - t0
                    if imgs:
                        x = torch.stack(imgs).to(dev)
                        if scheme == "rs":
                            perm = torch.as_tensor(perms[index[-len(imgs):]].astype(np.int64)).to(dev)
                            y = ppml.shuffle_patches(x, patch_size, perm)[0]
                        else:
                            y = ppml.mix_subpatches(x, patch_size, grid)
                        outs.append(y.cpu())
                    timing["encrypt_s"] += time.perf_counter() - t1
                    bar.update(min(hi, b0 + batch_size) - b0)
                    _postfix(bar, written + len(index), time.perf_counter() - t_start)
                t0 = time.perf_counter()
                skipped += shard_skipped
                empty = np.zeros((0, 3, side, side), np.uint8 if scheme == "rs" else np.float32)
                images = torch.cat(outs).numpy() if outs else empty
                _write_atomic(names[1], _npy_bytes(np.asarray(labels, np.int64)))
                _write_atomic(names[2], _npy_bytes(np.asarray(index, np.int64)))
                _write_atomic(names[3], _json_bytes(shard_skipped))
                # last: a shard is done when all 4 exist
                _write_atomic(names[0], _npy_bytes(np.ascontiguousarray(images)))
                written += len(index)
                covered += hi - lo
                timing["write_s"] += time.perf_counter() - t0
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"{_ENC} interrupted: {covered} of {len(items)} images are kept in {dst} (whole shards of {shard_size}); "
            "the same command resumes from there"
        ) from None
    bar.close()

    shards, total = [], 0
    for k in range(n_shards):
        base = f"shard-{k:05d}"
        files = {part: f"{base}-{part}.npy" for part in ("images", "labels", "index")}
        count = int(np.load(os.path.join(dst, files["labels"]), allow_pickle=False).shape[0])
        total += count
        shards.append({"count": count, "files": files,
                       "sha256": {p: _file_sha256(os.path.join(dst, f)) for p, f in files.items()}})
    manifest = {
        "format": FORMAT, "scheme": scheme, "patch_size": patch_size, "grid": job["grid"], "size": size,
        "channels": 3, "dtype": "uint8" if scheme == "rs" else "float32",
        "ciphertext_shape": [3, side, side],
        "value_range": [0, 255], "classes": classes, "num_images": total, "num_skipped": len(skipped),
        "splits": sorted({i.split for i in items if i.split}), "shards": shards, "keys_sha256": key_sha,
    }
    _write_atomic(os.path.join(dst, "report.json"), _json_bytes({"skipped": skipped}))
    _write_atomic(os.path.join(dst, "manifest.json"), _json_bytes(manifest))
    elapsed = time.perf_counter() - t_start
    new = len(items) - done_before
    return {
        "dst": dst, "keys": keys, "images": total, "skipped": len(skipped), "resumed_images": done_before,
        "shards": n_shards, "shard_size": shard_size,
        "seconds": round(elapsed, 3), "images_per_s": round(new / elapsed, 1) if elapsed > 0 else None,
        **{k: round(v, 3) for k, v in timing.items()},
        "encrypt_share": round(timing["encrypt_s"] / max(sum(timing.values()), 1e-9), 4),
        "device": str(dev),
    }


def decode_items(
    pool, src: str, items: list[SourceItem], indices, size: int, skipped: list
) -> list[tuple[int, Tensor]]:
    """``(i, uint8 [3, size, size])`` for every readable ``items[i]``, i in ``indices``, in order; each unreadable or
    corrupt one (truncated, not an image, ...) is appended to ``skipped`` as ``{"path", "error"}`` and left out.
    The one decode-and-skip rule of ``ppml encrypt`` and ``ppml train --data FOLDER``. Decoding and resizing release
    the GIL (PIL's C code): ``pool``'s threads scale them; map keeps the order."""
    indices = list(indices)
    out = []
    for i, img in zip(indices, pool.map(_try_load, [(src, items[i], size) for i in indices]), strict=True):
        if isinstance(img, Exception):
            skipped.append({"path": items[i].path, "error": f"{type(img).__name__}: {img}"})
        else:
            out.append((i, img))
    return out


def _try_load(args):
    try:
        return load_source_image(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc


def _postfix(bar, n: int, seconds: float) -> None:
    if seconds > 0:
        bar.set_postfix_str(f"{n / seconds:.0f} img/s")


# ------------------------------------------------------------------------------------------------------------ reading


def is_encrypted_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def read_manifest(dst: str) -> dict:
    path = os.path.join(dst, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ppml: {dst!r} is not a finished encrypted dataset (no manifest.json)")
    with open(path) as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"ppml: {dst!r} has format {manifest.get('format')!r}, this ppml reads {FORMAT!r}")
    return manifest


def load_shards(dst: str, *, verify: bool = True) -> tuple[Tensor, Tensor, Tensor, dict]:
    """All shards of DST: (ciphertext as stored, labels int64 [N], source index int64 [N], manifest); with
    ``verify`` every file's SHA-256 is checked against the manifest."""
    manifest = read_manifest(dst)
    xs, ys, idx = [], [], []
    for shard in manifest["shards"]:
        arrays = _read_shard(dst, shard, ("images", "labels", "index"), verify)
        xs.append(torch.from_numpy(arrays["images"]))
        ys.append(torch.from_numpy(arrays["labels"]))
        idx.append(torch.from_numpy(arrays["index"]))
    return torch.cat(xs), torch.cat(ys), torch.cat(idx), manifest


def _read_shard(dst: str, shard: dict, parts, verify: bool) -> dict:
    from .._paths import safe_output_path

    arrays = {}
    for part in parts:
        name = shard["files"][part]
        # a manifest's file names stay inside DST (a tampered one could otherwise point the reader anywhere)
        path = safe_output_path(dst, name, f"ppml: {dst}/manifest.json")
        if verify and _file_sha256(path) != shard["sha256"][part]:
            raise ValueError(f"ppml: {path} does not match its SHA-256 in the manifest (corrupt or modified)")
        arrays[part] = np.load(path, allow_pickle=False)
    return arrays


def load_encrypted(dst: str, val_fraction: float = 0.2, split_seed: int = 0):
    """An encrypted dataset as a :class:`ppml.data.TensorSplit` of float32 ciphertext in [0, 1] (RS: uint8 / 255 —
    scaling commutes with the shuffle; MI: the stored 0..255 means / 255). The split: the source's train/val folders
    when it had them, else the fixed stratified split of :func:`ppml.data.load_digits`. Also returns the manifest."""
    from .datasets import TensorSplit, stratified_split

    x, y, idx, manifest = load_shards(dst)
    x = x.float() / 255.0
    if manifest["splits"]:
        splits = [it[2] for it in _index_items(dst)]
        is_val = torch.tensor([splits[i] == "val" for i in idx.tolist()])
        tr, va = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    else:
        tr, va = stratified_split(y, val_fraction, split_seed)
    return TensorSplit(x[tr], y[tr], x[va], y[va], list(manifest["classes"])), manifest


# ------------------------------------------------------------------------------------------------------------ decrypt


def check_key_file(dst: str, keys: str, manifest: dict, op: str = _DEC) -> None:
    """Raises unless DST is RS and ``keys`` is the key file `ppml encrypt` wrote for it (its SHA-256)."""
    if manifest["scheme"] != "rs":
        raise ValueError(f"{op}: only RS is invertible; {dst!r} holds {manifest['scheme']!r} ciphertext (MI mixes "
                         "g² pixels into one: there is no key and no inverse)")
    if not os.path.isfile(keys):
        raise FileNotFoundError(f"{op}: --keys {keys!r} is not a file")
    if _file_sha256(keys) != manifest["keys_sha256"]:
        raise ValueError(f"{op}: {keys!r} is not the key file of {dst!r} (its SHA-256 differs from the manifest's)")


def load_samples(dst: str, count: int) -> tuple[Tensor, Tensor, list[str], dict]:
    """The first ``count`` images of the encrypted dataset DST, reading (and checking) only the shards they lie in:
    (ciphertext as stored [n, 3, s, s], source index int64 [n], their source paths, manifest)."""
    manifest = read_manifest(dst)
    xs, idx, n = [], [], 0
    for shard in manifest["shards"]:
        if n >= count:
            break
        if not shard["count"]:
            continue
        arrays = _read_shard(dst, shard, ("images", "index"), verify=True)
        take = min(count - n, shard["count"])
        xs.append(torch.from_numpy(arrays["images"][:take]))
        idx.append(torch.from_numpy(arrays["index"][:take]))
        n += take
    if not n:
        raise ValueError(f"ppml: the encrypted dataset {dst!r} holds no images")
    items = _index_items(dst)
    idx = torch.cat(idx)
    return torch.cat(xs), idx, [str(items[i][0]) for i in idx.tolist()], manifest


def _index_items(dst: str) -> list:
    """DST/index.json's items: one ``[source path, label, split]`` per image, in shard order."""
    with open(os.path.join(dst, "index.json")) as fh:
        return json.load(fh)["items"]


_DECRYPT_MARK = ".ppml-decrypt.json"  # in OUT while a decryption is unfinished: the same command resumes it


def decrypt_dataset(dst: str, out: str, keys: str, *, progress: bool = True) -> dict:
    """RS only: writes every image of DST, decrypted with KEYS, as a lossless PNG to ``OUT/<path of the source
    item>.png`` — bit for bit the resized source image. Refuses a key file that is not DST's, a non-empty OUT (unless
    it is this decryption, interrupted: then the images already written are kept and the rest follow) and any output
    path from ``index.json`` that would land outside OUT (checked for every image before the first write).
    Interrupted (Ctrl-C), it raises :class:`Interrupted` saying what was kept."""
    from PIL import Image

    import ppml

    from .._paths import safe_output_path

    manifest = read_manifest(dst)
    check_key_file(dst, keys, manifest)
    mark = {"dst": os.path.abspath(dst), "keys_sha256": manifest["keys_sha256"]}
    mark_path = os.path.join(out, _DECRYPT_MARK)
    resuming = False
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{_DEC}: OUT {out!r} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if os.path.isfile(mark_path):
            with open(mark_path) as fh:
                resuming = json.load(fh) == mark
        if not resuming:
            raise FileExistsError(f"{_DEC}: OUT {out!r} is not empty; refusing to overwrite")
    items = _index_items(dst)
    # every output path is checked before anything is written
    x, _, idx, _ = load_shards(dst)
    paths, seen = {}, set()
    for i in idx.tolist():
        rel = items[i][0] if isinstance(items[i][0], str) else None
        path = safe_output_path(out, None if rel is None else rel + ".png", f"{_DEC}: {dst}/index.json item {i}")
        if path in seen:
            raise ValueError(f"{_DEC}: {dst}/index.json names {rel!r} twice (a tampered file?); nothing was written")
        paths[i] = path
        seen.add(path)
    perms = np.load(keys, allow_pickle=False)
    p = manifest["patch_size"]
    os.makedirs(out, exist_ok=True)
    if not resuming:
        _write_atomic(mark_path, _json_bytes(mark))
    bar = _progress_bar(total=len(idx), enabled=progress, desc="decrypt", unit="img")
    done = 0
    try:
        for b in torch.arange(len(idx)).split(256):
            perm = torch.as_tensor(perms[idx[b].numpy()].astype(np.int64))
            plain = ppml.unshuffle_patches(x[b], perm, p)
            for j, i in enumerate(idx[b].tolist()):
                path = paths[i]
                if not (resuming and os.path.exists(path)):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    buf = io.BytesIO()
                    Image.fromarray(plain[j].permute(1, 2, 0).numpy()).save(buf, format="PNG")
                    _write_atomic(path, buf.getvalue())  # whole files only: a resumed run keeps what exists
                done += 1
            bar.update(len(b))
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(f"{_DEC} interrupted: {done} of {len(idx)} images are written to {out}; the same command "
                          "writes the rest") from None
    bar.close()
    os.remove(mark_path)
    return {"out": out, "images": len(idx)}
