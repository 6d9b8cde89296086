"""ppml's ViTs in timm's registry after a plain ``import ppml``, without making ``import ppml`` pay for timm.

Importing timm costs about as much as importing torch (it imports every timm model), so ``import ppml`` does not do
it. Instead: when timm is already imported, ``import ppml`` registers the ViTs at once (importing ``ppml.models.vit``,
cheap once timm is loaded); otherwise a one-shot import hook (ppml/_import_hooks.py) registers them as soon as timm
has finished loading. Either way ``timm.create_model("pevit_tiny_patch16_224")`` works after ``import ppml``, in any
order, and a process that never imports timm never loads it. A registration that fails warns and leaves timm usable.
"""

from __future__ import annotations

import warnings

from ._import_hooks import after_import


def _register() -> None:
    try:
        import ppml.models.vit  # noqa: F401  (its @register_model decorators fill timm's registry)
    except Exception as e:  # never break the user's `import timm` (e.g. a timm too old for ppml)
        warnings.warn(f"ppml: could not register ppml's ViTs with timm: {type(e).__name__}: {e}", stacklevel=2)


def install() -> None:
    """Called by ``import ppml``."""
    after_import("timm", _register)
