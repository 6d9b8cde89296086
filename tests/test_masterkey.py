"""The master key: a few hundred bytes whatever N, mode 0600, ids and permutations derived by HMAC-SHA256 exactly as
ppml.data.masterkey's docstring specifies (checked against an independent implementation of that text), uniform
permutations, clear errors for anything that is not a key file."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import stat

import numpy as np
import pytest

from ppml.data import masterkey as mkey


def _spec_permutation(key: bytes, sid: str, n: int) -> list[int]:
    """The docstring's words, written out again: PRF words, Fisher–Yates from the top, rejection of the biased tail."""

    def words():
        for c in itertools.count():
            block = hmac.new(key, b"ppml-perm" + bytes.fromhex(sid) + c.to_bytes(4, "big"), hashlib.sha256).digest()
            for o in range(0, 32, 4):
                yield int.from_bytes(block[o : o + 4], "big")

    stream, perm = words(), list(range(n))
    for i in reversed(range(1, n)):
        w = next(stream)
        while w >= 2**32 - 2**32 % (i + 1):
            w = next(stream)
        j = w % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def test_ids_and_permutations_follow_the_spec():
    key = bytes(range(32))
    for index in (0, 1, 255, 10**9):
        want = hmac.new(key, b"ppml-id" + index.to_bytes(8, "big"), hashlib.sha256).hexdigest()[:32]
        assert mkey.sample_id(key, index) == want
    for n in (1, 2, 3, 16, 196, 784):
        sid = mkey.sample_id(key, n)
        perm = mkey.derive_permutation(key, sid, n)
        assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(n))
        assert perm.tolist() == _spec_permutation(key, sid, n)
    # another id or another key: another permutation
    a = mkey.derive_permutation(key, mkey.sample_id(key, 0), 196)
    assert not np.array_equal(a, mkey.derive_permutation(key, mkey.sample_id(key, 1), 196))
    other = bytes(32)
    assert not np.array_equal(a, mkey.derive_permutation(other, mkey.sample_id(key, 0), 196))
    batch = mkey.derive_permutations(key, [mkey.sample_id(key, i) for i in range(3)], 16)
    assert batch.shape == (3, 16) and np.array_equal(batch[2], mkey.derive_permutation(key, mkey.sample_id(key, 2), 16))


def test_permutations_are_uniform():
    # all 24 permutations of 4 over 4,800 ids: a chi-square test at p = 0.001 (23 dof: 49.7), and each position's
    # value uniform as well; the ids are fixed, so the test is deterministic
    key = hashlib.sha256(b"uniformity").digest()
    counts: dict[tuple, int] = {}
    pos = np.zeros((4, 4))
    for i in range(4800):
        p = tuple(mkey.derive_permutation(key, mkey.sample_id(key, i), 4).tolist())
        counts[p] = counts.get(p, 0) + 1
        pos[np.arange(4), p] += 1
    assert len(counts) == 24
    expected = 4800 / 24
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 49.7
    assert np.abs(pos - 1200).max() < 6 * np.sqrt(1200 * 0.75)


def test_key_file_is_small_private_and_round_trips(tmp_path):
    mk = mkey.new_master_key("rs", {"patch_size": 16, "image_size": 224})
    assert len(mk.key) == 32 and mk.key.hex() not in repr(mk)  # a logged repr does not leak it
    path = str(tmp_path / "k.key")
    old = os.umask(0)  # even with a permissive umask the file is 0600
    try:
        mkey.write_key_file(mk, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.path.getsize(path) < 512
    doc = json.load(open(path))
    assert set(doc) == {"format", "version", "scheme", "params", "key", "created"} and doc["key"] == mk.key.hex()
    back = mkey.read_key_file(path)
    assert back.key == mk.key and back.fingerprint == mk.fingerprint and back.params == mk.params
    with pytest.raises(FileExistsError, match="already exists"):
        mkey.write_key_file(mk, path)
    assert mkey.new_master_key("rs", {}).key != mk.key


def test_key_file_size_does_not_grow_with_the_dataset(tmp_path):
    pytest.importorskip("sklearn")
    import ppml.data.encrypted as enc

    small = tmp_path / "src"
    for cls in ("a", "b"):
        os.makedirs(small / cls)
        from PIL import Image

        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small / cls / "x.png")
    enc.encrypt_dataset(str(small), str(tmp_path / "two"), patch_size=4, size=16, progress=False)
    enc.encrypt_dataset("digits", str(tmp_path / "many"), patch_size=4, size=16, progress=False)
    assert stat.S_IMODE(os.stat(tmp_path / "two.key.index.json").st_mode) == 0o600  # the names: owner-only too
    sizes = {os.path.getsize(tmp_path / f"{n}.key") for n in ("two", "many")}
    assert max(sizes) < 512 and max(sizes) - min(sizes) <= 2  # 2 images or 1,797: the same few hundred bytes


def test_bad_key_files_and_ids_are_clear_errors(tmp_path):
    bad = tmp_path / "bad"
    for content, match in [
        (b"\x93NUMPY", "not JSON"),
        (b'{"format": "other"}', "not a ppml key file"),
        (b'{"format": "ppml-key", "version": 9}', "version 9"),
        (b'{"format": "ppml-key", "version": 1, "key": "abc"}', "no valid key"),
    ]:
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            mkey.read_key_file(str(bad))
    with pytest.raises(FileNotFoundError, match="not a file"):
        mkey.read_key_file(str(tmp_path / "missing"))
    for sid in ("xyz", "A" * 32, 5):
        with pytest.raises(ValueError, match="32 lowercase hex"):
            mkey.derive_permutation(bytes(32), sid, 4)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        mkey.derive_permutation(bytes(32), "0" * 32, 0)
    with pytest.raises(ValueError, match="index must be an int >= 0"):
        mkey.sample_id(bytes(32), -1)
