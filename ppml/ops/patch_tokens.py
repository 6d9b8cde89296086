"""The model's input in one pass: ``ppml::patch_tokens`` and its Triton twin — schema, checks, fake, autograd,
public API.

uint8 (or float) images → float, normalised, RS-shuffled patch tokens ``[B, N, C·p·p]``, the layout a ViT's patch
embedding consumes (channel-major inside a token, as timm's conv weight ``[D, C, p, p]`` flattens), in one read of
the images and one write of the tokens, instead of the four passes a user would write (to float, normalise, unfold,
gather) each reading and writing the whole batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .. import _dispatch
from ..keys import random_permutations
from ..reference import patch_tokens as _reference_tokens
from ..reference.patch_tokens import accumulate_dtype, untoken
from ._common import check_perm_rows, check_positive_int, check_tile_key, describe, fallback_kernel, lib

OP = "ppml.patch_tokens"
TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

lib.define(
    "patch_tokens(Tensor images, Tensor? perm, int patch_size, float[]? mean, float[]? std, ScalarType dtype) -> Tensor"
)
# Writes into a preallocated contiguous [B, N, C·p·p] tensor: a training loop that makes tokens step after step reuses
# one buffer instead of paying fresh-page faults on every call (38.5 MB at B = 64). Not differentiable. It returns
# nothing: torch.compile cannot functionalise a custom op whose output aliases an input.
lib.define(
    "patch_tokens.out(Tensor images, Tensor? perm, int patch_size, float[]? mean, float[]? std, ScalarType dtype, *, "
    "Tensor(a!) out) -> ()"
)


def _check_stats(values, channels: int, name: str, op: str) -> None:
    if values is None:
        return
    ok = isinstance(values, (list, tuple)) and len(values) in (1, channels)
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if ok and name == "std":
        ok = all(v != 0 for v in values)
    if not ok:
        what = "non-zero finite" if name == "std" else "finite"
        raise ValueError(
            f"{op}: {name} must be None or {channels} (or 1) {what} numbers, one per channel, got {values!r}"
        )


def _check(
    images: Tensor,
    perm: Tensor | None,
    patch_size: int,
    mean=None,
    std=None,
    dtype: torch.dtype = torch.float32,
    op: str = OP,
) -> int:
    """Shape, dtype and device checks (no data reads, so fake tensors pass through). Returns N."""
    n = check_tile_key(images, perm, patch_size, op)
    C = images.shape[1]
    _check_stats(mean, C, "mean", op)
    _check_stats(std, C, "std", op)
    if dtype not in TOKEN_DTYPES:
        raise TypeError(f"{op}: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    return n


def _empty_tokens(images: Tensor, n: int, patch_size: int, dtype: torch.dtype) -> Tensor:
    B, C = images.shape[:2]
    return images.new_empty((B, n, C * patch_size * patch_size), dtype=dtype)


@torch.library.register_fake("ppml::patch_tokens")
def _fake(images, perm, patch_size, mean, std, dtype):
    n = _check(images, perm, patch_size, mean, std, dtype)
    return _empty_tokens(images, n, patch_size, dtype)


def _check_out(images: Tensor, out, n: int, patch_size: int, dtype: torch.dtype, op: str = OP) -> None:
    """`out` for the tokens (twin of csrc/common/patch_tokens.h::check_tokens_out)."""
    B, C = images.shape[:2]
    shape = [B, n, C * patch_size * patch_size]
    if (
        not isinstance(out, Tensor)
        or list(out.shape) != shape
        or out.dtype != dtype
        or out.device != images.device
        or not out.is_contiguous()
    ):
        name = describe(torch.empty(0, dtype=dtype)).split(" ")[0]
        got = describe(out) + ("" if not isinstance(out, Tensor) or out.is_contiguous() else " (not contiguous)")
        raise ValueError(f"{op}: out must be contiguous {name} {shape} on {images.device}, got {got}")
    real = out.numel() and out.device.type != "meta" and not is_fake(out)
    if real and out.untyped_storage().data_ptr() == images.untyped_storage().data_ptr():
        raise ValueError(f"{op}: out must not share memory with images")


@torch.library.register_fake("ppml::patch_tokens.out")
def _fake_out(images, perm, patch_size, mean, std, dtype, *, out) -> None:
    n = _check(images, perm, patch_size, mean, std, dtype)
    _check_out(images, out, n, patch_size, dtype)


def _setup_context(ctx, inputs, output) -> None:
    images, perm, patch_size, _, std, _ = inputs
    ctx.save_for_backward(perm)
    ctx.patch_size, ctx.std = patch_size, std
    ctx.shape, ctx.images_dtype = tuple(images.shape), images.dtype


def _backward(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    # A gather of tiles then a per-channel affine map: the adjoint is the inverse gather, times 1/std.
    _, C, H, W = ctx.shape
    g = untoken(grad.to(accumulate_dtype(ctx.images_dtype, grad.dtype)), ctx.patch_size, H, W, perm)
    if ctx.std is not None:
        g = g / torch.tensor(list(ctx.std), dtype=g.dtype, device=g.device).view(1, -1, 1, 1)
    return g.to(ctx.images_dtype), None, None, None, None, None


torch.library.register_autograd("ppml::patch_tokens", _backward, setup_context=_setup_context)


@fallback_kernel("patch_tokens")
def _reference_kernel(images, perm, patch_size, mean, std, dtype):
    """The reference as a kernel: same checks and output as the C++ kernels."""
    n = _check(images, perm, patch_size, mean, std, dtype)
    if perm is not None:
        check_perm_rows(perm, OP)
    out = _empty_tokens(images, n, patch_size, dtype)
    out.copy_(_reference_tokens(images, patch_size, perm, mean, std, dtype))
    return out


@fallback_kernel("patch_tokens.out")
def _reference_kernel_out(images, perm, patch_size, mean, std, dtype, *, out) -> None:
    n = _check(images, perm, patch_size, mean, std, dtype)
    _check_out(images, out, n, patch_size, dtype)
    if perm is not None:
        check_perm_rows(perm, OP)
    out.copy_(_reference_tokens(images, patch_size, perm, mean, std, dtype))


# ---- Triton twin -------------------------------------------------------------------------------------------------

_TRITON_OP = "ppml.patch_tokens_triton"


@torch.library.custom_op("ppml::patch_tokens_triton", mutates_args=())
def patch_tokens_triton(
    images: Tensor,
    perm: Tensor | None,
    patch_size: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dtype: torch.dtype,
) -> Tensor:
    """Triton kernel of :func:`patch_tokens` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(images, perm, patch_size, mean, std, dtype, op=_TRITON_OP)
    if perm is not None:
        check_perm_rows(perm, _TRITON_OP)
    from ppml.kernels.patch_tokens import patch_tokens_triton as launch

    return launch(images, perm, patch_size, mean, std, dtype, accumulate_dtype(images.dtype, dtype))


@patch_tokens_triton.register_fake
def _fake_triton(images, perm, patch_size, mean, std, dtype):
    n = _check(images, perm, patch_size, mean, std, dtype, op=_TRITON_OP)
    return _empty_tokens(images, n, patch_size, dtype)


patch_tokens_triton.register_autograd(_backward, setup_context=_setup_context)


def _reference_backend(images, perm, patch_size, mean, std, dtype):
    if perm is not None and not torch.compiler.is_compiling():
        check_perm_rows(perm, OP)
    return _reference_tokens(images, patch_size, perm, mean, std, dtype)


_dispatch.register(
    "patch_tokens",
    native=torch.ops.ppml.patch_tokens,
    triton=torch.ops.ppml.patch_tokens_triton,
    reference=_reference_backend,
)


# ---- public API --------------------------------------------------------------------------------------------------


def _as_stats(values, name: str):
    """Per-channel statistics as a list of floats (the schema's float[]), from any sequence or a 1-D tensor."""
    if values is None:
        return None
    if isinstance(values, Tensor):
        if values.dim() > 1:
            raise ValueError(f"{OP}: {name} must be None or one number per channel, got {describe(values)}")
        return [float(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return [float(values)]
    if isinstance(values, (list, tuple)):
        return [float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v for v in values]
    raise ValueError(f"{OP}: {name} must be None or one number per channel, got {type(values).__name__} {values!r}")


def patch_tokens(
    images: Tensor,
    patch_size: int = 16,
    perm: Tensor | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """A ViT's input tokens straight from (uint8) images: cast, normalise, cut into patches and RS-shuffle, in one pass.

    ``tokens[b, i, c·p·p + y·p + x] = (images[b, c, tile perm[b, i] at (y, x)] / 255 − mean[c]) / std[c]`` for uint8
    images, without the ``/ 255`` for float ones; tiles numbered row-major as in :func:`ppml.shuffle_patches`, so
    ``patch_tokens(x, p, perm)`` are the tokens of ``shuffle_patches(x, p, perm)``. A token is channel-major, the
    order in which timm's patch-embedding conv weight ``[D, C, p, p]`` flattens: ``tokens @ W.view(D, -1).T + bias``
    equals the conv (see ``PEFreeViT``, which takes these tokens directly).

    Every backend computes each step (``/ 255``, ``− mean``, ``/ std``) as one correctly rounded operation in float32
    (float64 when the images or ``dtype`` are float64) and rounds once to ``dtype``, so all backends agree with the
    reference bit for bit.

    Args:
        images (Tensor[B, C, H, W]): uint8, float16, bfloat16, float32 or float64; contiguous, channels_last or any
            strides; p divides H and W.
        patch_size: p.
        perm (Tensor[B, N] int64, optional): RS keys (a permutation of 0..N-1 per image, N = (H/p)·(W/p)); None keeps
            the tiles in order (the images may already be ciphertext).
        mean, std: per-channel statistics (C values, or 1 for all channels; a sequence or 1-D tensor), or None for no
            shift / no scaling. uint8 images are always scaled to [0, 1] first.
        dtype: float32 (default), float64, float16 or bfloat16.
        backend: ``None``/``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` (default: ``PPML_BACKEND``).
        out (Tensor[B, N, C·p·p], optional): a preallocated contiguous result of ``dtype`` (not overlapping
            ``images``); saves an allocation and its page faults per call. Not differentiable.

    Returns:
        Tensor[B, N, C·p·p] of ``dtype``, contiguous (``out`` when given). Differentiable in float ``images`` (the
        gradient is the inverse gather of the tokens' gradient, divided by std).
    """
    mean, std = _as_stats(mean, "mean"), _as_stats(std, "std")
    n = _check(images, perm, patch_size, mean, std, dtype)
    name, fn = _dispatch.choose("patch_tokens", images.device, backend)
    if out is None:
        return fn(images, perm, patch_size, mean, std, dtype)
    if name == "native":
        torch.ops.ppml.patch_tokens.out(images, perm, patch_size, mean, std, dtype, out=out)
        return out
    _check_out(images, out, n, patch_size, dtype)
    return out.copy_(fn(images, perm, patch_size, mean, std, dtype))


class PatchTokens(nn.Module):
    """:func:`patch_tokens` as a module: ``PatchTokens(16, mean=..., std=...)(images)`` → ``[B, N, C·p·p]``.

    With ``shuffle=True`` each call draws fresh RS keys (OS entropy, or ``generator``) and returns ``(tokens, perm)``
    when ``return_perm``; otherwise the tiles stay in order.
    """

    def __init__(
        self,
        patch_size: int = 16,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
        shuffle: bool = False,
        return_perm: bool = False,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(patch_size, "ppml.PatchTokens", "patch_size")
        self.patch_size = patch_size
        self.mean, self.std = _as_stats(mean, "mean"), _as_stats(std, "std")
        self.dtype, self.shuffle, self.return_perm = dtype, shuffle, return_perm
        self.backend, self.generator = backend, generator

    def forward(self, images: Tensor):
        perm = None
        if self.shuffle:
            n = _check(images, None, self.patch_size, op="ppml.PatchTokens")
            perm = random_permutations(images.shape[0], n, device=images.device, generator=self.generator)
        tokens = patch_tokens(
            images, self.patch_size, perm, mean=self.mean, std=self.std, dtype=self.dtype, backend=self.backend
        )
        return (tokens, perm) if self.return_perm else tokens

    def extra_repr(self) -> str:
        stats = f"mean={self.mean}, std={self.std}"
        return f"patch_size={self.patch_size}, {stats}, dtype={self.dtype}, shuffle={self.shuffle}"
