"""`ppml decrypt` cannot be steered: output names come from the owner-side index and are checked (relative, no `..`,
no symlink below OUT nor OUT itself, resolved inside OUT, no duplicates); a tampered index or manifest (bad SHA-256,
wrong counts, foreign names) is refused with a clear error and nothing written anywhere."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("PIL")

import ppml  # noqa: E402
import ppml.data.encrypted as enc  # noqa: E402


def _tree(root) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files + dirs]
    return sorted(out)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    import numpy as np
    from PIL import Image

    base = tmp_path_factory.mktemp("made")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        os.makedirs(base / "src" / cls)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(base / "src" / cls / f"{i}.png")
    enc.encrypt_dataset(str(base / "src"), str(base / "enc"), patch_size=4, size=16, shard_size=4, progress=False)
    return base


@pytest.fixture
def case(made, tmp_path):
    """A fresh copy of the encrypted dataset: (dst, key, index, tmp_path)."""
    shutil.copytree(made / "enc", tmp_path / "enc")
    shutil.copy(made / "enc.key", tmp_path / "enc.key")
    shutil.copy(made / "enc.key.index.json", tmp_path / "enc.key.index.json")
    return str(tmp_path / "enc"), str(tmp_path / "enc.key"), str(tmp_path / "enc.key.index.json"), tmp_path


def _edit_json(path, fn) -> None:
    doc = json.load(open(path))
    fn(doc)
    json.dump(doc, open(path, "w"))


def _refused(tmp_path, dst, key, match, out=None, **kw) -> None:
    out = out or str(tmp_path / "out")
    before = _tree(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ppml.data.decrypt_dataset(dst, out, key, progress=False, **kw)
    assert _tree(tmp_path) == before  # nothing written anywhere, OUT included


def test_the_untampered_copy_decrypts(case):
    dst, key, _, tmp_path = case
    assert ppml.data.decrypt_dataset(dst, str(tmp_path / "out"), key, progress=False)["images"] == 6
    assert _tree(tmp_path / "out") == ["cat", "cat/0.png.png", "cat/1.png.png", "cat/2.png.png", "dog",
                                       "dog/0.png.png", "dog/1.png.png", "dog/2.png.png"]  # fmt: skip


@pytest.mark.parametrize(
    "name", ["../../escape", "/tmp/abs-escape", "cat/../../escape", "a//b", "./x", "a\\..\\x", "", None, 7]
)
def test_tampered_index_names_are_refused(case, name):
    dst, key, index, tmp_path = case
    _edit_json(index, lambda d: d["items"][4].__setitem__(1, name))
    _refused(tmp_path, dst, key, "refusing the path")


def test_duplicate_names_and_ids_in_the_index_are_refused(case):
    dst, key, index, tmp_path = case
    _edit_json(index, lambda d: d["items"][4].__setitem__(1, d["items"][3][1]))
    _refused(tmp_path, dst, key, "twice")
    _edit_json(index, lambda d: d["items"].append(list(d["items"][0])))
    _refused(tmp_path, dst, key, "twice")


def test_an_index_of_other_ids_or_another_key_is_refused(case):
    dst, key, index, tmp_path = case
    saved = open(index).read()
    _edit_json(index, lambda d: d["items"].pop(2))
    _refused(tmp_path, dst, key, "does not name")
    open(index, "w").write(saved)
    _edit_json(index, lambda d: d.__setitem__("key_fingerprint", "0" * 32))
    _refused(tmp_path, dst, key, "another key")
    os.remove(index)
    _refused(tmp_path, dst, key, "owner-side index .* is not a file")


@pytest.mark.parametrize("kind", ["symlinked-file", "symlinked-dir", "resolves-outside", "link-inside-out"])
def test_symlinks_below_out_are_refused(case, kind):
    dst, key, index, tmp_path = case
    out, outside = tmp_path / "out", tmp_path / "outside"
    os.makedirs(outside)
    # an OUT left by an interrupted decryption of DST (so it is resumed, not refused as non-empty), with a planted link
    os.makedirs(out)
    mark = {"dst": os.path.abspath(dst), "key": enc.read_manifest(dst)["key_fingerprint"]}
    (out / ".ppml-decrypt.json").write_text(json.dumps(mark))
    if kind == "symlinked-file":
        os.makedirs(out / "cat")
        os.symlink(outside / "victim.png", out / "cat" / "0.png.png")
    elif kind == "symlinked-dir":
        os.symlink(outside, out / "cat")
    elif kind == "resolves-outside":  # "up/outside/x" has no "..", yet lands outside through a link to OUT's parent
        os.symlink(tmp_path, out / "up")
        _edit_json(index, lambda d: d["items"][0].__setitem__(1, "up/outside/x"))
    else:  # a link that stays inside OUT is refused too: OUT is decrypt's own
        os.makedirs(out / "real")
        os.symlink(out / "real", out / "cat")
    _refused(tmp_path, dst, key, "refusing the path|symlink")
    assert os.listdir(outside) == []


def test_out_itself_a_symlink_is_refused(case):
    dst, key, _, tmp_path = case
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", tmp_path / "out")
    _refused(tmp_path, dst, key, "is a symlink")


def test_tampered_manifest_is_refused(case):
    dst, key, _, tmp_path = case
    manifest = os.path.join(dst, "manifest.json")
    saved = open(manifest).read()
    for edit, match in [
        (lambda m: m["shards"][0].__setitem__("sha256", "0" * 64), "SHA-256"),
        (lambda m: m.__setitem__("count", 7), "sum to 6"),
        (lambda m: (m["shards"][0].__setitem__("count", 3), m.__setitem__("count", 5)), "holds 4 samples"),
        (lambda m: m["shards"][0].__setitem__("name", "../enc.key"), "must be named"),
        (lambda m: m["shards"].pop(), "sum to 4"),
        (lambda m: m.__setitem__("scheme", "xx"), "scheme must be"),
    ]:
        open(manifest, "w").write(saved)
        _edit_json(manifest, edit)
        _refused(tmp_path, dst, key, match)
    # a modified shard (its bytes, not the manifest) is refused as well
    open(manifest, "w").write(saved)
    shard = os.path.join(dst, "shard-000001.tar")
    data = bytearray(open(shard, "rb").read())
    data[700] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    _refused(tmp_path, dst, key, "does not match its SHA-256")


def test_cli_refusal_is_one_clear_line(case, capsys):
    from ppml.cli import main

    dst, key, index, tmp_path = case
    _edit_json(index, lambda d: d["items"][1].__setitem__(1, "../../../etc/evil"))
    assert main(["decrypt", dst, str(tmp_path / "out"), "--keys", key, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "refusing the path '../../../etc/evil.png'" in err and "nothing was written" in err
    assert not os.path.exists(tmp_path / "out")


def test_safe_output_path(tmp_path):
    from ppml._paths import safe_output_path

    root = tmp_path / "root"
    os.makedirs(root / "a")
    assert safe_output_path(str(root), "a/b.png", "t") == str(root / "a" / "b.png")
    for bad in ("", "../x", "a/../../x", "/etc/x", "a//b", "./a", "a\\..\\x", "C:x", "~/x", None, 3):
        with pytest.raises(ValueError, match="refusing the path"):
            safe_output_path(str(root), bad, "t")
    os.symlink(tmp_path, root / "up")
    with pytest.raises(ValueError, match="symlink"):
        safe_output_path(str(root), "up/x", "t")
