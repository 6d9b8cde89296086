"""Streaming training data in bounded memory: WebDataset-style tar shards (``ppml-wds``) or an image folder, read by
DataLoader workers, split by DDP rank and worker, shuffled through a bounded buffer, decoded (and, for a folder in
owner mode, encrypted) in the workers, resumable at any step.

**The DST it reads** (``ppml-wds`` version 1)::

    DST/manifest.json        {"format": "ppml-wds", "version": 1, "scheme": "rs"|"mi", "patch_size", "image_size",
                              "channels", "mix_group" (MI), "count", "num_classes", "shards": [{"name", "count",
                              "sha256"}, ...]}
    DST/shard-000000.tar     per sample: <id>.png (RS ciphertext, uint8 H×W×C, lossless) or <id>.npy (MI: uint16
                             sub-patch sums [C, H/g, W/g]; the image is sums / g² / 255), and <id>.cls (ASCII label)

Tars are read with the standard :mod:`tarfile` (no extra dependency): its headers give every member's offset, which
is what lets a resumed stream skip the samples already trained on without reading them. A shard entry may carry
``"split": "train"|"val"``; a manifest with ``"val_start"`` (what ``ppml encrypt`` writes when the source had
train/ and val/ folders: the sorted samples from that global position on are validation) splits there, as the
in-memory loader does; without either, every 5th sample of each shard (position ``i % 5 == 4``) is held out for
validation (20 %, fixed, independent of the seed).

**An epoch** (:func:`epoch_plan`): the units (shards; single files for a folder, which reads at random anyway) are
permuted with a generator seeded by ``(seed, epoch)``, laid end to end, and the resulting sequence of N samples is cut
into ``C = world × workers`` contiguous ranges of ⌊N/C⌋ or ⌈N/C⌉ samples, one per (rank, worker) consumer. A consumer
reads whole shards in the middle of its range and a part of the shard at either end (with C > shards, a shard is
shared by several consumers at file level): every sample is read by exactly one consumer, and shards are read
sequentially. Consumers one short of ⌈N/C⌉ take one padding sample (the next consumer's first, as torch's
DistributedSampler wraps), so all emit the same number of samples and every rank takes the same number of steps.
Each consumer passes its samples through a shuffle buffer (``shuffle_buffer`` encoded samples, a generator seeded by
``(seed, epoch, consumer)``), decodes them and yields batches of ``batch_size`` (its last one may be smaller). With
``batch_size=None`` a DataLoader returns worker ``s % W``'s batches at step ``s``, round robin.

**Resume** (``set_epoch(epoch, skip_steps=k)``): the stream restarts at rank-level step k exactly. Each consumer
replays its plan on headers only (no payload read, no decode) for the samples of the batches already consumed; the
few still in the buffer at step k are then read by offset. The workers are renumbered so that the first one the
DataLoader asks serves step k. The same batches follow as in an uninterrupted run.

**Memory** (every process, independent of the dataset's size): a worker holds ``shuffle_buffer`` encoded samples
(224 px RS PNG ≈ 100-150 KB, MI npy ≈ 75 KB) plus one batch being decoded (``batch_size`` × C×H×W bytes, uint8;
float32 for MI); the main process holds ``prefetch_factor × workers`` decoded batches in flight (DataLoader default
2 per worker) plus the model. The only O(N) terms: the epoch's unit permutation (8 bytes per shard; per image for a
folder) and, for a folder, its file index (the paths, about 50-100 bytes per image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from .._progress import progress
from .wds_shards import file_sha256

FORMAT = "ppml-wds"
VERSION = 1
VAL_EVERY = 5  # without split info, sample i of a shard is validation when i % VAL_EVERY == VAL_EVERY - 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")
_OP = "ppml.data.stream"
_U64 = (1 << 64) - 1  # NumPy seeds are non-negative: a negative --seed is taken mod 2**64

__all__ = [
    "FORMAT",
    "FolderSource",
    "OwnerEncryption",
    "ShardSource",
    "StreamDataset",
    "epoch_plan",
    "is_stream_dataset",
    "load_stream_split",
    "read_stream_manifest",
]


# ------------------------------------------------------------------------------------------------------------ manifest


def is_stream_dataset(path: str) -> bool:
    """True when ``path/manifest.json`` says ``"format": "ppml-wds"`` (the old NumPy-shard format says otherwise)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        return False
    try:
        with open(mpath) as fh:
            return json.load(fh).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_stream_manifest(dst: str) -> dict:
    """DST's manifest, checked: the format and version, the scheme's fields, every shard named inside DST with a
    non-negative count, and the counts summing to ``count``."""
    from .._paths import safe_output_path

    where = f"{_OP}: {dst}/manifest.json"
    with open(os.path.join(dst, "manifest.json")) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(
            f"{where}: expected format {FORMAT!r} version {VERSION}, got {m.get('format')!r} version "
            f"{m.get('version')!r}"
        )
    if m.get("scheme") not in ("rs", "mi"):
        raise ValueError(f"{where}: scheme must be 'rs' or 'mi', got {m.get('scheme')!r}")
    need = ["patch_size", "image_size", "channels", "count", "num_classes"] + (
        ["mix_group"] if m["scheme"] == "mi" else []
    )
    for k in need:
        if not isinstance(m.get(k), int) or m[k] <= 0:
            raise ValueError(f"{where}: {k} must be a positive int, got {m.get(k)!r}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: shards must be a non-empty list, got {shards!r}")
    for s in shards:
        safe_output_path(dst, s.get("name"), where)  # a tampered manifest cannot point the reader outside DST
        if not isinstance(s.get("count"), int) or s["count"] < 0:
            raise ValueError(f"{where}: shard {s.get('name')!r} has count {s.get('count')!r}, expected an int >= 0")
        if s.get("split", "train") not in ("train", "val"):
            raise ValueError(f"{where}: shard {s['name']!r} has split {s['split']!r}, expected 'train' or 'val'")
    total = sum(s["count"] for s in shards)
    if total != m["count"]:
        raise ValueError(f"{where}: the shards hold {total} samples, the manifest's count says {m['count']}")
    return m


# ------------------------------------------------------------------------------------------------------------- sources


class _Rec:
    """One sample on its way through a consumer: where it is (unit, position in the unit's part), where its members
    lie, and its payload once read (None while only its header was seen)."""

    __slots__ = ("u", "j", "key", "img", "cls", "payload")

    def __init__(self, u: int, j: int, key: str = "", img=None, cls=None):
        self.u, self.j, self.key, self.img, self.cls, self.payload = u, j, key, img, cls, None


class ShardSource:
    """A ``ppml-wds`` DST as units (its shards). Picklable: DataLoader workers get a copy."""

    def __init__(self, dst: str, manifest: dict | None = None):
        self.root = os.path.abspath(dst)
        self.manifest = manifest if manifest is not None else read_stream_manifest(dst)
        m = self.manifest
        self.scheme = m["scheme"]
        self.names = [s["name"] for s in m["shards"]]
        self.classes = [str(c) for c in range(m["num_classes"])]
        g = m.get("mix_group", 1) if self.scheme == "mi" else 1
        side = m["image_size"] // g
        self.shape = (m["channels"], side, side)
        self.group = g
        n = np.array([s["count"] for s in m["shards"]], dtype=np.int64)
        self.by_shard = any("split" in s for s in m["shards"])
        # val_start: the writer's global split point (sorted train/ sources before val/); per shard, the position
        # from which its samples are validation.
        self._val_from = None
        if self.by_shard:
            is_val = np.array([s.get("split") == "val" for s in m["shards"]])
            self._counts = {"train": np.where(is_val, 0, n), "val": np.where(is_val, n, 0)}
        elif m.get("val_start") is not None:
            first = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
            self._val_from = np.clip(int(m["val_start"]) - first, 0, n)
            self._counts = {"train": self._val_from, "val": n - self._val_from}
        else:
            self._counts = {"train": n - n // VAL_EVERY, "val": n // VAL_EVERY}

    def counts(self, part: str) -> np.ndarray:
        return self._counts[part]

    def verify(self, show: bool = True) -> None:
        """Checks every shard's SHA-256 against the manifest (one sequential read of DST)."""
        bar = progress(self.manifest["shards"], desc="verify shards", enabled=show, leave=False)
        for s in bar:
            path = os.path.join(self.root, s["name"])
            if "sha256" in s and file_sha256(path) != s["sha256"]:
                raise ValueError(f"{_OP}: {path} does not match its SHA-256 in the manifest (corrupt or modified)")

    def _in_part(self, part: str, u: int, i: int) -> bool:
        if self.by_shard:
            return True  # the unit's count for the other part is 0: it is never opened for it
        if self._val_from is not None:
            return (i >= self._val_from[u]) == (part == "val")
        return (i % VAL_EVERY == VAL_EVERY - 1) == (part == "val")

    def records(self, part: str, u: int, a: int, b: int, want_payload):
        """Samples a..b-1 of shard u's ``part``, in shard order; the payload is read on the way when
        ``want_payload()`` says so, else only the headers are (the tar's data are seeked over)."""
        path = os.path.join(self.root, self.names[u])
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            i = j = 0
            for key, members in _tar_samples(tf, path):
                if j >= b:
                    return
                if self._in_part(part, u, i):
                    if j >= a:
                        rec = self._rec(u, j, key, members, path)
                        if want_payload():
                            rec.payload = _read(fh, rec.img), _read(fh, rec.cls)
                        yield rec
                    j += 1
                i += 1
        if j < b:
            raise ValueError(f"{_OP}: {path} holds {j} {part} samples, the manifest promises at least {b}")

    def _rec(self, u, j, key, members, path) -> _Rec:
        want = ("npy",) if self.scheme == "mi" else IMAGE_EXTS
        img = next(((ext, *members[ext]) for ext in want if ext in members), None)
        if img is None or "cls" not in members:
            raise ValueError(
                f"{_OP}: {path}: sample {key!r} has members {sorted(members)}, expected a .cls and "
                f"{'an .npy' if self.scheme == 'mi' else 'an image (.png)'}"
            )
        return _Rec(u, j, key, img, members["cls"])

    def load(self, rec: _Rec) -> None:
        if rec.payload is None:
            with open(os.path.join(self.root, self.names[rec.u]), "rb") as fh:
                rec.payload = _read(fh, rec.img), _read(fh, rec.cls)

    def locate(self, part: str, u: int, j: int) -> _Rec:
        return next(self.records(part, u, j, j + 1, lambda: False))

    def decode(self, recs: list[_Rec]) -> dict:
        xs, ys = [], []
        for r in recs:
            where = f"{_OP}: {self.names[r.u]} sample {r.key!r}"
            img, cls = r.payload
            try:
                ys.append(int(cls.decode("ascii").strip()))
                if self.scheme == "mi":
                    arr = np.load(io.BytesIO(img), allow_pickle=False)
                else:
                    from PIL import Image

                    with Image.open(io.BytesIO(img)) as im:
                        arr = np.asarray(im)
                    arr = arr[:, :, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            except Exception as exc:  # noqa: BLE001 - a DST is checked data: anything unreadable is an error
                raise ValueError(f"{where} cannot be decoded: {type(exc).__name__}: {exc}") from None
            if tuple(arr.shape) != self.shape:
                raise ValueError(f"{where} has shape {tuple(arr.shape)}, the manifest implies {self.shape}")
            if not 0 <= ys[-1] < len(self.classes):
                raise ValueError(f"{where} has label {ys[-1]}, expected 0..{len(self.classes) - 1}")
            xs.append(torch.from_numpy(np.ascontiguousarray(arr)))
        x = torch.stack(xs)
        if self.scheme == "mi":  # uint16 sums of g² pixels -> the float mean in [0, 1]
            x = x.to(torch.float32).div_(self.group * self.group * 255.0)
        return {"x": x, "y": torch.tensor(ys, dtype=torch.int64), "skipped": []}


def _tar_samples(tf: tarfile.TarFile, path: str):
    """``(key, {ext: (offset, size)})`` per sample: consecutive members sharing the name up to the first dot of
    their basename (the WebDataset convention)."""
    key, members = None, {}
    while True:
        ti = tf.next()
        tf.members = []  # tarfile keeps every header it saw: memory would grow with the shard
        if ti is None:
            break
        if not ti.isfile():
            continue
        d, base = os.path.split(ti.name)
        stem, _, ext = base.partition(".")
        k = f"{d}/{stem}" if d else stem
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        members[ext.lower()] = (ti.offset_data, ti.size)
    if key is not None:
        yield key, members


def _read(fh, loc) -> bytes:
    off, size = loc[-2], loc[-1]
    fh.seek(off)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError(f"{_OP}: {getattr(fh, 'name', '?')} is truncated")
    return data


@dataclass
class OwnerEncryption:
    """The owner's encryption, applied by the workers to plain images of a folder (``scheme`` rs or mi)."""

    scheme: str
    patch_size: int
    grid: int
    key_seed: int


class FolderSource:
    """An image folder as units of one file each: decoded (resized, centre-cropped, exactly as ``ppml encrypt``)
    and, with ``owner``, encrypted in the workers. RS keys: one permutation per image, drawn from a generator seeded
    by (``key_seed``, the image's index in the folder), so an image gets the same key every epoch and in every
    worker. Unreadable images are reported in the batch's ``skipped`` and replaced by a readable image of the same
    batch (the batch keeps its size; its labels follow the replacement)."""

    def __init__(self, root: str, img_size: int, index, owner: OwnerEncryption | None = None):
        self.root = root
        self.img_size = img_size
        self.paths, self.labels, is_val, self.classes = index
        self._counts = {"train": (~is_val).astype(np.int64), "val": is_val.astype(np.int64)}
        self.owner = owner

    def counts(self, part: str) -> np.ndarray:
        return self._counts[part]

    def records(self, part, u, a, b, want_payload):
        if a == 0 and b >= 1:
            yield _Rec(u, 0)  # files are read when decoded: there is no sequential order to keep

    def load(self, rec) -> None:
        pass

    def locate(self, part, u, j) -> _Rec:
        return _Rec(u, 0)

    def decode(self, recs: list[_Rec]) -> dict:
        from .encrypted import SourceItem, load_source_image

        imgs, skipped = [], []
        for r in recs:
            path = self.paths[r.u].decode()
            try:
                imgs.append(load_source_image(self.root, SourceItem(path, int(self.labels[r.u]), None), self.img_size))
            except Exception as exc:  # noqa: BLE001 - reported (as `ppml encrypt` reports it) and replaced
                imgs.append(None)
                skipped.append({"path": path, "error": f"{type(exc).__name__}: {exc}"})
        good = [i for i, x in enumerate(imgs) if x is not None]
        if not good:
            names = ", ".join(f"{s['path']} ({s['error']})" for s in skipped[:5])
            return {
                "error": f"{_OP}: none of the {len(recs)} images of a batch under {self.root!r} could be read: "
                f"{names}{', ...' if len(skipped) > 5 else ''}"
            }
        units = [r.u if imgs[i] is not None else recs[good[0]].u for i, r in enumerate(recs)]
        x = torch.stack([imgs[i] if imgs[i] is not None else imgs[good[0]] for i in range(len(recs))])
        y = torch.as_tensor(self.labels[units].astype(np.int64))
        if self.owner is not None:
            x = self._encrypt(x, units)
        return {"x": x, "y": y, "skipped": skipped}

    def _encrypt(self, x: Tensor, units: list[int]) -> Tensor:
        import ppml

        o = self.owner
        if o.scheme == "mi":
            return ppml.mix_subpatches(x, o.patch_size, o.grid).div_(255.0)
        n_tiles = (self.img_size // o.patch_size) ** 2
        perm = torch.cat(
            [ppml.random_permutations(1, n_tiles, generator=image_generator(o.key_seed, u)) for u in units]
        )
        return ppml.shuffle_patches(x, o.patch_size, perm)[0]


def image_generator(key_seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s owner key: seeded by a hash of (key_seed, index), so keys of neighbouring
    images are unrelated and each image's key is drawn alone (any worker, any epoch)."""
    digest = hashlib.sha256(f"ppml-owner-key:{key_seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------------------------------------------------------- plan


def epoch_plan(
    counts: np.ndarray, consumers: int, c: int, seed: int, epoch: int, *, shuffle: bool = True, pad: bool = True
):
    """Consumer ``c``'s share of an epoch (see the module docstring).

    Returns:
        ``(segments, pads, total)``: ``segments`` lists ``(unit, a, b)`` — samples a..b-1 of the unit, in reading
        order; ``pads`` the ``(unit, j)`` samples appended to even the share out (at most one); ``total`` the
        samples every consumer emits (⌈N/C⌉ with ``pad``, else this consumer's own count).
    """
    counts = np.asarray(counts, dtype=np.int64)
    order = (
        np.random.default_rng([seed & _U64, epoch, 0x5A4D]).permutation(len(counts))
        if shuffle
        else np.arange(len(counts))
    )
    cum = np.cumsum(counts[order])
    n = int(cum[-1]) if len(cum) else 0
    lo, hi = n * c // consumers, n * (c + 1) // consumers

    def at(p: int) -> tuple[int, int]:
        k = int(np.searchsorted(cum, p, side="right"))
        u = int(order[k])
        return u, p - int(cum[k] - counts[u])

    segments, p = [], lo
    while p < hi:
        u, j = at(p)
        take = min(hi - p, int(counts[u]) - j)
        segments.append((u, j, j + take))
        p += take
    total = -(-n // consumers) if pad else hi - lo
    pads = [at((hi + i) % n) for i in range(total - (hi - lo))] if n else []
    return segments, pads, total


class StreamDataset(IterableDataset):
    """Batches of one part (``"train"`` or ``"val"``) of a source, for ``DataLoader(ds, batch_size=None,
    num_workers=workers)``; see the module docstring. Each item is ``{"x", "y", "skipped"}`` (x uint8 for RS and
    plain images, float32 in [0, 1] for MI) or ``{"error": message}``.

    Args:
        source: a :class:`ShardSource` or :class:`FolderSource`.
        part: "train" (shuffled, padded so every consumer emits the same count) or "val" (in order, not padded).
        batch_size: samples per batch.
        seed: the run's seed; the epoch order and the shuffle buffers follow from (seed, epoch).
        shuffle_buffer: samples a consumer holds to shuffle (0: read order).
        rank, world: this process's DDP rank and the world size.
        workers: the DataLoader's ``num_workers`` (0: the main process is the one consumer).
    """

    def __init__(
        self,
        source,
        part: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
    ):
        if part not in ("train", "val"):
            raise ValueError(f"{_OP}.StreamDataset: part must be 'train' or 'val', got {part!r}")
        for name, v, low in (
            ("batch_size", batch_size, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("workers", workers, 0),
            ("world", world, 1),
        ):
            if not isinstance(v, int) or v < low:
                raise ValueError(f"{_OP}.StreamDataset: {name} must be an int >= {low}, got {v!r}")
        self.source, self.part, self.batch_size = source, part, batch_size
        self.seed, self.shuffle_buffer, self.rank, self.world = seed, shuffle_buffer, rank, world
        self.workers = workers
        self.epoch, self.skip_steps = 0, 0

    @property
    def consumers_per_rank(self) -> int:
        return max(1, self.workers)

    @property
    def num_samples(self) -> int:
        return int(self.source.counts(self.part).sum())

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        """The epoch the next iteration streams, starting at this rank's step ``skip_steps`` (a resume)."""
        self.epoch, self.skip_steps = epoch, skip_steps

    def steps_per_epoch(self) -> int:
        """Train: the batches every rank takes per epoch, W × ⌈⌈N/C⌉ / batch_size⌉ (the same on every rank)."""
        w = self.consumers_per_rank
        n = self.num_samples
        per = -(-n // (self.world * w))
        return w * -(-per // self.batch_size)

    def __iter__(self):
        w = self.consumers_per_rank
        info = get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None and info.num_workers != w:
            raise ValueError(f"{_OP}.StreamDataset: built for {w} workers, the DataLoader has {info.num_workers}")
        train = self.part == "train"
        k = self.skip_steps if train else 0
        role = (wid + k) % w  # the first worker the DataLoader asks serves step k
        consumed = (k - role + w - 1) // w  # this role's batches among steps 0..k-1 (step s is role s % w)
        c = self.rank * w + role
        counts = self.source.counts(self.part)
        if not counts.sum():
            return
        segments, pads, total = epoch_plan(counts, self.world * w, c, self.seed, self.epoch, shuffle=train, pad=train)
        skip = min(consumed * self.batch_size, total)
        yield from self._batches(segments, pads, skip, c, train)

    def _batches(self, segments, pads, skip, c, train):
        src = self.source
        emitted = 0

        def want_payload() -> bool:
            return emitted >= skip  # while replaying consumed batches only headers are read

        def entries():
            for u, a, b in segments:
                yield from src.records(self.part, u, a, b, want_payload)

        size = self.shuffle_buffer if train else 0
        rng = np.random.default_rng([self.seed & _U64, self.epoch, c, 0xB0FF])
        batch = []
        for rec in _shuffled(entries(), size, rng, [src.locate(self.part, u, j) for u, j in pads]):
            emitted += 1
            if emitted <= skip:
                continue
            src.load(rec)
            batch.append(rec)
            if len(batch) == self.batch_size:
                yield src.decode(batch)
                batch = []
        if batch:
            yield src.decode(batch)


def _shuffled(entries, size: int, rng, tail):
    """The entries through a buffer of ``size``: once full, each new entry takes the place of a uniformly drawn one,
    which leaves; at the end the rest leave in random order; then ``tail``. The draws depend on counts only, so
    a replay on headers alone makes the same choices."""
    buf = []
    for rec in entries:
        if len(buf) < size:
            buf.append(rec)
            continue
        if not buf:
            yield rec
            continue
        k = int(rng.integers(len(buf)))
        out, buf[k] = buf[k], rec
        yield out
    while buf:
        k = int(rng.integers(len(buf)))
        buf[k], buf[-1] = buf[-1], buf[k]
        yield buf.pop()
    yield from tail


def load_stream_split(source):
    """The whole source decoded into memory, as a :class:`ppml.data.TensorSplit` of float32 images in [0, 1] in
    read order (what training held before streaming; for comparisons and small data)."""
    from .datasets import TensorSplit

    parts = {}
    for part in ("train", "val"):
        ds = StreamDataset(source, part, 256)
        xs, ys = [], []
        for b in ds:
            if "error" in b:
                raise ValueError(b["error"])
            xs.append(b["x"].float().div_(255.0) if b["x"].dtype == torch.uint8 else b["x"])
            ys.append(b["y"])
        c, h, w = source.shape if hasattr(source, "shape") else (3, source.img_size, source.img_size)
        parts[part] = (
            torch.cat(xs) if xs else torch.zeros(0, c, h, w),
            torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64),
        )
    return TensorSplit(*parts["train"], *parts["val"], list(source.classes))
