"""Images in the forms torchvision v2 transforms take, for ppml's transforms (PatchShuffle, SubpatchMix).

:func:`as_batch` turns a PIL image, a ``torchvision.tv_tensors.Image`` or a tensor ``[C, H, W]`` / ``[B, C, H, W]`` into
a plain ``[B, C, H, W]`` tensor, and hands back the function that turns the op's result into the same kind again:
PIL in, PIL of the same mode out (integer pixels rounded half to even and clamped when the op's output is float, as
MI's mean is); ``tv_tensors.Image`` in, ``tv_tensors.Image`` out; a tensor in, a tensor of the same rank out. Neither
PIL nor torchvision is imported here unless the input is one of theirs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

# PIL modes whose pixels are not quantities (palette indices, packed bits): shuffling them is fine, averaging is not.
NON_NUMERIC_MODES = ("P", "PA", "1")


def _pil_image_class():
    mod = sys.modules.get("PIL.Image")
    return None if mod is None else mod.Image


def _tv_image_class():
    mod = sys.modules.get("torchvision.tv_tensors")
    return None if mod is None else mod.Image


def as_batch(images: Any, op: str, *, averages: bool = False) -> tuple[Tensor, Callable[[Tensor], Any], bool]:
    """``(batch [B, C, H, W], restore, single)``; ``restore(out)`` gives ``out`` ([B, C, H', W']) back as ``images``'
    kind; ``single``: one image was given (a batch dimension was added, so per-image keys should drop it too).
    ``averages``: the op mixes pixel values (MI), which PIL's palette and 1-bit modes cannot hold."""
    if type(images) is Tensor:  # the common case first (and the one torch.compile traces)
        return _tensor_batch(images)
    pil_cls = _pil_image_class()
    if pil_cls is not None and isinstance(images, pil_cls):
        return _pil_batch(images, op, averages)
    tv_cls = _tv_image_class()
    if tv_cls is not None and isinstance(images, tv_cls):
        from torchvision import tv_tensors

        batch, restore_tensor, single = _tensor_batch(images.as_subclass(Tensor))
        return batch, lambda out: tv_tensors.wrap(restore_tensor(out), like=images), single
    if isinstance(images, Tensor):
        return _tensor_batch(images)
    raise TypeError(
        f"{op}: images must be a Tensor [C, H, W] or [B, C, H, W], a torchvision.tv_tensors.Image or a PIL image, "
        f"got {type(images).__name__}"
    )


def _tensor_batch(images: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor], bool]:
    if images.dim() == 3:
        return images.unsqueeze(0), lambda out: out.squeeze(0), True
    return images, lambda out: out, False  # 4-D, or anything else for the op's own checks to name


def _pil_batch(img, op: str, averages: bool) -> tuple[Tensor, Callable[[Tensor], Any], bool]:
    if averages and img.mode in NON_NUMERIC_MODES:
        raise ValueError(
            f"{op}: cannot average the pixels of a PIL image in mode {img.mode!r} (palette indices / bits); convert it "
            f"first, e.g. img.convert('RGB') or img.convert('L')"
        )
    arr = np.array(img)  # [H, W] or [H, W, C]; a copy, so the tensor owns writable memory
    dtype = arr.dtype
    if dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif dtype not in (np.uint8, np.float32, np.float64):
        arr = arr.astype(np.float64)  # 'I' (int32), 'I;16' (uint16): exact in float64
    chw = torch.from_numpy(arr).unsqueeze(-1) if arr.ndim == 2 else torch.from_numpy(arr)
    batch = chw.permute(2, 0, 1).unsqueeze(0)

    def restore(out: Tensor):
        a = out.squeeze(0).permute(1, 2, 0).detach().cpu()
        if a.is_floating_point() and dtype.kind in "biu":
            info = np.iinfo(np.uint8 if dtype == np.bool_ else dtype)
            a = a.double().round().clamp(info.min, info.max)
        a = a.numpy()
        if arr.ndim == 2:
            a = a[..., 0]
        return _to_pil(np.ascontiguousarray(a.astype(dtype)), img)

    return batch, restore, True


def _to_pil(arr: np.ndarray, like):
    from PIL import Image

    size = (arr.shape[1], arr.shape[0])
    if like.mode in ("1", "L", "RGB", "RGBA", "F", "I", "I;16"):
        out = Image.fromarray(arr)  # infers exactly these modes from the dtype and the channel count
        if out.mode != like.mode and like.mode == "I":
            out = out.convert("I")
    else:  # 8-bit band-interleaved modes (LA, CMYK, YCbCr, LAB, HSV, P, PA, ...): their raw layout is the array's
        out = Image.frombytes(like.mode, size, arr.tobytes())
    if like.mode in ("P", "PA") and like.palette is not None:
        out.putpalette(like.getpalette())
    return out
