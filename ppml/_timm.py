"""ppml's ViTs in timm's registry after a plain ``import ppml``, without making ``import ppml`` pay for timm.

Importing timm costs about as much as importing torch (it imports every timm model), so ``import ppml`` does not do
it. Instead: when timm is already imported, ``import ppml`` registers the ViTs at once (importing ``ppml.models.vit``,
cheap once timm is loaded); otherwise a one-shot import hook waits for the first ``import timm`` (or any
``timm.*``) and registers them as soon as timm has finished loading. Either way
``timm.create_model("pevit_tiny_patch16_224")`` works after ``import ppml``, in any order, and a process that never
imports timm never loads it. A registration that fails warns and leaves timm importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    try:
        import ppml.models.vit  # noqa: F401  (its @register_model decorators fill timm's registry)
    except Exception as e:  # never break the user's `import timm` (e.g. a timm too old for ppml)
        warnings.warn(f"ppml: could not register ppml's ViTs with timm: {type(e).__name__}: {e}", stacklevel=2)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of timm it asks the other finders for timm's spec and runs
    :func:`_register` right after timm's own module code."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        uninstall()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


_HOOK = _TimmImportHook()


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Called by ``import ppml``."""
    timm = sys.modules.get("timm")
    if timm is not None:
        if getattr(getattr(timm, "__spec__", None), "_initializing", False):
            return  # timm is importing ppml itself (not expected); it will not need the hook
        _register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
