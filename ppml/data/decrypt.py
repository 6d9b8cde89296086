"""``ppml decrypt``: RS ciphertext + the master key (+ the owner-side index for the names) → the exact resized images.

Nothing read from a file steers a write: every output name comes from the owner-side index and is checked before the
first write (relative, no ``..``, no absolute path, no symlink anywhere below OUT nor OUT itself, resolved inside OUT,
no duplicates), the manifest's counts and every shard's SHA-256 are checked first too, and each path is checked again
right before its file is written. A tampered index or manifest is refused with nothing written.
"""

from __future__ import annotations

import json
import os

import torch

from .._paths import safe_output_path
from .._progress import progress as _progress_bar
from . import legacy_v1, wds_shards
from .encrypted import (
    INDEX_FORMAT,
    Interrupted,
    check_key_file,
    default_index_path,
    read_manifest,
    sample_permutations,
)
from .wds_shards import json_bytes, write_atomic

_DEC = "ppml decrypt"
_DECRYPT_MARK = ".ppml-decrypt.json"  # in OUT while a decryption is unfinished: the same command resumes it


def _check_no_links(out: str, path: str, where: str) -> None:
    """No component from OUT down to ``path`` may be a symlink (not even one that stays inside: OUT is ours)."""
    if os.path.islink(out):
        raise ValueError(f"{where}: OUT {out!r} is a symlink; refusing to write through it")
    probe = out
    for part in os.path.relpath(path, out).split(os.sep):
        probe = os.path.join(probe, part)
        if os.path.islink(probe):
            raise ValueError(
                f"{where}: refusing the path {os.path.relpath(path, out)!r}: {probe!r} is a symlink "
                "(a tampered OUT?); nothing was written there"
            )


def _owner_items(index: str, manifest: dict, where: str) -> dict[str, str]:
    """id → source path from the owner-side index, after checking it belongs to this dataset."""
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{where}: the owner-side index {index!r} is not a file (it is written next to the key "
            "file as KEY.index.json; pass --index)"
        )
    with open(index) as fh:
        try:
            doc = json.load(fh)
        except ValueError as exc:
            raise ValueError(f"{where}: {index!r} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where}: {index!r} is not a ppml owner-side index")
    if doc.get("key_fingerprint") != manifest.get("key_fingerprint"):
        raise ValueError(f"{where}: {index!r} belongs to another key/dataset (its key fingerprint differs)")
    names: dict[str, str] = {}
    for row in doc.get("items") or []:
        if not (isinstance(row, list) and len(row) >= 2 and isinstance(row[0], str)):
            raise ValueError(f"{where}: {index!r} holds a malformed item {row!r:.80}")
        if row[0] in names:
            raise ValueError(
                f"{where}: {index!r} names the id {row[0]!r} twice (a tampered file?); nothing was written"
            )
        names[row[0]] = row[1]
    return names


def decrypt_dataset(dst: str, out: str, keys: str, *, index: str | None = None, progress: bool = True) -> dict:
    """RS only: writes every image of DST, decrypted with the key file KEYS, as a lossless PNG to
    ``OUT/<source path>.png`` — bit for bit the resized source image. Source paths come from the owner-side index
    (default ``KEYS.index.json``; a v1 dataset: DST/index.json). Refuses a key file that is not DST's, a non-empty OUT
    (unless it is this decryption, interrupted: then the images already written are kept and the rest follow), a
    tampered manifest or shard, and any output path that would land outside OUT or go through a symlink.
    Interrupted (Ctrl-C), it raises :class:`Interrupted` saying what was kept."""
    import ppml

    manifest = read_manifest(dst)
    check_key_file(dst, keys, manifest)
    legacy = manifest["format"] == legacy_v1.FORMAT
    out = os.path.abspath(out)
    mark = {"dst": os.path.abspath(dst),
            "key": manifest["keys_sha256"] if legacy else manifest["key_fingerprint"]}  # fmt: skip
    mark_path = os.path.join(out, _DECRYPT_MARK)
    if os.path.islink(out):
        raise ValueError(f"{_DEC}: OUT {out!r} is a symlink; refusing to write through it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{_DEC}: OUT {out!r} is a file, not a folder")
    resuming = False
    if os.path.isdir(out) and os.listdir(out):
        if os.path.isfile(mark_path) and not os.path.islink(mark_path):
            with open(mark_path) as fh:
                resuming = json.load(fh) == mark
        if not resuming:
            raise FileExistsError(f"{_DEC}: OUT {out!r} is not empty; refusing to overwrite")

    # 1. what will be written where, all checked before the first write
    if legacy:
        x_all, _, idx = legacy_v1.load_shards(dst, manifest, True)
        items = legacy_v1.index_items(dst)
        where = f"{_DEC}: {dst}/index.json"
        plan = [(None, idx.tolist(), [items[i][0] if isinstance(items[i][0], str) else None for i in idx.tolist()])]
    else:
        index = os.path.abspath(index) if index else default_index_path(os.path.abspath(keys))
        names = _owner_items(index, manifest, f"{_DEC}")
        where = f"{_DEC}: {index}"
        plan = []
        for k, shard in enumerate(manifest["shards"]):
            path = os.path.join(dst, wds_shards.shard_name(k))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{_DEC}: {path} is missing (the manifest lists it)")
            if wds_shards.file_sha256(path) != shard.get("sha256"):
                raise ValueError(
                    f"{_DEC}: {path} does not match its SHA-256 in the manifest (corrupt or modified); "
                    "nothing was written"
                )
            ids = wds_shards.tar_ids(path)
            if len(ids) != shard["count"]:
                raise ValueError(
                    f"{_DEC}: {path} holds {len(ids)} samples, the manifest says {shard['count']}; nothing was written"
                )
            unknown = [sid for sid in ids if sid not in names]
            if unknown:
                raise ValueError(
                    f"{_DEC}: {path} holds {len(unknown)} id(s) the owner-side index {index!r} does not "
                    f"name (e.g. {unknown[0]!r}): another dataset's index?; nothing was written"
                )
            plan.append((k, ids, [names[sid] for sid in ids]))
    paths, seen = [], set()
    for _, ids, rels in plan:
        shard_paths = []
        for sid, rel in zip(ids, rels, strict=True):
            path = safe_output_path(out, rel + ".png" if isinstance(rel, str) and rel else rel, f"{where} item {sid}")
            _check_no_links(out, path, where)
            if path in seen:
                raise ValueError(f"{where} names {rel!r} twice (a tampered file?); nothing was written")
            seen.add(path)
            shard_paths.append(path)
        paths.append(shard_paths)

    # 2. decrypt and write
    from .wds_shards import png_bytes

    os.makedirs(out, exist_ok=True)
    if not resuming:
        write_atomic(mark_path, json_bytes(mark))
    total = sum(len(ids) for _, ids, _ in plan)
    bar = _progress_bar(total=total, enabled=progress, desc="decrypt", unit="img")
    done = 0
    p = manifest["patch_size"]
    try:
        for (k, ids, _), shard_paths in zip(plan, paths, strict=True):
            if legacy:
                x = x_all
            else:
                _, xs, _ = wds_shards.read_shard(dst, manifest, k, verify=True)
                x = torch.from_numpy(xs)
            for b in torch.arange(len(ids)).split(256):
                chunk = [ids[i] for i in b.tolist()]
                plain = ppml.unshuffle_patches(x[b], sample_permutations(dst, keys, manifest, chunk), p)
                for j, i in enumerate(b.tolist()):
                    path = shard_paths[i]
                    if not (resuming and os.path.exists(path)):
                        safe_output_path(out, os.path.relpath(path, out).replace(os.sep, "/"), where)
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                        _check_no_links(out, path, where)  # again: a link planted while we ran
                        write_atomic(path, png_bytes(plain[j].numpy()))  # whole files: a resumed run keeps them
                    done += 1
                bar.update(len(b))
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(
            f"{_DEC} interrupted: {done} of {total} images are written to {out}; the same command writes the rest"
        ) from None
    bar.close()
    os.remove(mark_path)
    return {"out": out, "images": total}
