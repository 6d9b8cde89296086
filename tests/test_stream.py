"""Streaming training data (ppml.data.stream, ppml.train.feed): the epoch plan's split by rank and worker, the
shuffle buffer, exact mid-epoch resume of the stream and of `ppml train`, the ppml-wds reader (RS PNG, MI sums) and
its refusals. The DSTs here are written by the tests themselves with `tarfile`, per the format's spec."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from ppml.data.stream import (
    FolderSource,
    ShardSource,
    StreamDataset,
    epoch_plan,
    is_stream_dataset,
    load_stream_split,
    read_stream_manifest,
)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _mi_sums(plain: np.ndarray, p: int, g: int) -> np.ndarray:
    """MI's stored form: per patch, the sum of its g×g sub-patches (each (p/g)² pixels), uint16 [C, H/g, W/g]."""
    c, h, w = plain.shape
    blocks = plain.astype(np.int64).reshape(c, h // p, g, p // g, w // p, g, p // g)
    return blocks.sum((2, 5)).reshape(c, h // g, w // g).astype(np.uint16)


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def write_dst(root, counts, *, scheme="rs", size=16, patch=4, group=2, classes=3, seed=0, splits=None):
    """A ppml-wds DST with shards of ``counts`` samples; returns {key: (array as stored, label)}."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples, shards = {}, []
    for s, n in enumerate(counts):
        name = f"shard-{s:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(n):
                key = rng.bytes(16).hex()
                label = int(rng.integers(classes))
                if scheme == "rs":
                    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    _add(tf, f"{key}.png", _png(arr))
                else:
                    plain = rng.integers(0, 256, (3, size, size)).astype(np.int64)
                    arr = _mi_sums(plain, patch, group)
                    _add(tf, f"{key}.npy", _npy(arr))
                _add(tf, f"{key}.cls", str(label).encode())
                samples[key] = (arr, label)
        with open(os.path.join(root, name), "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        shards.append({"name": name, "count": n, "sha256": digest})
        if splits is not None:
            shards[-1]["split"] = splits[s]
    manifest = {
        "format": "ppml-wds",
        "version": 1,
        "scheme": scheme,
        "patch_size": patch,
        "image_size": size,
        "channels": 3,
        "count": sum(counts),
        "num_classes": classes,
        "shards": shards,
    }
    if scheme == "mi":
        manifest["mix_group"] = group
    with open(os.path.join(root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return samples


def _fingerprint(x: torch.Tensor) -> bytes:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).digest()


def _stream(source, part, *, world=1, workers=0, batch=4, buffer=8, epoch=0, skip=0, seed=0, rank=None):
    """Every (rank, batch) of an epoch through real DataLoaders (num_workers=workers), as the trainer reads it."""
    from torch.utils.data import DataLoader

    out = {}
    for r in range(world) if rank is None else [rank]:
        ds = StreamDataset(source, part, batch, seed=seed, shuffle_buffer=buffer, rank=r, world=world, workers=workers)
        ds.set_epoch(epoch, skip)
        out[r] = list(DataLoader(ds, batch_size=None, num_workers=workers, generator=torch.Generator()))
    return out


# -------------------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("counts,consumers", [([7, 3, 0, 9, 5], 4), ([40], 6), ([1] * 23, 5), ([2, 2], 7)])
def test_epoch_plan_gives_every_sample_to_exactly_one_consumer(counts, consumers):
    n = sum(counts)
    for epoch in (0, 1):
        seen, totals, orders = Counter(), set(), []
        for c in range(consumers):
            segments, pads, total = epoch_plan(np.array(counts), consumers, c, seed=5, epoch=epoch)
            own = [(u, j) for u, a, b in segments for j in range(a, b)]
            assert all(0 <= a < b <= counts[u] for u, a, b in segments)
            seen.update(own)
            assert len(own) + len(pads) == total and len(pads) <= 1
            totals.add(total)
            orders += own
        assert totals == {-(-n // consumers)}  # every consumer emits ⌈N/C⌉
        assert sorted(seen) == sorted((u, j) for u, k in enumerate(counts) for j in range(k))
        assert max(seen.values()) == 1
        if epoch == 0:
            first = orders
    assert orders != first or len(counts) == 1  # a new epoch, a new order
    # deterministic from (seed, epoch)
    assert epoch_plan(np.array(counts), consumers, 0, 5, 1) == epoch_plan(np.array(counts), consumers, 0, 5, 1)


# ------------------------------------------------------------------------------------------------- reading a DST


def test_stream_covers_the_train_split_once_across_ranks_and_workers(tmp_path):
    """Shard level (6 shards, 2 ranks × 2 workers) and file level (2 shards < 4 consumers): each rank takes the same
    number of batches, every training sample appears once (plus at most one padding sample per consumer), the
    validation samples (every 5th of a shard) never appear in training, and the labels are the stored ones."""
    for counts in ([9, 11, 10, 7, 12, 8], [30, 27]):
        root = tmp_path / f"dst{len(counts)}"
        samples = write_dst(root, counts)
        by_print = {
            _fingerprint(torch.from_numpy(a.transpose(2, 0, 1).copy())): (k, lab) for k, (a, lab) in samples.items()
        }
        src = ShardSource(str(root))
        n_train = int(src.counts("train").sum())
        assert n_train == sum(n - n // 5 for n in counts)
        batches = _stream(src, "train", world=2, workers=2, batch=4, buffer=6)
        assert (
            len(batches[0]) == len(batches[1]) == StreamDataset(src, "train", 4, world=2, workers=2).steps_per_epoch()
        )
        seen = Counter()
        for r in batches.values():
            for b in r:
                assert b["x"].dtype == torch.uint8 and b["x"].shape[1:] == (3, 16, 16)
                for x, y in zip(b["x"], b["y"].tolist(), strict=True):
                    key, label = by_print[_fingerprint(x)]
                    assert y == label
                    seen[key] += 1
        val = [b for r in _stream(src, "val", world=2, workers=2).values() for b in r]
        val_keys = {by_print[_fingerprint(x)][0] for b in val for x in b["x"]}
        assert len(val_keys) == sum(n // 5 for n in counts) == sum(len(b["y"]) for b in val)
        assert not val_keys & set(seen)
        assert set(seen) | val_keys == set(samples)
        assert sum(seen.values()) - n_train <= 4 and max(seen.values()) <= 2


def test_shuffle_buffer_is_bounded_and_changes_with_the_epoch(tmp_path):
    """One consumer, buffer 5: a sample leaves at most 5 places before its read position; epochs differ; the same
    epoch twice is the same stream; buffer 0 is the read order."""
    samples = write_dst(tmp_path / "d", [25, 25])
    src = ShardSource(str(tmp_path / "d"))
    read = [r.key for u in (0, 1) for r in src.records("train", u, 0, 20, lambda: False)]

    def order(epoch, buffer):
        out = []
        for b in _stream(src, "train", batch=7, buffer=buffer, epoch=epoch)[0]:
            out += [
                next(k for k, (a, _) in samples.items() if np.array_equal(a.transpose(2, 0, 1), x.numpy()))
                for x in b["x"]
            ]
        return out

    e0, e1 = order(0, 5), order(1, 5)
    assert sorted(e0) == sorted(e1) == sorted(read) and e0 != e1 and e0 == order(0, 5)
    plain = order(0, 0)
    pos = {k: i for i, k in enumerate(plain)}  # buffer 0: the epoch's shard order, read in order
    assert [pos[k] for k in plain] == list(range(40))
    assert all(i >= pos[k] - 5 for i, k in enumerate(e0))


@pytest.mark.parametrize("skip", [1, 4, 5])  # of 6 steps per rank
def test_resumed_stream_gives_the_same_batches(tmp_path, skip):
    """set_epoch(e, k) with 2 workers yields exactly steps k.. of the uninterrupted epoch; the batches replayed are
    never read (their payload is skipped: headers only)."""
    write_dst(tmp_path / "d", [13, 9, 11])
    src = ShardSource(str(tmp_path / "d"))
    full = _stream(src, "train", world=2, workers=2, batch=3, buffer=4, epoch=1)[1]
    part = _stream(src, "train", world=2, workers=2, batch=3, buffer=4, epoch=1, skip=skip, rank=1)[1]
    assert len(part) == len(full) - skip
    for a, b in zip(full[skip:], part, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_replay_reads_headers_only(tmp_path, monkeypatch):
    """Resuming at step k, a consumer reads no more payloads than a fresh one does after step k."""
    import ppml.data.stream as stream

    write_dst(tmp_path / "d", [40])
    src = ShardSource(str(tmp_path / "d"))
    reads = []
    real = stream._read
    monkeypatch.setattr(stream, "_read", lambda fh, loc: reads.append(loc) or real(fh, loc))
    ds = StreamDataset(src, "train", 4, shuffle_buffer=3)
    ds.set_epoch(0, 6)
    assert sum(len(b["y"]) for b in ds) == 32 - 24
    assert len(reads) == 2 * 8  # .png and .cls of the 8 samples trained on, nothing of the 24 replayed


def test_mi_sums_decode_to_the_mix_of_the_plain_image(tmp_path):
    """MI shards store uint16 sub-patch sums; decoded they are ppml.mix_subpatches(plain) / 255."""
    import ppml

    rng = np.random.default_rng(1)
    plain = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    root = tmp_path / "mi"
    os.makedirs(root)
    sums = _mi_sums(plain, 4, 2)
    with tarfile.open(root / "shard-000000.tar", "w") as tf:
        _add(tf, "a" * 32 + ".npy", _npy(sums))
        _add(tf, "a" * 32 + ".cls", b"1")
    m = {
        "format": "ppml-wds",
        "version": 1,
        "scheme": "mi",
        "patch_size": 4,
        "image_size": 16,
        "channels": 3,
        "mix_group": 2,
        "count": 1,
        "num_classes": 2,
        "shards": [{"name": "shard-000000.tar", "count": 1, "split": "train"}],
    }
    (root / "manifest.json").write_text(json.dumps(m))
    (b,) = list(StreamDataset(ShardSource(str(root)), "train", 2))
    want = ppml.mix_subpatches(torch.from_numpy(plain)[None].float(), 4, 2) / 255
    assert b["x"].dtype == torch.float32 and torch.allclose(b["x"], want, atol=1e-6) and b["y"].tolist() == [1]


def test_shard_splits_and_in_memory_load(tmp_path):
    """A shard marked "split": "val" is the validation set; load_stream_split holds the same samples in memory."""
    samples = write_dst(tmp_path / "d", [6, 4, 5], splits=["train", "val", "train"])
    src = ShardSource(str(tmp_path / "d"))
    assert src.counts("train").tolist() == [6, 0, 5] and src.counts("val").tolist() == [0, 4, 0]
    split = load_stream_split(src)
    assert split.train_x.shape == (11, 3, 16, 16) and split.val_x.shape == (4, 3, 16, 16)
    stored = sorted(_fingerprint(torch.from_numpy(a.transpose(2, 0, 1).copy())) for a, _ in samples.values())
    held = sorted(_fingerprint((x * 255).round().to(torch.uint8)) for x in torch.cat([split.train_x, split.val_x]))
    assert held == stored


def test_manifest_and_shard_refusals(tmp_path):
    write_dst(tmp_path / "d", [5])
    src = ShardSource(str(tmp_path / "d"))
    src.verify(show=False)
    assert is_stream_dataset(str(tmp_path / "d")) and not is_stream_dataset(str(tmp_path))
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())

    def bad(change, match):
        (tmp_path / "d" / "manifest.json").write_text(json.dumps({**m, **change}))
        with pytest.raises(ValueError, match=match):
            read_stream_manifest(str(tmp_path / "d"))

    bad({"version": 2}, "version")
    bad({"count": 6}, "the shards hold 5 samples")
    bad({"shards": [{"name": "../x.tar", "count": 5}]}, "refusing the path")
    bad({"scheme": "xor"}, "scheme must be")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with open(tmp_path / "d" / "shard-000000.tar", "r+b") as fh:
        fh.seek(700)
        fh.write(b"\0\1\2")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        src.verify(show=False)


# ------------------------------------------------------------------------------------------------------- training

pytest.importorskip("timm")
TINY = dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2, warmup_epochs=0.5)


def _folder(root, n=10):
    from PIL import Image

    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return str(root)


@pytest.mark.parametrize(
    "data,extra,cuts",
    [
        ("dst", {}, (11,)),  # 8 steps per epoch: step 3 of epoch 2
        ("folder", dict(encryption="rs", mode="owner"), (5,)),  # 4 steps per epoch: step 1 of epoch 2
    ],
)
def test_train_stop_and_resume_equals_straight_run(tmp_path, data, extra, cuts):
    """`ppml train` on a stream with 2 workers: stopped mid-epoch then resumed, it ends with the parameters and
    metrics of the straight run, bit for bit; a folder in owner mode is encrypted by the workers with the same
    per-image keys after the resume."""
    from ppml.train import TrainConfig, run

    if data == "dst":
        write_dst(tmp_path / "dst", [12, 10, 9])
        path = str(tmp_path / "dst")
    else:
        path = _folder(tmp_path / "imgs")
    common = dict(data=path, epochs=2, batch_size=4, workers=2, shuffle_buffer=5, key_seed=7, drop_path=0.1,
                  cutmix=1.0, **TINY, **extra)  # fmt: skip
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **common))
    cfg = TrainConfig(out=str(tmp_path / "cut"), **common)
    for i, k in enumerate(cuts):
        stopped = run(cfg, stop_after=k, resume=i > 0)
        assert stopped["stopped"] and stopped["step"] > 0  # mid-epoch
    resumed = run(cfg, resume=True)
    assert resumed["param_digests"] == ref["param_digests"]
    assert resumed["val_acc"] == ref["val_acc"] and resumed["train_loss"] == ref["train_loss"]


def test_ddp_two_ranks_stream_and_resume_exactly(tmp_path):
    """torchrun, 2 CPU ranks × 2 workers on a DST: stopped at step 3 and resumed, both ranks end with the straight
    run's parameters."""
    import subprocess
    import sys

    write_dst(tmp_path / "dst", [12, 10, 9, 7, 11])
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ppml",
            "train", "--data", str(tmp_path / "dst"), "--img-size", "16", "--patch-size", "4", "--depth", "1",
            "--embed-dim", "24", "--num-heads", "2", "--batch-size", "4", "--epochs", "1", "--workers", "2",
            "--shuffle-buffer", "5", "--drop-path", "0.1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH")]))}  # fmt: skip

    def last(*extra):
        res = subprocess.run([*args, *extra], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    ref = last("--out", str(tmp_path / "ref"))
    assert last("--out", str(tmp_path / "cut"), "--stop-after", "3")["step"] == 3
    resumed = last("--out", str(tmp_path / "cut"), "--resume")
    assert len(set(ref["param_digests"])) == 1 and resumed["param_digests"] == ref["param_digests"]


def test_folder_workers_encrypt_like_the_ops(tmp_path):
    """A folder in owner mode: RS batches are ppml.shuffle_patches of the decoded images under each image's own key
    (the same whichever batch the image is in), MI batches ppml.mix_subpatches / 255."""
    import ppml
    from ppml.data.datasets import folder_index
    from ppml.data.stream import OwnerEncryption, image_generator

    root = _folder(tmp_path / "imgs", n=3)
    plain = FolderSource(root, 16, folder_index(root))
    rs = FolderSource(root, 16, folder_index(root), OwnerEncryption("rs", 4, 2, key_seed=11))
    mi = FolderSource(root, 16, folder_index(root), OwnerEncryption("mi", 4, 2, key_seed=11))
    recs = [plain.locate("train", u, 0) for u in (0, 4, 5)]
    x = plain.decode(recs)["x"]
    perms = torch.cat([ppml.random_permutations(1, 16, generator=image_generator(11, u)) for u in (0, 4, 5)])
    assert torch.equal(rs.decode(recs)["x"], ppml.shuffle_patches(x, 4, perms)[0])
    assert torch.equal(rs.decode(recs[1:])["x"], rs.decode(recs)["x"][1:])
    assert torch.allclose(mi.decode(recs)["x"], ppml.mix_subpatches(x.float(), 4, 2) / 255)


def test_stream_options_are_checked_and_no_stream_holds_a_dst_in_memory(tmp_path):
    from ppml.train import TrainConfig, run

    write_dst(tmp_path / "dst", [10, 10])
    with pytest.raises(ValueError, match="--shuffle-buffer must be an int >= 0"):
        TrainConfig(shuffle_buffer=-1).check()
    with pytest.raises(ValueError, match="--stream needs --data FOLDER"):
        TrainConfig(stream=True).check()
    with pytest.raises(ValueError, match="--patch-size 4 --img-size 16"):
        run(TrainConfig(data=str(tmp_path / "dst"), out=str(tmp_path / "x"), img_size=16, patch_size=8))
    out = run(
        TrainConfig(data=str(tmp_path / "dst"), stream=False, epochs=1, batch_size=8, out=str(tmp_path / "m"), **TINY)
    )
    assert out["final"]


def test_stream_reads_what_ppml_encrypt_writes_with_its_train_val_split(tmp_path):
    """End to end with the real writer: a source with train/ and val/ folders encrypted by ppml.data.encrypt_dataset
    streams back the same train and validation samples as the in-memory loader (load_encrypted) holds."""
    from PIL import Image

    from ppml.data.encrypted import encrypt_dataset, load_encrypted

    rng = np.random.default_rng(0)
    for part, n in (("train", 5), ("val", 3)):
        for cls in ("a", "b"):
            d = tmp_path / "src" / part / cls
            d.mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{k}.png")
    dst = tmp_path / "dst"
    encrypt_dataset(str(tmp_path / "src"), str(dst), scheme="rs", patch_size=8, size=32, shard_size=4,
                    keys=str(tmp_path / "k.key"), device="cpu", progress=False)
    held, _ = load_encrypted(str(dst))
    src = ShardSource(str(dst))
    assert int(src.counts("train").sum()) == 10 and int(src.counts("val").sum()) == 6
    streamed = load_stream_split(src)
    for part in ("train", "val"):
        a = sorted(_fingerprint((x * 255).round().to(torch.uint8)) for x in getattr(streamed, f"{part}_x"))
        b = sorted(_fingerprint((x * 255).round().to(torch.uint8)) for x in getattr(held, f"{part}_x"))
        assert a == b, part
        assert sorted(getattr(streamed, f"{part}_y").tolist()) == sorted(getattr(held, f"{part}_y").tolist())


def test_owner_stream_feeds_uint8_through_patch_tokens_bit_for_bit(tmp_path, monkeypatch):
    """A streamed folder in owner mode with a PE-free ViT: the uint8 ciphertext reaches ppml.patch_tokens as uint8
    (cast and /255 in its pass) when only flips are on, and training ends with the same parameters as the float path
    (uint8 → float / 255 first), bit for bit. (Colour jitter, drop and mixing need floats: with them on, the batch
    becomes float first, as before.)"""
    import ppml
    from ppml.augment import EncryptedAugment
    from ppml.train import TrainConfig, run

    seen = []
    real = ppml.patch_tokens

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return real(x, *a, **k)

    monkeypatch.setattr(ppml, "patch_tokens", spy)
    path = _folder(tmp_path / "imgs", n=6)
    common = dict(data=path, epochs=1, batch_size=4, workers=0, shuffle_buffer=5, key_seed=7, hflip=0.5,
                  brightness=0.0, contrast=0.0, encryption="rs", mode="owner", **TINY)  # fmt: skip
    fused = run(TrainConfig(out=str(tmp_path / "fused"), **common))
    assert seen and set(seen) == {torch.uint8}
    seen.clear()
    monkeypatch.setattr(EncryptedAugment, "moves_pixels_only", property(lambda self: False))
    floats = run(TrainConfig(out=str(tmp_path / "float"), **common))
    assert seen and set(seen) == {torch.float32}
    assert fused["param_digests"] == floats["param_digests"] and fused["train_loss"] == floats["train_loss"]
