"""The data owner's master key: one 256-bit secret from which every image's opaque id and RS permutation derive.

A key file is a few hundred bytes of JSON whatever the number of images (``ppml-key`` version 1)::

    {"format": "ppml-key", "version": 1, "scheme": "rs", "params": {...}, "key": "<64 hex>", "created": "<UTC ISO>"}

written with mode 0600. The derivations (HMAC-SHA256 from :mod:`hashlib`/:mod:`hmac`; a reimplementation needs only
these lines):

- id of source item ``i`` (its index in the sorted source list): the first 16 bytes of
  ``HMAC(key, b"ppml-id" + i as 8-byte big-endian)``, as 32 lowercase hex characters. Ids depend on the key and the
  sorted source list only, never on a file name.
- the PRF stream of an id: the concatenation of ``HMAC(key, b"ppml-perm" + id (16 bytes) + c as 4-byte big-endian)``
  for c = 0, 1, 2, ..., read as big-endian uint32 words.
- the permutation of an id over ``n`` patches: Fisher–Yates from the top (i = n-1 .. 1), each j uniform in [0, i] by
  rejection — a word w is used when ``w < 2^32 - (2^32 mod (i+1))`` (``j = w mod (i+1)``), else the next word is
  read — so there is no modulo bias: every permutation is equally likely given a uniform PRF.

The key protects the permutation of every RS image: with it (and an image's id) anyone can undo the shuffle; MI has no
inverse, its key only names the images. Lose it and nothing decrypts; leak it and every image's permutation is known.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from dataclasses import dataclass, field

import numpy as np

KEY_FORMAT = "ppml-key"
KEY_VERSION = 1
KEY_BYTES = 32
_ID_TAG, _PERM_TAG, _FINGERPRINT_TAG = b"ppml-id", b"ppml-perm", b"ppml-fingerprint"


@dataclass(frozen=True)
class MasterKey:
    """A loaded (or new) master key. ``params`` records what it encrypted (scheme parameters, never names)."""

    key: bytes = field(repr=False)  # never printed: a repr in a log would leak it
    scheme: str
    params: dict
    created: str

    def sample_id(self, index: int) -> str:
        return sample_id(self.key, index)

    def permutation(self, sid: str, n: int) -> np.ndarray:
        return derive_permutation(self.key, sid, n)

    @property
    def fingerprint(self) -> str:
        """A public name of the key (HMAC of a constant): DST's manifest stores it to match a key file to DST."""
        return hmac.new(self.key, _FINGERPRINT_TAG, hashlib.sha256).hexdigest()[:32]


def new_master_key(scheme: str, params: dict) -> MasterKey:
    """256 bits from the OS CSPRNG (:mod:`secrets`)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return MasterKey(secrets.token_bytes(KEY_BYTES), scheme, dict(params), created)


def sample_id(key: bytes, index: int) -> str:
    """The opaque id of the ``index``-th item of the sorted source list (see the module docstring)."""
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"ppml.data.sample_id: index must be an int >= 0, got {index!r}")
    return hmac.new(key, _ID_TAG + int(index).to_bytes(8, "big"), hashlib.sha256).digest()[:16].hex()


def _check_id(sid: str, where: str) -> bytes:
    if not isinstance(sid, str) or len(sid) != 32 or sid.strip("0123456789abcdef"):
        raise ValueError(f"{where}: a sample id is 32 lowercase hex characters, got {sid!r}")
    return bytes.fromhex(sid)


def derive_permutation(key: bytes, sid: str, n: int) -> np.ndarray:
    """The permutation of ``0..n-1`` (int64 [n]) keyed by ``key`` for the sample id ``sid`` (module docstring)."""
    raw = _check_id(sid, "ppml.data.derive_permutation")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"ppml.data.derive_permutation: n must be an int >= 1, got {n!r}")
    words: list[int] = []
    counter, pos = 0, 0

    def refill(count: int) -> None:
        nonlocal counter
        blocks = []
        for _ in range(-(-count // 8)):
            blocks.append(hmac.new(key, _PERM_TAG + raw + counter.to_bytes(4, "big"), hashlib.sha256).digest())
            counter += 1
        data = b"".join(blocks)
        words.extend(struct.unpack(f">{len(data) // 4}I", data))

    refill(n)  # enough for n-1 draws; rejections (probability < (i+1)/2^32 each) read more
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 32) - ((1 << 32) % bound)
        while True:
            if pos == len(words):
                refill(8)
            w = words[pos]
            pos += 1
            if w < limit:
                break
        j = w % bound
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


def derive_permutations(key: bytes, ids, n: int) -> np.ndarray:
    """:func:`derive_permutation` for every id: int64 [len(ids), n]."""
    out = np.empty((len(ids), n), dtype=np.int64)
    for r, sid in enumerate(ids):
        out[r] = derive_permutation(key, sid, n)
    return out


def key_file_bytes(mk: MasterKey) -> bytes:
    doc = {"format": KEY_FORMAT, "version": KEY_VERSION, "scheme": mk.scheme, "params": mk.params,
           "key": mk.key.hex(), "created": mk.created}  # fmt: skip
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def write_key_file(mk: MasterKey, path: str, where: str = "ppml encrypt") -> None:
    """Writes ``path`` (mode 0600 from its creation: the key is never readable by others, not even for a moment);
    refuses an existing file."""
    if os.path.lexists(path):
        raise FileExistsError(f"{where}: the key file {path} already exists; refusing to overwrite a key")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_file_bytes(mk))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by the umask: make sure it is exactly 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def is_key_file(path: str) -> bool:
    """Whether ``path`` looks like a ``ppml-key`` JSON file (not the legacy ``.npy`` permutation table)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(1) == b"{"
    except OSError:
        return False


def read_key_file(path: str, where: str = "ppml decrypt") -> MasterKey:
    """Loads and checks a ``ppml-key`` file; a clear error for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: the key file {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: {path!r} is not a ppml key file (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != KEY_FORMAT:
        raise ValueError(f"{where}: {path!r} is not a ppml key file (format {doc.get('format')!r} if any)")
    if doc.get("version") != KEY_VERSION:
        raise ValueError(
            f"{where}: {path!r} is a ppml key file of version {doc.get('version')!r}; this ppml reads "
            f"version {KEY_VERSION}"
        )
    key = doc.get("key")
    if not isinstance(key, str) or len(key) != 2 * KEY_BYTES or key.strip("0123456789abcdef"):
        raise ValueError(f"{where}: {path!r} holds no valid key (expected {2 * KEY_BYTES} lowercase hex characters)")
    return MasterKey(bytes.fromhex(key), str(doc.get("scheme")), dict(doc.get("params") or {}), str(doc.get("created")))
