"""`ppml encrypt` / `ppml decrypt`: the ppml-wds format (WebDataset tars keyed by opaque ids, a manifest), exact
decryption from the master key, no source name in DST, resume after a crash (byte-identical output), corrupt images,
refusals, datasets of the v1 format, and `ppml train --data DST`. Tampering: tests/test_decrypt_safety.py; keys:
tests/test_masterkey.py; worker processes and Ray: tests/test_engines.py."""

from __future__ import annotations

import filecmp
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

import ppml  # noqa: E402
import ppml.data.decrypt as dec  # noqa: E402
import ppml.data.encrypted as enc  # noqa: E402
import ppml.data.wds_shards as wds  # noqa: E402
from ppml.data.masterkey import derive_permutation, read_key_file, sample_id  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LEGACY = os.path.join(TESTS_DIR, "fixtures", "legacy_v1")
SMALL = dict(patch_size=4, size=16, shard_size=500, batch_size=128, progress=False)


def _tree_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _same_tree(a: str, b: str) -> None:
    assert _tree_files(a) == _tree_files(b)
    for f in _tree_files(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def _image_folder(root, n_per_class=4, corrupt=(), classes=("ant", "bee"), stem=""):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in classes:
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n_per_class):
            h, w = 20 + 4 * (i % 4), 28
            arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{stem}{i}.png")
    for rel in corrupt:
        (root / rel).write_bytes(b"this is not an image")
    return str(root)


def _crash_on_shard(monkeypatch, n: int) -> None:
    """Makes the n-th shard write raise KeyboardInterrupt before it writes anything: a run killed at that point."""
    real, calls = wds.write_tar_atomic, []

    def crashing(path, members):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated kill")
        return real(path, members)

    monkeypatch.setattr(wds, "write_tar_atomic", crashing)


def _sorted_items(src):
    return sorted(enc.scan_source(src)[0], key=lambda it: it.path)


def test_rs_digits_format_ids_and_exact_decrypt(tmp_path):
    dst = str(tmp_path / "enc")
    summary = enc.encrypt_dataset("digits", dst, **SMALL)
    assert summary["images"] == 1797 and summary["skipped"] == 0 and summary["images_per_s"] > 0
    keys, index = dst + ".key", dst + ".key.index.json"
    assert summary["keys"] == keys and summary["index"] == index
    assert sorted(os.listdir(dst)) == ["manifest.json"] + [f"shard-{k:06d}.tar" for k in range(4)]
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert manifest["format"] == "ppml-wds" and manifest["version"] == 1 and manifest["scheme"] == "rs"
    assert (manifest["count"], manifest["num_classes"], manifest["corrupt"]) == (1797, 10, 0)
    assert (manifest["patch_size"], manifest["image_size"], manifest["channels"]) == (4, 16, 3)
    assert [s["count"] for s in manifest["shards"]] == [500, 500, 500, 297] and "classes" not in manifest
    mk = read_key_file(keys)
    items = _sorted_items("digits")
    # read back with tarfile + PIL alone: the ids are HMAC(key, index in the sorted list), the label is ASCII
    with tarfile.open(os.path.join(dst, "shard-000001.tar")) as tf:
        members = tf.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        for pos in (0, 123, 499):
            i = 500 + pos
            sid = sample_id(mk.key, i)
            assert members[2 * pos].name == f"{sid}.png" and members[2 * pos + 1].name == f"{sid}.cls"
            assert int(tf.extractfile(members[2 * pos + 1]).read().decode("ascii")) == items[i].label
            cipher = torch.from_numpy(wds.decode_png(tf.extractfile(members[2 * pos]).read()))
            plain = enc.load_source_image("digits", items[i], 16)
            perm = torch.from_numpy(derive_permutation(mk.key, sid, 16))[None]
            want = ppml.reference.shuffle_patches(plain[None], perm, 4)[0]
            assert torch.equal(cipher, want) and not torch.equal(want, plain)
            # one image decrypts with the master key and its id only
            assert torch.equal(ppml.data.decrypt_one(keys, sid, cipher, 4), plain)
    # the owner-side index: id -> source path, label; the class names
    owner = json.load(open(index))
    assert owner["classes"] == [str(c) for c in range(10)] and owner["corrupt"] == []
    assert owner["items"][7] == [sample_id(mk.key, 7), items[7].path, items[7].label, None]
    # decrypt: every image bit for bit, named by the owner-side index
    out = str(tmp_path / "plain")
    assert ppml.data.decrypt_dataset(dst, out, keys, progress=False)["images"] == 1797
    from PIL import Image

    for i in range(0, 1797, 97):
        got = torch.from_numpy(np.array(Image.open(os.path.join(out, items[i].path + ".png")))).permute(2, 0, 1)
        assert torch.equal(got, enc.load_source_image("digits", items[i], 16)), items[i].path


def test_webdataset_reads_the_shards(tmp_path):
    wdslib = pytest.importorskip("webdataset")
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, **{**SMALL, "shard_size": 1000})
    x, y, ids, _ = enc.load_shards(dst)
    urls = [os.path.join(dst, s["name"]) for s in enc.read_manifest(dst)["shards"]]
    got = list(wdslib.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "cls"))
    assert [k for k, _, _ in got] == ids
    for j in (0, 999, 1796):
        assert torch.equal(torch.from_numpy(np.array(got[j][1])).permute(2, 0, 1), x[j]) and int(got[j][2]) == int(y[j])


def test_mi_shards_hold_the_exact_integer_sums(tmp_path):
    dst = str(tmp_path / "mi")
    enc.encrypt_dataset("digits", dst, scheme="mi", grid=2, **SMALL)
    manifest = enc.read_manifest(dst)
    assert manifest["mix_group"] == 2 and manifest["scheme"] == "mi"
    ids, sums, labels = wds.read_shard(dst, manifest, 0)
    assert sums.dtype == np.uint16 and sums.shape == (500, 3, 8, 8)
    with tarfile.open(os.path.join(dst, "shard-000000.tar")) as tf:
        raw = np.load(io.BytesIO(tf.extractfile(f"{ids[3]}.npy").read()), allow_pickle=False)
    assert np.array_equal(raw, sums[3])
    x, y, _, _ = enc.load_shards(dst)
    assert x.dtype == torch.float32 and x.shape == (1797, 3, 8, 8)
    items = _sorted_items("digits")
    for i in (0, 3, 1796):
        plain = enc.load_source_image("digits", items[i], 16)
        # the integer sums, independently: each 2×2 block of q×q sub-patches added up in int64
        blocks = plain.long().reshape(3, 4, 2, 2, 4, 2, 2).sum(dim=(2, 5)).reshape(3, 8, 8)
        if i < 500:
            assert torch.equal(torch.from_numpy(sums[i].astype(np.int64)), blocks)
        assert torch.equal(x[i], ppml.reference.mix_subpatches(plain[None], 4, 2)[0])  # the op's means, bit for bit
    with pytest.raises(ValueError, match="only RS is invertible"):
        ppml.data.decrypt_dataset(dst, str(tmp_path / "out"), dst + ".key", progress=False)


def test_no_source_name_reaches_dst(tmp_path):
    # distinctive class and file names: not one byte of them may appear anywhere in DST
    src = _image_folder(tmp_path / "src", n_per_class=3, classes=("zebraclassqx", "walrusclassqx"),
                        stem="secretfilenameqx", corrupt=("zebraclassqx/brokenfileqx.jpg",))  # fmt: skip
    dst = str(tmp_path / "DST")
    enc.encrypt_dataset(src, dst, **{**SMALL, "shard_size": 2})
    words = [b"zebraclassqx", b"walrusclassqx", b"secretfilenameqx", b"brokenfileqx", str(tmp_path).encode()]
    for f in _tree_files(dst):
        data = open(os.path.join(dst, f), "rb").read()
        for w in words:
            assert w not in data, (f, w)
    owner = json.load(open(dst + ".key.index.json"))  # the names live with the owner
    assert owner["classes"] == ["walrusclassqx", "zebraclassqx"]
    assert [c["path"] for c in owner["corrupt"]] == ["zebraclassqx/brokenfileqx.jpg"]


@pytest.mark.parametrize("crash_at_shard", [1, 2, 4])
def test_killed_and_rerun_is_byte_identical(tmp_path, monkeypatch, crash_at_shard):
    ref = str(tmp_path / "ref")
    enc.encrypt_dataset("digits", ref, key_seed=7, **SMALL)
    cut = str(tmp_path / "cut")
    _crash_on_shard(monkeypatch, crash_at_shard)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", cut, key_seed=7, **SMALL)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cut, "manifest.json"))
    summary = enc.encrypt_dataset("digits", cut, key_seed=7, **SMALL)
    assert summary["resumed_images"] == 500 * (crash_at_shard - 1)
    _same_tree(cut, ref)
    assert filecmp.cmp(cut + ".key", ref + ".key", shallow=False)
    index_ref, index_cut = json.load(open(ref + ".key.index.json")), json.load(open(cut + ".key.index.json"))
    assert index_ref["items"] == index_cut["items"]


def test_resume_keeps_the_key_already_made(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    _crash_on_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", dst, **SMALL)
    key_before = open(dst + ".key", "rb").read()
    monkeypatch.undo()
    enc.encrypt_dataset("digits", dst, **SMALL)
    assert open(dst + ".key", "rb").read() == key_before
    ppml.data.decrypt_dataset(dst, str(tmp_path / "plain"), dst + ".key", progress=False)  # the key still fits


def test_killed_between_job_and_key_starts_over(tmp_path, monkeypatch):
    import ppml.data.masterkey as mkmod

    dst = str(tmp_path / "enc")

    def killed(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(enc, "_write_key_file", killed)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", dst, **SMALL)
    monkeypatch.undo()
    assert os.listdir(dst) == ["job.json"] and not os.path.exists(dst + ".key")
    assert enc.encrypt_dataset("digits", dst, **SMALL)["images"] == 1797
    assert mkmod.is_key_file(dst + ".key")


def test_corrupt_images_are_reported_outside_dst_also_after_a_resume(tmp_path, monkeypatch):
    src = _image_folder(tmp_path / "src", n_per_class=20, corrupt=("ant/broken.jpg",))
    ref = str(tmp_path / "ref")
    summary = enc.encrypt_dataset(src, ref, patch_size=4, size=16, key_seed=1, progress=False)
    assert summary["images"] == 40 and summary["skipped"] == 1 and summary["shards"] == 3
    owner = json.load(open(ref + ".key.index.json"))
    assert [c["path"] for c in owner["corrupt"]] == ["ant/broken.jpg"] and owner["corrupt"][0]["error"]
    assert enc.read_manifest(ref)["corrupt"] == 1 and enc.read_manifest(ref)["classes"] == ["0", "1"]
    cut = str(tmp_path / "cut")
    _crash_on_shard(monkeypatch, 3)  # "ant/broken.jpg" sorts 21st: it lies in the second shard, finished
    with pytest.raises(KeyboardInterrupt, match="32 of 41 images are kept"):
        enc.encrypt_dataset(src, cut, patch_size=4, size=16, key_seed=1, progress=False)
    monkeypatch.undo()
    enc.encrypt_dataset(src, cut, patch_size=4, size=16, key_seed=1, progress=False)
    _same_tree(cut, ref)
    assert json.load(open(cut + ".key.index.json"))["corrupt"] == owner["corrupt"]
    # decrypted images = the source resized (shorter side) and centre-cropped
    out = str(tmp_path / "plain")
    ppml.data.decrypt_dataset(ref, out, ref + ".key", progress=False)
    from PIL import Image

    got = torch.from_numpy(np.array(Image.open(os.path.join(out, "bee", "3.png.png")))).permute(2, 0, 1)
    assert torch.equal(got, enc.load_source_image(src, enc.SourceItem("bee/3.png", 1, None), 16))


def test_refusals(tmp_path):
    dst = str(tmp_path / "enc")
    os.makedirs(dst)
    open(os.path.join(dst, "mine.txt"), "w").close()
    with pytest.raises(FileExistsError, match="not an unfinished"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    dst = str(tmp_path / "enc2")
    enc.encrypt_dataset("digits", dst, **SMALL)
    with pytest.raises(FileExistsError, match="already holds a finished"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    with pytest.raises(ValueError, match="key file .* outside DST"):
        enc.encrypt_dataset("digits", str(tmp_path / "e3"), keys=str(tmp_path / "e3" / "k.key"), **SMALL)
    with pytest.raises(ValueError, match="index .* outside DST"):
        enc.encrypt_dataset("digits", str(tmp_path / "e3"), index=str(tmp_path / "e3" / "i.json"), **SMALL)
    with pytest.raises(ValueError, match="--patch-size must divide --size"):
        enc.encrypt_dataset("digits", str(tmp_path / "e4"), **{**SMALL, "patch_size": 5})
    with pytest.raises(ValueError, match="--grid must be <= 16"):
        enc.encrypt_dataset("digits", str(tmp_path / "e4"), scheme="mi", grid=32, **{**SMALL, "size": 32,
                            "patch_size": 32})  # fmt: skip
    with pytest.raises(FileNotFoundError, match="not a directory"):
        enc.encrypt_dataset(str(tmp_path / "nowhere"), str(tmp_path / "e5"), **SMALL)
    assert not any(os.path.exists(tmp_path / f"e{i}") for i in (3, 4, 5))
    other = str(tmp_path / "other")
    enc.encrypt_dataset("digits", other, **SMALL)
    with pytest.raises(ValueError, match="is not the key file"):
        ppml.data.decrypt_dataset(dst, str(tmp_path / "p"), other + ".key", progress=False)
    with pytest.raises(ValueError, match="not a ppml key file"):
        ppml.data.decrypt_dataset(dst, str(tmp_path / "p"), os.path.join(LEGACY, "enc.keys.npy"), progress=False)
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").close()
    with pytest.raises(FileExistsError, match="not empty"):
        ppml.data.decrypt_dataset(dst, str(tmp_path / "full"), dst + ".key", progress=False)


def test_unfinished_run_with_other_arguments_is_refused(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    _crash_on_shard(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", dst, **SMALL)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other arguments"):
        enc.encrypt_dataset("digits", dst, **{**SMALL, "patch_size": 8})
    os.rename(dst + ".key", dst + ".moved")
    with pytest.raises(FileNotFoundError, match="key file .* is gone"):
        enc.encrypt_dataset("digits", dst, **SMALL)


def test_modified_shard_is_detected(tmp_path):
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, **SMALL)
    path = os.path.join(dst, "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        enc.load_shards(dst)


def test_train_reads_the_shards(tmp_path):
    pytest.importorskip("timm")
    from ppml.train import TrainConfig, run

    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, key_seed=0, **SMALL)
    tiny = dict(depth=1, embed_dim=24, num_heads=2, batch_size=128, epochs=1)
    summary = run(TrainConfig(data=dst, img_size=16, patch_size=4, out=str(tmp_path / "run"), **tiny))
    assert summary["final"] and not os.path.exists(tmp_path / "run" / "ciphertext.pt")  # nothing re-encrypted
    with pytest.raises(ValueError, match="pass --encryption rs --patch-size 4 --img-size 16"):
        run(TrainConfig(data=dst, img_size=32, patch_size=8, out=str(tmp_path / "run2"), **tiny))


def test_train_val_split_survives_without_names(tmp_path):
    root = tmp_path / "src"
    _image_folder(root / "train", n_per_class=5)
    _image_folder(root / "val", n_per_class=2)
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset(str(root), dst, patch_size=4, size=16, progress=False)
    split, manifest = enc.load_encrypted(dst)
    assert manifest["val_start"] == 10 and len(split.train_y) == 10 and len(split.val_y) == 4
    assert split.val_y.tolist() == [0, 0, 1, 1]


def test_legacy_v1_dataset_still_loads_and_decrypts(tmp_path):
    dst = os.path.join(LEGACY, "enc")
    plain = np.load(os.path.join(LEGACY, "plain.npy"))  # the resized sources, saved when the fixture was made
    x, y, idx, manifest = enc.load_shards(dst)
    assert manifest["format"] == "ppml-encrypted-v1" and x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    split, _ = enc.load_encrypted(dst)
    assert len(split.train_y) + len(split.val_y) == 6
    out = str(tmp_path / "out")
    ppml.data.decrypt_dataset(dst, out, os.path.join(LEGACY, "enc.keys.npy"), progress=False)
    from PIL import Image

    items = json.load(open(os.path.join(dst, "index.json")))["items"]
    for i, (path, _, _) in enumerate(items):
        got = np.array(Image.open(os.path.join(out, path + ".png"))).transpose(2, 0, 1)
        assert np.array_equal(got, plain[i]), path
    with pytest.raises(ValueError, match="not the key file"):
        ppml.data.decrypt_dataset(dst, str(tmp_path / "o2"), os.path.join(TESTS_DIR, "conftest.py"), progress=False)


def test_cli(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ppml", *args], capture_output=True, text=True, timeout=300,
                              cwd=TESTS_DIR)  # fmt: skip

    dst = str(tmp_path / "enc")
    res = cli("encrypt", "digits", dst, "--size", "16", "--patch-size", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "img/s" in res.stderr and "master key" in res.stderr and json.loads(res.stdout)["images"] == 1797
    res = cli("decrypt", dst, str(tmp_path / "plain"), "--keys", dst + ".key", "--no-progress")
    assert res.returncode == 0, res.stderr
    res = cli("encrypt", "digits", dst, "--size", "16", "--patch-size", "4")
    assert res.returncode == 2 and "already holds a finished" in res.stderr


def _main(*argv) -> tuple[int, list[str]]:
    import contextlib

    from ppml.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue().strip().splitlines()


def test_key_file_refusal_writes_nothing_and_the_fixed_command_runs(tmp_path):
    dst = str(tmp_path / "enc")
    open(dst + ".key", "wb").write(b"the key of another dataset")
    with pytest.raises(FileExistsError, match="key file .* already exists"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    assert not os.path.exists(dst)  # no job.json that would refuse the corrected command
    os.makedirs(dst)  # an empty DST is just as clean
    with pytest.raises(FileExistsError, match="already exists"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    assert os.listdir(dst) == []
    open(tmp_path / "other.index.json", "w").write("{}")
    with pytest.raises(FileExistsError, match="owner-side index .* already exists"):
        enc.encrypt_dataset("digits", dst, keys=str(tmp_path / "k.key"), index=str(tmp_path / "other.index.json"),
                            **SMALL)  # fmt: skip
    assert os.listdir(dst) == [] and not os.path.exists(tmp_path / "k.key")
    summary = enc.encrypt_dataset("digits", dst, keys=str(tmp_path / "k.key"), **SMALL)
    assert summary["images"] == 1797 and os.path.exists(tmp_path / "k.key.index.json")


def test_ctrl_c_in_encrypt_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    args = ("encrypt", "digits", dst, "--size", "16", "--patch-size", "4", "--key-seed", "0", "--no-progress")
    _crash_on_shard(monkeypatch, 6)  # 5 whole shards of 113, then the kill
    rc, err = _main(*args)
    monkeypatch.undo()
    assert rc == 130 and len(err) == 1, err
    assert "interrupted: 565 of 1797 images are kept" in err[0] and "same command resumes" in err[0]
    rc, err = _main(*args)
    assert rc == 0, err
    assert json.load(open(os.path.join(dst, "manifest.json")))["count"] == 1797


def test_default_shard_size():
    assert enc.auto_shard_size(1797) == 113 and enc.auto_shard_size(10) == 16 and enc.auto_shard_size(10**7) == 4096


def test_ctrl_c_in_decrypt_is_one_line_and_the_same_command_finishes(tmp_path, monkeypatch):
    src = _image_folder(tmp_path / "src", n_per_class=20)
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset(src, dst, key_seed=0, **SMALL)
    ref = str(tmp_path / "ref")
    ppml.data.decrypt_dataset(dst, ref, dst + ".key", progress=False)
    out = str(tmp_path / "out")
    args = ("decrypt", dst, out, "--keys", dst + ".key", "--no-progress")
    real, calls = dec.write_atomic, []

    def crashing(path, data):
        calls.append(path)
        if len(calls) == 1 + 30 + 1:  # the marker, 30 images, then the kill
            raise KeyboardInterrupt("simulated kill")
        real(path, data)

    monkeypatch.setattr(dec, "write_atomic", crashing)
    rc, err = _main(*args)
    monkeypatch.undo()
    assert rc == 130 and len(err) == 1 and "30 of 40 images are written" in err[0] and "same command" in err[0]
    rc, err = _main(*args)
    assert rc == 0, err
    _same_tree(out, ref)
    with pytest.raises(FileExistsError, match="not empty"):  # a finished OUT is refused again
        ppml.data.decrypt_dataset(dst, out, dst + ".key", progress=False)


def test_show_reads_a_legacy_dataset_with_its_keys(tmp_path):
    from ppml.show import encrypted_grid

    dst = str(tmp_path / "enc")
    shutil.copytree(os.path.join(LEGACY, "enc"), dst)
    _, titles, rows = encrypted_grid(dst, count=2, keys=os.path.join(LEGACY, "enc.keys.npy"))
    assert rows == 2 and titles[-1] == "decrypted"
