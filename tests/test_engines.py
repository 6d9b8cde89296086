"""`ppml encrypt --workers N` (spawned processes) and `--engine ray` write the same bytes as one process, and both
resume an interrupted run to the same bytes. Ray tests are tiny (a local Ray with one CPU) and skip without Ray."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import pytest

pytest.importorskip("PIL")

import ppml.data.encrypted as enc  # noqa: E402
import ppml.data.wds_shards as wds  # noqa: E402

ARGS = dict(patch_size=8, size=32, shard_size=4, key_seed=3, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("engines") / "src"
    rng = np.random.default_rng(1)
    for c in range(2):
        os.makedirs(root / f"c{c}")
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (40, 36 + 4 * i, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    (root / "c1" / "bad.jpg").write_bytes(b"not a jpeg")
    return str(root)


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("ref") / "enc")
    enc.encrypt_dataset(folder, dst, **ARGS)
    return dst


def _assert_same(dst: str, ref: str) -> None:
    assert sorted(os.listdir(dst)) == sorted(os.listdir(ref))
    for f in os.listdir(ref):
        assert filecmp.cmp(os.path.join(dst, f), os.path.join(ref, f), shallow=False), f
    a, b = json.load(open(dst + ".key.index.json")), json.load(open(ref + ".key.index.json"))
    assert a["items"] == b["items"] and a["corrupt"] == b["corrupt"] and len(a["corrupt"]) == 1


def _interrupted(folder: str, dst: str, monkeypatch, after: int) -> None:
    real, calls = wds.write_tar_atomic, []

    def crashing(path, members):
        calls.append(path)
        if len(calls) > after:
            raise KeyboardInterrupt("simulated kill")
        return real(path, members)

    monkeypatch.setattr(wds, "write_tar_atomic", crashing)
    with pytest.raises(KeyboardInterrupt):
        enc.encrypt_dataset(folder, dst, **ARGS)
    monkeypatch.undo()
    assert len([n for n in os.listdir(dst) if n.endswith(".tar")]) == after


def test_worker_processes_write_the_same_bytes_and_resume(folder, reference, tmp_path, monkeypatch):
    # one run covers both: the first shard written by one process, then killed; the rest by 2 spawned workers
    dst = str(tmp_path / "procs")
    _interrupted(folder, dst, monkeypatch, after=1)
    summary = enc.encrypt_dataset(folder, dst, workers=2, **ARGS)
    assert summary["workers"] == 2 and summary["resumed_images"] == 4
    assert summary["images"] == 10 and summary["skipped"] == 1  # the corrupt image, found by a worker
    _assert_same(dst, reference)


def test_ray_writes_the_same_bytes_and_resumes(folder, reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        dst = str(tmp_path / "ray")
        _interrupted(folder, dst, monkeypatch, after=1)
        summary = enc.encrypt_dataset(folder, dst, engine="ray", **ARGS)
        assert summary["engine"] == "ray" and summary["resumed_images"] == 4 and summary["images"] == 10
        _assert_same(dst, reference)
        assert ray.is_initialized()  # the caller's Ray is left running
    finally:
        ray.shutdown()


def test_missing_ray_is_a_clear_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ImportError, match=r'pip install "ppml\[ray\]"'):
        enc.encrypt_dataset("digits", str(tmp_path / "enc"), engine="ray", **ARGS)
    assert not os.path.exists(tmp_path / "enc") and not os.path.exists(tmp_path / "enc.key")
    with pytest.raises(ValueError, match="--engine must be one of"):
        enc.encrypt_dataset("digits", str(tmp_path / "enc"), engine="dask", **ARGS)
