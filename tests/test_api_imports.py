"""`import ppml` is enough: lazy subpackages, ppml's ViTs in timm's registry in either import order, a missing
extra named in the error — and `import ppml` itself stays cheap (no timm, no torchvision)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import ppml


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                         env=dict(os.environ), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_ppml_then_timm_finds_the_vits():
    out = _run(
        "import sys, torch, ppml\n"
        "heavy = [m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules]\n"
        "assert not heavy, f'import ppml loaded {heavy}'\n"
        "embed = ppml.models.MixedPatchEmbed(16, 2, in_chans=3, embed_dim=8, img_size=32)\n"
        "import timm\n"
        "m = timm.create_model('pevit_tiny_patch16_224', num_classes=3, depth=1, img_size=32)\n"
        "assert type(m).__name__ == 'PEFreeViT'\n"
        "print(sorted(timm.list_models('*vit_tiny_patch16_224')))\n"
    )
    assert "pevit_tiny_patch16_224" in out and "mivit_tiny_patch16_224" in out


def test_import_timm_then_ppml_finds_the_vits():
    _run(
        "import timm, ppml\n"
        "m = timm.create_model('mivit_tiny_patch16_224', num_classes=3, depth=1)\n"
        "assert type(m).__name__ == 'MIViT'\n"
        "import ppml.models.vit\n"  # importing it again registers nothing twice (no overwrite warning: -W error)
    )


@pytest.mark.parametrize("name", ["models", "data", "train", "attacks", "detection", "reference", "augment"])
def test_subpackages_are_attributes(name):
    assert getattr(ppml, name) is importlib.import_module(f"ppml.{name}")
    assert name in dir(ppml)


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ppml.nope  # noqa: B018


def test_missing_extra_is_named(monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "ppml.detection":
            raise ModuleNotFoundError("No module named 'pycocotools'", name="pycocotools")
        return real(name, *args, **kwargs)

    monkeypatch.delattr(ppml, "detection", raising=False)
    monkeypatch.delitem(sys.modules, "ppml.detection", raising=False)
    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ImportError, match=r'ppml.detection needs pycocotools.*pip install "ppml\[detect\]"'):
        ppml.detection  # noqa: B018
