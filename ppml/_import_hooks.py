"""Run a callback right after a module is first imported (or now, when it already is), without importing it.

Used to keep ``import ppml`` cheap: registering the ViTs with timm (ppml/_timm.py) and marking the key-drawing
functions for torch.compile (ppml/keys.py) each need a module that costs seconds to import — they happen when the
user's program imports it, not before.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable

_PENDING: dict[str, list[Callable[[], None]]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it for a pending module's spec and wraps its loader so the
    callbacks run once the module's code has run."""

    def find_spec(self, fullname, path=None, target=None):
        callbacks = _PENDING.pop(fullname, None)
        if callbacks is None:
            return None
        if not _PENDING:
            _uninstall()
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_callbacks(module):
            exec_module(module)
            for cb in callbacks:
                cb()

        loader.exec_module = exec_then_callbacks
        return spec


_HOOK = _AfterImport()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def after_import(name: str, callback: Callable[[], None]) -> None:
    """``callback()`` once ``name`` is imported: now if it is, else right after its first import."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        callback()
        return
    _PENDING.setdefault(name, []).append(callback)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
