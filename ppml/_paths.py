"""One check for every path that is read from a file (an index, a manifest, a checkpoint) and then written to."""

from __future__ import annotations

import os


def safe_output_path(root: str, rel, where: str) -> str:
    """``root/rel``, after checking that writing it cannot leave ``root``.

    ``rel`` must be a non-empty relative path (``/`` separated) without ``..`` or ``.`` components, NUL, backslashes
    or a drive; no component that already exists under ``root`` may be a symlink that leads outside ``root``, and the
    resolved path must lie under the resolved ``root``. Raises ValueError naming ``where`` and the offending entry.
    """
    bad = None
    if not isinstance(rel, str) or not rel:
        bad = "not a non-empty string"
    elif "\x00" in rel or "\\" in rel:
        bad = "contains NUL or a backslash"
    elif os.path.isabs(rel) or rel.startswith(("/", "~")) or (len(rel) > 1 and rel[1] == ":"):
        bad = "is absolute"
    elif any(part in ("..", ".", "") for part in rel.split("/")):
        bad = "has a '..', '.' or empty component"
    if bad is None:
        real_root = os.path.realpath(root)
        path = os.path.join(root, *rel.split("/"))
        probe = root
        for part in rel.split("/"):
            probe = os.path.join(probe, part)
            if os.path.islink(probe) and not _under(os.path.realpath(probe), real_root):
                bad = f"goes through the symlink {probe!r}, which leads outside"
                break
        else:
            if not _under(os.path.realpath(path), real_root):
                bad = "resolves outside"
    if bad is not None:
        raise ValueError(f"{where}: refusing the path {rel!r}: it {bad} (it must stay inside {root!r}; a tampered "
                         "file?); nothing was written")
    return path


def _under(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root
