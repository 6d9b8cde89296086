"""The data owner's side: ``ppml encrypt`` (a folder or the digits → WebDataset shards), ``ppml decrypt`` (RS shards +
key → the exact resized images) and reading encrypted shards for training.

What goes where (``ppml-wds`` version 1; the shard format is in :mod:`ppml.data.wds_shards`)::

    DST/                 shard-000000.tar ... and manifest.json: ciphertext, labels and opaque ids only — no source
                         file or class name anywhere; this is what a trainer gets
    KEY (DST.key)        the 256-bit master key (JSON, mode 0600, a few hundred bytes whatever N): every image's id
                         and RS permutation derive from it (:mod:`ppml.data.masterkey`); refused inside DST
    KEY.index.json       the owner-side index: id → source path, label, split; the class names; the corrupt-image
                         report. Next to the key, never in DST (``--index`` moves it)

The source list is sorted by path; image ``i`` of it gets the id HMAC(key, i). Shards hold consecutive runs of that
list (``--shard-size``, default :func:`auto_shard_size`), written atomically and byte-reproducibly, so a killed run
re-run with the same arguments skips its finished shards and ends byte-identical to an uninterrupted run — with one
process, ``--workers N`` processes or ``--engine ray`` alike (:mod:`ppml.data.engines`). Every refusal is decided
before the first write. Datasets of the earlier ``ppml-encrypted-v1`` format are still read (:mod:`.legacy_v1`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time

import numpy as np
import torch
from torch import Tensor

from .._progress import progress as _progress_bar
from . import legacy_v1, wds_shards
from .masterkey import MasterKey, derive_permutation, derive_permutations, is_key_file, new_master_key, read_key_file
from .masterkey import write_key_file as _write_key_file
from .source import IMAGE_EXTENSIONS, SourceItem, decode_items, load_source_image, scan_source
from .wds_shards import json_bytes, write_atomic

__all__ = [
    "IMAGE_EXTENSIONS", "SourceItem", "decode_items", "load_source_image", "scan_source", "encrypt_dataset",
    "decrypt_one", "load_encrypted", "load_shards", "load_samples", "read_manifest",
    "is_encrypted_dataset", "check_key_file", "sample_permutations", "auto_shard_size", "Interrupted",
]  # fmt: skip

FORMAT = wds_shards.FORMAT
_ENC, _DEC = "ppml encrypt", "ppml decrypt"
_JOB = "job.json"  # in DST while a run is unfinished (parameters and MACs only: no names)
INDEX_FORMAT = "ppml-owner-index"


def auto_shard_size(n: int) -> int:
    """The default images per shard for ``n`` source images: n/16 rounded up, within 16..4096 — a small folder is cut
    into ~16 shards, so an interrupted run keeps all but at most 1/16 of its work (or 4,096 images)."""
    return int(min(4096, max(16, -(-n // 16))))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in ``ppml encrypt`` / ``ppml decrypt``; ``str()`` says what was kept and how to continue (one line)."""


def default_key_path(dst: str) -> str:
    return os.path.abspath(dst).rstrip(os.sep) + ".key"


def default_index_path(keys: str) -> str:
    return keys + ".index.json"


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def _seeded_key(seed: int, scheme: str, params: dict) -> MasterKey:
    # --key-seed: reproducible keys for tests and demos; anyone who knows the seed knows the key
    raw = hashlib.sha256(b"ppml-key-seed" + int(seed).to_bytes(16, "big", signed=True)).digest()
    return MasterKey(raw, scheme, dict(params), "seeded")


def _job(mk: MasterKey, params: dict, shard_size: int, src: str, items: list[SourceItem]) -> dict:
    listing = json.dumps([src if src == "digits" else os.path.abspath(src)] + [[i.path, i.label] for i in items])
    return {
        "format": "ppml-wds-job", **params, "shard_size": shard_size, "num_items": len(items),
        "key_fingerprint": mk.fingerprint,
        # the source folder and file list, keyed: a resumed run must see the same ones, DST must not see names
        "source_mac": hmac.new(mk.key, listing.encode(), hashlib.sha256).hexdigest(),
    }  # fmt: skip


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
    index: str | None = None,
    key_seed: int | None = None,
    workers: int | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
) -> dict:
    """Encrypts SRC into DST (see the module docstring); resumes an interrupted run with the same arguments.

    ``workers``: with ``engine="local"``, 1 (default) encrypts in this process (decode threads: min(8, CPUs)) and N > 1
    in N spawned processes; with ``engine="ray"`` shards are Ray tasks (``ray_address``: a cluster; default a local
    Ray with ``workers`` CPUs). The output does not depend on either. ``keys`` (default ``DST.key``) and ``index``
    (default ``KEYS.index.json``) must lie outside DST. Interrupted (Ctrl-C), it raises :class:`Interrupted`.

    Returns a summary: images written, skipped, seconds spent decoding/resizing, encrypting and writing (summed over
    workers), images/s, where the key and the owner-side index are.
    """
    from . import engines

    if scheme not in ("rs", "mi"):
        raise ValueError(f"{_ENC}: --scheme must be 'rs' or 'mi', got {scheme!r}")
    for name, v in (("patch-size", patch_size), ("grid", grid), ("size", size), ("batch-size", batch_size),
                    ("shard-size", 1 if shard_size is None else shard_size),
                    ("workers", 1 if workers is None else workers)):  # fmt: skip
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{_ENC}: --{name} must be a positive int, got {v!r}")
    if size % patch_size:
        raise ValueError(f"{_ENC}: --patch-size must divide --size, got patch_size={patch_size}, size={size}")
    if scheme == "mi" and patch_size % grid:
        raise ValueError(f"{_ENC}: --grid must divide --patch-size, got grid={grid}, patch_size={patch_size}")
    if scheme == "mi" and grid > 16:
        raise ValueError(f"{_ENC}: --grid must be <= 16 (MI sums of g² uint8 values are stored as uint16), got {grid}")
    if engine not in engines.ENGINES:
        raise ValueError(f"{_ENC}: --engine must be one of {engines.ENGINES}, got {engine!r}")
    if engine == "ray":
        engines.import_ray()  # the missing extra is reported before anything is written
    dst = os.path.abspath(dst)
    keys = os.path.abspath(keys) if keys else default_key_path(dst)
    index = os.path.abspath(index) if index else default_index_path(keys)
    for what, path in (("key file (--keys)", keys), ("owner-side index (--index)", index)):
        if _inside(path, dst):
            raise ValueError(f"{_ENC}: the {what} must live outside DST (trainers get DST), got {path}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)

    found, classes = scan_source(src)
    items = sorted(found, key=lambda it: it.path)  # ids are indices into the sorted list: names never matter
    shard_size = shard_size if shard_size is not None else auto_shard_size(len(items))
    params = {"scheme": scheme, "patch_size": patch_size, "image_size": size, "channels": 3,
              "mix_group": grid if scheme == "mi" else None}  # fmt: skip

    # Every check comes before the first write: a refused command leaves nothing that would refuse the fixed one.
    job_path = os.path.join(dst, _JOB)
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f"{_ENC}: DST {dst} is a file, not a folder")
    if os.path.exists(os.path.join(dst, wds_shards.MANIFEST)):
        raise FileExistsError(f"{_ENC}: {dst} already holds a finished encrypted dataset; choose another DST")
    resuming = bool(os.path.isdir(dst) and os.listdir(dst))
    mk = None
    if resuming:
        if not os.path.exists(job_path):
            raise FileExistsError(
                f"{_ENC}: DST {dst} exists and is not an unfinished `ppml encrypt` output; refusing to write into it"
            )
        with open(job_path) as fh:
            old = json.load(fh)
        has_shards = any(n.startswith("shard-") and n.endswith(".tar") for n in os.listdir(dst))
        if os.path.exists(keys):
            mk = read_key_file(keys, _ENC)
        elif has_shards:
            raise FileNotFoundError(f"{_ENC}: resuming {dst} but its key file {keys} is gone")
        if mk is not None:
            job = _job(mk, params, shard_size, src, items)
            if old != job:
                diff = {k: (old.get(k), v) for k, v in job.items() if old.get(k) != v}
                raise ValueError(
                    f"{_ENC}: DST {dst} holds an unfinished run with other arguments (or other source "
                    f"files, or another key): {diff}; re-run with the same ones to resume, or choose "
                    "another DST"
                )
        # (no key file and no shard: stopped between job.json and the key; nothing used a key, make one now)
    elif os.path.exists(keys):
        raise FileExistsError(
            f"{_ENC}: the key file {keys} already exists; refusing to overwrite a key (pass another "
            "--keys, or move it away)"
        )
    elif os.path.exists(index):
        raise FileExistsError(f"{_ENC}: the owner-side index {index} already exists; refusing to overwrite it")

    if mk is None:
        mk = _seeded_key(key_seed, scheme, params) if key_seed is not None else new_master_key(scheme, params)
    job = _job(mk, params, shard_size, src, items)
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(dst):  # the temporary files of a killed run
        if ".tmp" in name and name.startswith(("shard-", _JOB, wds_shards.MANIFEST)):
            os.remove(os.path.join(dst, name))
    if not os.path.exists(keys):
        write_atomic(job_path, json_bytes(job))  # first: a DST with a job.json is ours to resume
        _write_key_file(mk, keys, _ENC)
    ids = [mk.sample_id(i) for i in range(len(items))]
    _write_owner_index(index, mk, src, classes, items, ids, None, dst)

    n_shards = (len(items) + shard_size - 1) // shard_size
    n_tiles = (size // patch_size) ** 2
    threads = min(8, os.cpu_count() or 1)
    ray_cpus = workers if engine == "ray" and not ray_address else None  # None: a local Ray takes every CPU
    workers = workers or 1
    results: dict[int, dict] = {}
    done_before = 0
    todo = []
    for k in range(n_shards):
        lo, hi = k * shard_size, min(len(items), (k + 1) * shard_size)
        path = os.path.join(dst, wds_shards.shard_name(k))
        if os.path.exists(path):  # a finished shard of an earlier run: who is missing in it was corrupt
            present = set(wds_shards.tar_ids(path))
            missing = [j for j in range(lo, hi) if ids[j] not in present]
            results[k] = {"k": k, "count": hi - lo - len(missing), "sha256": wds_shards.file_sha256(path),
                          "corrupt": _recheck_corrupt(src, items, missing, size, lo)}  # fmt: skip
            done_before += hi - lo
        else:
            todo.append((k, lo, hi))

    def tasks():
        for k, lo, hi in todo:
            perms = None
            if scheme == "rs":  # derived here: the workers get permutations, never the master key
                perms = derive_permutations(mk.key, ids[lo:hi], n_tiles)
                perms = perms.astype(np.int16 if n_tiles <= 32768 else np.int32)  # 1/4 of the pickled bytes
            yield {"k": k, "dst": dst, "src": src, "scheme": scheme, "patch_size": patch_size, "grid": grid,
                   "size": size, "batch_size": batch_size, "paths": [it.path for it in items[lo:hi]],
                   "labels": [it.label for it in items[lo:hi]], "ids": ids[lo:hi], "perms": perms,
                   "device": str(dev) if engine == "local" and workers == 1 else "cpu",
                   "threads": threads if engine == "local" and workers == 1 else 1}  # fmt: skip

    bar = _progress_bar(total=len(items), enabled=progress, desc="encrypt", unit="img")
    bar.update(done_before)
    t_start = time.perf_counter()
    covered = [done_before]

    def on_done(res: dict) -> None:
        results[res["k"]] = res
        n = min(len(items), (res["k"] + 1) * shard_size) - res["k"] * shard_size
        covered[0] += n
        bar.update(n)
        if time.perf_counter() > t_start:
            bar.set_postfix_str(f"{(covered[0] - done_before) / (time.perf_counter() - t_start):.0f} img/s")

    try:
        if engine == "ray":
            engines.run_ray(tasks(), on_done, address=ray_address, workers=ray_cpus)
        elif workers > 1:
            engines.run_processes(tasks(), workers, on_done)
        else:
            engines.run_local(tasks(), on_done)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"{_ENC} interrupted: {covered[0]} of {len(items)} images are kept in {dst} (whole shards of "
            f"{shard_size}); the same command resumes from there"
        ) from None
    bar.close()

    corrupt = []
    for k in range(n_shards):
        lo = k * shard_size
        corrupt += [{"id": ids[lo + j], "path": items[lo + j].path, "error": err} for j, err in results[k]["corrupt"]]
    bad = {c["id"] for c in corrupt}
    n_train = sum(1 for it, sid in zip(items, ids, strict=True) if it.split != "val" and sid not in bad)
    manifest = {
        "format": FORMAT, "version": wds_shards.VERSION, **{k: v for k, v in params.items() if v is not None},
        "count": sum(results[k]["count"] for k in range(n_shards)), "num_classes": len(classes),
        "shards": [{"name": wds_shards.shard_name(k), "count": results[k]["count"], "sha256": results[k]["sha256"]}
                   for k in range(n_shards)],
        "corrupt": len(corrupt), "val_start": n_train if any(it.split == "val" for it in items) else None,
        "key_fingerprint": mk.fingerprint,
    }  # fmt: skip
    _write_owner_index(index, mk, src, classes, items, ids, corrupt, dst)
    write_atomic(os.path.join(dst, wds_shards.MANIFEST), json_bytes(manifest))
    os.remove(job_path)
    elapsed = time.perf_counter() - t_start
    timing = {t: sum(r.get(t, 0.0) for r in results.values()) for t in ("decode_s", "encrypt_s", "write_s")}
    new = len(items) - done_before
    return {
        "dst": dst, "keys": keys, "index": index, "images": manifest["count"], "skipped": len(corrupt),
        "resumed_images": done_before, "shards": n_shards, "shard_size": shard_size,
        "seconds": round(elapsed, 3), "images_per_s": round(new / elapsed, 1) if elapsed > 0 else None,
        **{k: round(v, 3) for k, v in timing.items()},
        "encrypt_share": round(timing["encrypt_s"] / max(sum(timing.values()), 1e-9), 4),
        # CPU seconds per new image, summed over the processes that made the shards: the cost in core-seconds
        "cpu_s_per_image": round(sum(r.get("cpu_s", 0.0) for r in results.values()) / new, 5) if new else None,
        "device": str(dev) if engine == "local" and workers == 1 else "cpu", "engine": engine, "workers": workers,
    }  # fmt: skip


def _recheck_corrupt(src: str, items: list[SourceItem], missing: list[int], size: int, lo: int) -> list:
    """The error of each image a finished shard left out (DST does not say why: that would be a name's business)."""
    from concurrent.futures import ThreadPoolExecutor

    if not missing:
        return []
    skipped: list[dict] = []
    with ThreadPoolExecutor(1) as pool:
        decode_items(pool, src, items, missing, size, skipped)
    errors = {s["path"]: s["error"] for s in skipped}
    return [[j - lo, errors.get(items[j].path, "unreadable in an earlier run")] for j in missing]


def _write_owner_index(path, mk, src, classes, items, ids, corrupt, dst) -> None:
    doc = {
        "format": INDEX_FORMAT, "version": 1, "dst": dst, "src": src if src == "digits" else os.path.abspath(src),
        "key_fingerprint": mk.fingerprint, "classes": classes,
        "items": [[sid, it.path, it.label, it.split] for sid, it in zip(ids, items, strict=True)],
        "corrupt": corrupt,  # None until the run is finished
    }  # fmt: skip
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, json_bytes(doc), mode=0o600)  # the names are what DST hides: owner-only, like the key


# ------------------------------------------------------------------------------------------------------------ reading


def is_encrypted_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def read_manifest(dst: str) -> dict:
    """DST's manifest (either format), checked; a ppml-wds manifest also gets the v1 names the trainer reads
    (``size``, ``grid``, ``classes``: class names are not in DST, so they are "0", "1", ...)."""
    path = os.path.join(dst, wds_shards.MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ppml: {dst!r} is not a finished encrypted dataset (no manifest.json)")
    try:
        with open(path) as fh:
            manifest = json.load(fh)
    except ValueError as exc:
        raise ValueError(f"ppml: {path} is not valid JSON ({exc})") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == legacy_v1.FORMAT:
        return manifest
    if fmt != FORMAT:
        raise ValueError(f"ppml: {dst!r} has format {fmt!r}, this ppml reads {FORMAT!r} and {legacy_v1.FORMAT!r}")
    wds_shards.check_manifest(dst, manifest)
    return {**manifest, "size": manifest["image_size"], "grid": manifest.get("mix_group"),
            "classes": [str(c) for c in range(manifest["num_classes"])], "num_images": manifest["count"]}  # fmt: skip


def _as_float_means(x: np.ndarray, manifest: dict) -> Tensor:
    """MI's stored integer sums → the op's float32 means (bit for bit: the sum times the float 1/g², as the op does)."""
    g = manifest["mix_group"]
    return torch.from_numpy(x.astype(np.float32)) * (1.0 / (g * g))


def load_shards(dst: str, *, verify: bool = True, count: int | None = None) -> tuple[Tensor, Tensor, list, dict]:
    """The first ``count`` (all: None) images of DST: (ciphertext — RS uint8 [N, C, S, S]; MI the op's float32 means
    [N, C, S/g, S/g] —, labels int64 [N], their ids (v1: source indices), manifest); with ``verify`` every shard's
    SHA-256 is checked."""
    manifest = read_manifest(dst)
    if manifest["format"] == legacy_v1.FORMAT:
        x, y, idx = legacy_v1.load_shards(dst, manifest, verify, count)
        return x, y, idx.tolist(), manifest
    xs, ys, ids = [], [], []
    for k, shard in enumerate(manifest["shards"]):
        if count is not None and len(ids) >= count:
            break
        if not shard["count"]:
            continue
        sids, x, y = wds_shards.read_shard(dst, manifest, k, verify)
        take = len(sids) if count is None else min(count - len(ids), len(sids))
        ids += sids[:take]
        xs.append(x[:take])
        ys.append(y[:take])
    c, s = manifest["channels"], manifest["image_size"] // (manifest.get("mix_group") or 1)
    x = np.concatenate(xs) if xs else np.zeros((0, c, s, s), np.uint8 if manifest["scheme"] == "rs" else np.uint16)
    xt = torch.from_numpy(x) if manifest["scheme"] == "rs" else _as_float_means(x, manifest)
    y = torch.from_numpy(np.concatenate(ys)) if ys else torch.zeros(0, dtype=torch.long)
    return xt, y, ids, manifest


def load_encrypted(dst: str, val_fraction: float = 0.2, split_seed: int = 0):
    """An encrypted dataset as a :class:`ppml.data.TensorSplit` of float32 ciphertext in [0, 1] (RS: uint8 / 255 —
    scaling commutes with the shuffle; MI: the 0..255 means / 255). The split: the source's train/val folders when it
    had them, else the fixed stratified split of :func:`ppml.data.load_digits`. Also returns the manifest."""
    from .datasets import TensorSplit, stratified_split

    x, y, ids, manifest = load_shards(dst)
    x = x.float() / 255.0
    if manifest["format"] == legacy_v1.FORMAT:
        is_val = legacy_v1.val_mask(dst, manifest, torch.as_tensor(ids, dtype=torch.long))
    elif manifest.get("val_start") is not None:  # sorted sources: train/… before val/…
        is_val = torch.arange(len(y)) >= int(manifest["val_start"])
    else:
        is_val = None
    if is_val is not None:
        tr, va = torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()
    else:
        tr, va = stratified_split(y, val_fraction, split_seed)
    return TensorSplit(x[tr], y[tr], x[va], y[va], list(manifest["classes"])), manifest


def load_samples(dst: str, count: int) -> tuple[Tensor, list, list, dict]:
    """The first ``count`` images of DST, reading (and checking) only the shards they lie in: (ciphertext as
    :func:`load_shards` gives it, their ids (v1: source indices), their labels, manifest)."""
    x, y, ids, manifest = load_shards(dst, count=count)
    if not len(ids):
        raise ValueError(f"ppml: the encrypted dataset {dst!r} holds no images")
    return x, ids, y.tolist(), manifest


# ------------------------------------------------------------------------------------------------------------ decrypt


def check_key_file(dst: str, keys: str, manifest: dict, op: str = _DEC) -> MasterKey | None:
    """Raises unless DST is RS and ``keys`` is the key file `ppml encrypt` wrote for it; returns the master key
    (None for a v1 dataset, whose key file is a permutation table)."""
    if manifest["scheme"] != "rs":
        raise ValueError(
            f"{op}: only RS is invertible; {dst!r} holds {manifest['scheme']!r} ciphertext (MI mixes "
            "g² pixels into one: there is no inverse)"
        )
    if manifest["format"] == legacy_v1.FORMAT:
        legacy_v1.check_key_file(dst, keys, manifest, op)
        return None
    if os.path.isfile(keys) and not is_key_file(keys):
        raise ValueError(f"{op}: {keys!r} is not a ppml key file (a v1 .npy permutation table fits only v1 datasets)")
    mk = read_key_file(keys, op)
    if mk.fingerprint != manifest.get("key_fingerprint"):
        raise ValueError(f"{op}: {keys!r} is not the key file of {dst!r} (its fingerprint differs from the manifest's)")
    return mk


def sample_permutations(dst: str, keys: str, manifest: dict, ids: list, op: str = _DEC) -> Tensor:
    """The RS permutations (int64 [n, T]) of the images ``ids`` of DST (as :func:`load_shards` names them)."""
    mk = check_key_file(dst, keys, manifest, op)
    if mk is None:
        return legacy_v1.permutations(keys, torch.as_tensor(ids, dtype=torch.long))
    n = (manifest["image_size"] // manifest["patch_size"]) ** 2
    return torch.from_numpy(derive_permutations(mk.key, ids, n))


def decrypt_one(keys: str | MasterKey, sample_id: str, ciphertext: Tensor, patch_size: int) -> Tensor:
    """One RS image back from its ciphertext ([C, H, W]) with only the master key (a key file's path, or a loaded
    :class:`~ppml.data.masterkey.MasterKey`) and the image's id (its ``__key__`` in the shards)."""
    import ppml

    mk = keys if isinstance(keys, MasterKey) else read_key_file(keys, "ppml.data.decrypt_one")
    if not isinstance(ciphertext, Tensor) or ciphertext.dim() != 3:
        got = tuple(ciphertext.shape) if isinstance(ciphertext, Tensor) else type(ciphertext).__name__
        raise ValueError(f"ppml.data.decrypt_one: ciphertext must be a [C, H, W] tensor, got {got}")
    h, w = ciphertext.shape[1:]
    if not isinstance(patch_size, int) or patch_size <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"ppml.data.decrypt_one: patch_size must divide H={h} and W={w}, got {patch_size!r}")
    perm = torch.from_numpy(derive_permutation(mk.key, sample_id, (h // patch_size) * (w // patch_size)))
    return ppml.unshuffle_patches(ciphertext[None], perm[None], patch_size)[0]
