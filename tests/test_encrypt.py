"""`ppml encrypt` / `ppml decrypt`: the shard format, exact decryption, resume after a crash (byte-identical output),
corrupt images, refusals, and `ppml train --data DST`."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

import ppml  # noqa: E402
import ppml.data.encrypted as enc  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(patch_size=4, size=16, shard_size=500, batch_size=128, progress=False)


def _tree_files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _image_folder(root, n_per_class=4, corrupt=()):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("ant", "bee"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n_per_class):
            h, w = 20 + 4 * i, 28
            arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    for rel in corrupt:
        (root / rel).write_bytes(b"this is not an image")
    return str(root)


def _crash_on_write(monkeypatch, n: int) -> None:
    """Makes the n-th file write of ppml.data.encrypted raise KeyboardInterrupt: a run killed at that point."""
    real, calls = enc._write_atomic, []

    def crashing(path, data):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated kill")
        real(path, data)

    monkeypatch.setattr(enc, "_write_atomic", crashing)


def test_rs_digits_roundtrip_format_and_exact_decrypt(tmp_path):
    dst = str(tmp_path / "enc")
    summary = enc.encrypt_dataset("digits", dst, key_seed=0, **SMALL)
    assert summary["images"] == 1797 and summary["skipped"] == 0
    assert 0 < summary["encrypt_share"] < 1 and summary["images_per_s"] > 0
    keys = dst + ".keys.npy"
    assert summary["keys"] == keys and not keys.startswith(dst + os.sep)
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert manifest["format"] == enc.FORMAT and manifest["num_images"] == 1797 and len(manifest["shards"]) == 4
    assert manifest["dtype"] == "uint8" and manifest["ciphertext_shape"] == [3, 16, 16]
    # plain NumPy reads it: no ppml kernels needed
    first = manifest["shards"][0]
    images = np.load(os.path.join(dst, first["files"]["images"]), allow_pickle=False)
    assert images.shape == (500, 3, 16, 16) and images.dtype == np.uint8
    perms = np.load(keys)
    assert perms.shape == (1797, 16) and perms.dtype == np.int16
    # the ciphertext really is the shuffle of the resized source image under its key
    items, _ = enc.scan_source("digits")
    src0 = enc.load_source_image("digits", items[0], 16)
    want = ppml.reference.shuffle_patches(src0[None], torch.as_tensor(perms[:1].astype(np.int64)), 4)[0]
    assert torch.equal(torch.from_numpy(images[0]), want) and not torch.equal(want, src0)
    # decrypt: every image bit for bit
    out = str(tmp_path / "plain")
    assert enc.decrypt_dataset(dst, out, keys, progress=False)["images"] == 1797
    from PIL import Image

    for i in range(0, 1797, 97):
        got = torch.from_numpy(np.array(Image.open(os.path.join(out, items[i].path + ".png")))).permute(2, 0, 1)
        assert torch.equal(got, enc.load_source_image("digits", items[i], 16)), items[i].path


def test_mi_shards_hold_the_exact_mix(tmp_path):
    dst = str(tmp_path / "mi")
    enc.encrypt_dataset("digits", dst, scheme="mi", grid=2, **SMALL)
    assert not os.path.exists(dst + ".keys.npy")  # MI has no key
    x, y, idx, manifest = enc.load_shards(dst)
    assert x.dtype == torch.float32 and x.shape == (1797, 3, 8, 8) and manifest["keys_sha256"] is None
    items, _ = enc.scan_source("digits")
    for i in (0, 500, 1796):
        plain = enc.load_source_image("digits", items[int(idx[i])], 16)
        assert torch.equal(x[i], ppml.reference.mix_subpatches(plain[None], 4, 2)[0])
    with pytest.raises(ValueError, match="only RS is invertible"):
        enc.decrypt_dataset(dst, str(tmp_path / "out"), __file__, progress=False)


@pytest.mark.parametrize("crash_after_writes", [3, 6, 11])  # inside the first, second and fourth shard
def test_killed_and_rerun_is_byte_identical(tmp_path, monkeypatch, crash_after_writes):
    ref = str(tmp_path / "ref")
    enc.encrypt_dataset("digits", ref, key_seed=7, **SMALL)
    cut = str(tmp_path / "cut")
    _crash_on_write(monkeypatch, 3 + crash_after_writes)  # job.json, the key file, index.json; then 4 files a shard
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", cut, key_seed=7, **SMALL)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cut, "manifest.json"))
    summary = enc.encrypt_dataset("digits", cut, key_seed=7, **SMALL)
    assert summary["resumed_images"] == 500 * (crash_after_writes // 4)
    assert _tree_files(cut) == _tree_files(ref)
    for f in _tree_files(ref):
        if f != "job.json":  # job.json names DST itself
            assert filecmp.cmp(os.path.join(cut, f), os.path.join(ref, f), shallow=False), f
    assert filecmp.cmp(cut + ".keys.npy", ref + ".keys.npy", shallow=False)


def test_resume_without_key_seed_keeps_the_keys_already_drawn(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    _crash_on_write(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", dst, **SMALL)
    keys_before = np.load(dst + ".keys.npy")
    monkeypatch.undo()
    enc.encrypt_dataset("digits", dst, **SMALL)
    assert np.array_equal(np.load(dst + ".keys.npy"), keys_before)
    enc.decrypt_dataset(dst, str(tmp_path / "plain"), dst + ".keys.npy", progress=False)  # the keys still fit


def test_corrupt_images_are_reported_and_skipped(tmp_path):
    src = _image_folder(tmp_path / "src", corrupt=("ant/broken.jpg",))
    dst = str(tmp_path / "enc")
    summary = enc.encrypt_dataset(src, dst, patch_size=4, size=16, progress=False)
    assert summary["images"] == 8 and summary["skipped"] == 1
    report = json.load(open(os.path.join(dst, "report.json")))
    assert [s["path"] for s in report["skipped"]] == ["ant/broken.jpg"] and report["skipped"][0]["error"]
    manifest = enc.read_manifest(dst)
    assert manifest["classes"] == ["ant", "bee"] and manifest["num_skipped"] == 1
    # decrypted images = the source resized (shorter side) and centre-cropped
    out = str(tmp_path / "plain")
    enc.decrypt_dataset(dst, out, dst + ".keys.npy", progress=False)
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
    with pytest.raises(ValueError, match="outside DST"):
        enc.encrypt_dataset("digits", str(tmp_path / "e3"), keys=str(tmp_path / "e3" / "k.npy"), **SMALL)
    with pytest.raises(ValueError, match="--patch-size must divide --size"):
        enc.encrypt_dataset("digits", str(tmp_path / "e4"), **{**SMALL, "patch_size": 5})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        enc.encrypt_dataset(str(tmp_path / "nowhere"), str(tmp_path / "e5"), **SMALL)
    other = str(tmp_path / "other")
    enc.encrypt_dataset("digits", other, **SMALL)
    with pytest.raises(ValueError, match="is not the key file"):
        enc.decrypt_dataset(dst, str(tmp_path / "p"), other + ".keys.npy", progress=False)
    os.makedirs(tmp_path / "full")
    open(tmp_path / "full" / "x", "w").close()
    with pytest.raises(FileExistsError, match="not empty"):
        enc.decrypt_dataset(dst, str(tmp_path / "full"), dst + ".keys.npy", progress=False)


def test_unfinished_run_with_other_arguments_is_refused(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    _crash_on_write(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset("digits", dst, **SMALL)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other arguments"):
        enc.encrypt_dataset("digits", dst, **{**SMALL, "patch_size": 8})


def test_modified_shard_is_detected(tmp_path):
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, **SMALL)
    path = os.path.join(dst, "shard-00001-images.npy")
    arr = np.load(path)
    arr[0, 0, 0, 0] ^= 1
    np.save(path, arr)
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


def test_cli(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ppml", *args], capture_output=True, text=True, timeout=300,
                              cwd=TESTS_DIR)

    dst = str(tmp_path / "enc")
    res = cli("encrypt", "digits", dst, "--size", "16", "--patch-size", "4", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "img/s" in res.stderr and "encryption" in res.stderr and json.loads(res.stdout)["images"] == 1797
    res = cli("decrypt", dst, str(tmp_path / "plain"), "--keys", dst + ".keys.npy", "--no-progress")
    assert res.returncode == 0, res.stderr
    res = cli("encrypt", "digits", dst, "--size", "16", "--patch-size", "4")
    assert res.returncode == 2 and "already holds a finished" in res.stderr


def _main(*argv) -> tuple[int, list[str]]:
    import contextlib
    import io

    from ppml.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue().strip().splitlines()


def test_key_file_refusal_writes_nothing_and_the_fixed_command_runs(tmp_path):
    dst = str(tmp_path / "enc")
    open(dst + ".keys.npy", "wb").write(b"keys of another dataset")
    with pytest.raises(FileExistsError, match="key file .* already exists"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    assert not os.path.exists(dst)  # no job.json that would refuse the corrected command
    os.makedirs(dst)  # an empty DST is just as clean
    with pytest.raises(FileExistsError, match="already exists"):
        enc.encrypt_dataset("digits", dst, **SMALL)
    assert os.listdir(dst) == []
    summary = enc.encrypt_dataset("digits", dst, keys=str(tmp_path / "k.npy"), **SMALL)
    assert summary["images"] == 1797


def test_ctrl_c_in_encrypt_is_one_line_and_the_same_command_resumes(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    args = ("encrypt", "digits", dst, "--size", "16", "--patch-size", "4", "--key-seed", "0", "--no-progress")
    _crash_on_write(monkeypatch, 3 + 4 * 5 + 2)  # job, keys, index; 5 whole shards; inside the 6th
    rc, err = _main(*args)
    monkeypatch.undo()
    assert rc == 130 and len(err) == 1, err
    assert "interrupted: 565 of 1797 images are kept" in err[0] and "same command resumes" in err[0]
    rc, err = _main(*args)
    assert rc == 0, err
    assert json.load(open(os.path.join(dst, "manifest.json")))["num_images"] == 1797


def test_default_shards_make_resume_useful_for_small_folders(tmp_path, monkeypatch):
    assert enc.auto_shard_size(1797) == 113 and enc.auto_shard_size(10) == 16 and enc.auto_shard_size(10**7) == 4096
    src = _image_folder(tmp_path / "src", n_per_class=40)  # 80 images: 5 shards of 16
    ref = str(tmp_path / "ref")
    enc.encrypt_dataset(src, ref, patch_size=4, size=16, key_seed=1, progress=False)
    cut = str(tmp_path / "cut")
    _crash_on_write(monkeypatch, 3 + 4 * 3 + 1)  # inside the 4th shard
    with pytest.raises(KeyboardInterrupt, match="48 of 80 images are kept"):
        enc.encrypt_dataset(src, cut, patch_size=4, size=16, key_seed=1, progress=False)
    monkeypatch.undo()
    summary = enc.encrypt_dataset(src, cut, patch_size=4, size=16, key_seed=1, progress=False)
    assert summary["resumed_images"] == 48 and summary["shards"] == 5 and summary["shard_size"] == 16
    for f in _tree_files(ref):
        if f != "job.json":
            assert filecmp.cmp(os.path.join(cut, f), os.path.join(ref, f), shallow=False), f


def test_ctrl_c_in_decrypt_is_one_line_and_the_same_command_finishes(tmp_path, monkeypatch):
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, key_seed=0, **SMALL)
    ref = str(tmp_path / "ref")
    enc.decrypt_dataset(dst, ref, dst + ".keys.npy", progress=False)
    out = str(tmp_path / "out")
    args = ("decrypt", dst, out, "--keys", dst + ".keys.npy", "--no-progress")
    _crash_on_write(monkeypatch, 1 + 300 + 1)  # the marker, 300 images, then the kill
    rc, err = _main(*args)
    monkeypatch.undo()
    assert rc == 130 and len(err) == 1 and "300 of 1797 images are written" in err[0] and "same command" in err[0]
    rc, err = _main(*args)
    assert rc == 0, err
    assert _tree_files(out) == _tree_files(ref)
    for f in _tree_files(ref):
        assert filecmp.cmp(os.path.join(out, f), os.path.join(ref, f), shallow=False), f
    # a finished OUT is refused again
    with pytest.raises(FileExistsError, match="not empty"):
        enc.decrypt_dataset(dst, out, dst + ".keys.npy", progress=False)


def _tamper_index(dst: str, k: int, path: str) -> None:
    index_path = os.path.join(dst, "index.json")
    index = json.load(open(index_path))
    index["items"][k][0] = path
    json.dump(index, open(index_path, "w"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlinked-file", "symlinked-dir", "resolves-outside"])
def test_decrypt_refuses_output_paths_outside_out(tmp_path, kind):
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, key_seed=0, **SMALL)
    out, outside = tmp_path / "out", tmp_path / "outside"
    os.makedirs(outside)
    if kind == "dotdot":
        _tamper_index(dst, 7, "../../../name")
    elif kind == "absolute":
        _tamper_index(dst, 7, str(outside / "name"))
    else:
        # an OUT left by an interrupted decryption of DST (so it is resumed), holding a planted symlink
        os.makedirs(out)
        (out / enc._DECRYPT_MARK).write_bytes(
            enc._json_bytes({"dst": os.path.abspath(dst), "keys_sha256": enc.read_manifest(dst)["keys_sha256"]}))
        if kind == "symlinked-file":
            os.symlink(outside / "victim.png", out / "evil.png")
            _tamper_index(dst, 7, "evil")
        elif kind == "symlinked-dir":
            os.symlink(outside, out / "sub")
            _tamper_index(dst, 7, "sub/name")
        else:  # a link inside OUT to OUT's parent: "up/outside/name" has no "..", yet lands outside
            os.symlink(tmp_path, out / "up")
            _tamper_index(dst, 7, "up/outside/name")
    before = _tree_files(str(tmp_path))
    with pytest.raises(ValueError, match="refusing the path"):
        enc.decrypt_dataset(dst, str(out), dst + ".keys.npy", progress=False)
    assert _tree_files(str(tmp_path)) == before and os.listdir(outside) == []  # nothing written anywhere
    if kind in ("dotdot", "absolute"):
        rc, err = _main("decrypt", dst, str(tmp_path / "out2"), "--keys", dst + ".keys.npy", "--no-progress")
        assert rc == 2 and "refusing the path" in err[-1] and not os.path.exists(tmp_path / "out2")


def test_safe_output_path(tmp_path):
    from ppml._paths import safe_output_path

    root = tmp_path / "root"
    os.makedirs(root / "a")
    assert safe_output_path(str(root), "a/b.png", "t") == str(root / "a" / "b.png")
    os.symlink(root / "a", root / "inner")  # a link that stays inside is fine
    assert safe_output_path(str(root), "inner/b.png", "t") == str(root / "inner" / "b.png")
    for bad in ("", "../x", "a/../../x", "/etc/x", "a//b", "./a", "a\\..\\x", "C:x", "~/x", None, 3):
        with pytest.raises(ValueError, match="refusing the path"):
            safe_output_path(str(root), bad, "t")
    os.symlink(tmp_path, root / "up")
    with pytest.raises(ValueError, match="symlink"):
        safe_output_path(str(root), "up/x", "t")


def test_tampered_manifest_file_names_stay_inside_dst(tmp_path):
    dst = str(tmp_path / "enc")
    enc.encrypt_dataset("digits", dst, **SMALL)
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    manifest["shards"][0]["files"]["images"] = "../enc.keys.npy"
    json.dump(manifest, open(os.path.join(dst, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="refusing the path"):
        enc.load_shards(dst)
