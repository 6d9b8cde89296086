"""The progress bar of ppml's long jobs (decoding folders, encrypting, training): tqdm when it is installed and the
caller wants a bar, else a silent stand-in with the same methods, so callers never branch on it."""

from __future__ import annotations

from collections.abc import Iterable


class _Silent:
    def __init__(self, iterable: Iterable | None) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, enabled: bool = True, **kwargs):
    """``tqdm(iterable, desc=..., total=..., dynamic_ncols=True, **kwargs)``, or a silent stand-in when ``enabled`` is
    False or tqdm is missing."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with ppml[train]
            return _Silent(iterable)
        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kwargs)
    return _Silent(iterable)
