"""RS encryption: ``ppml::shuffle_patches`` and its Triton twin — schema, checks, fake, autograd, public API."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from .. import _dispatch
from ..keys import invert_permutations, random_permutations
from ..reference import shuffle_patches as _reference_shuffle
from ._common import (
    autograd_fallback,
    check_perm_rows,
    check_positive_int,
    check_tile_key,
    describe,
    empty_output,
    fallback_kernel,
    lib,
)
from ._transform import as_batch

OP = "ppml.shuffle_patches"

lib.define("shuffle_patches(Tensor images, Tensor perm, int patch_size) -> Tensor")
# Writes into a preallocated tensor (contiguous or channels_last; the kernel works in out's layout): a pipeline that
# encrypts batch after batch reuses one buffer instead of paying fresh-page faults on every call. Not differentiable.
# It returns nothing: torch.compile cannot functionalise a custom op whose output aliases an input.
lib.define("shuffle_patches.out(Tensor images, Tensor perm, int patch_size, *, Tensor(a!) out) -> ()")


def _check(images: Tensor, perm: Tensor | None, patch_size: int, op: str = OP) -> int:
    """Shape, dtype and device checks (no data reads, so fake tensors pass through). Returns N."""
    return check_tile_key(images, perm, patch_size, op)


@torch.library.register_fake("ppml::shuffle_patches")
def _fake(images: Tensor, perm: Tensor, patch_size: int) -> Tensor:
    _check(images, perm, patch_size)
    return empty_output(images, images.shape)


def _check_out(images: Tensor, out: Tensor, op: str = OP) -> None:
    """`out` for an op whose result has the images' shape and dtype (twin of csrc/common/checks.h::check_out)."""
    if (
        not isinstance(out, Tensor)
        or out.shape != images.shape
        or out.dtype != images.dtype
        or out.device != images.device
    ):
        expected = f"{describe(images).split(' ')[0]} {list(images.shape)} on {images.device}"
        raise ValueError(f"{op}: out must be {expected}, got {describe(out)}")
    if not (out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"{op}: out must be contiguous or channels_last, got strides {list(out.stride())}")
    # (fake tensors have no data pointers to compare: the real kernel checks again)
    real = out.numel() and out.device.type != "meta" and not is_fake(out)
    if real and out.untyped_storage().data_ptr() == images.untyped_storage().data_ptr():
        raise ValueError(f"{op}: out must not share memory with images")


@torch.library.register_fake("ppml::shuffle_patches.out")
def _fake_out(images: Tensor, perm: Tensor, patch_size: int, *, out: Tensor) -> None:
    _check(images, perm, patch_size)
    _check_out(images, out)


def _setup_context(ctx, inputs, output) -> None:
    _, perm, patch_size = inputs
    ctx.save_for_backward(perm)
    ctx.patch_size = patch_size


def _backward(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    # Shuffling is a permutation of tiles, so its adjoint is the same op with the inverse permutation.
    return torch.ops.ppml.shuffle_patches(grad, invert_permutations(perm), ctx.patch_size), None, None


# ppml._C registers this op's autograd in C++ (csrc/autograd/shuffle_patches.cpp, the same backward: no Python in
# front of every call); this one is registered only when _C is not there.
autograd_fallback("shuffle_patches", _backward, _setup_context)


@fallback_kernel("shuffle_patches")
def _reference_kernel(images: Tensor, perm: Tensor, patch_size: int) -> Tensor:
    """The reference as a kernel: same checks and output layout as the C++ kernels."""
    _check(images, perm, patch_size)
    check_perm_rows(perm, OP)
    out = empty_output(images, images.shape)
    out.copy_(_reference_shuffle(images, perm, patch_size))
    return out


@fallback_kernel("shuffle_patches.out")
def _reference_kernel_out(images: Tensor, perm: Tensor, patch_size: int, *, out: Tensor) -> None:
    _check(images, perm, patch_size)
    _check_out(images, out)
    check_perm_rows(perm, OP)
    out.copy_(_reference_shuffle(images, perm, patch_size))


# ---- Triton twin -------------------------------------------------------------------------------------------------


@torch.library.custom_op("ppml::shuffle_patches_triton", mutates_args=())
def shuffle_patches_triton(images: Tensor, perm: Tensor, patch_size: int) -> Tensor:
    """Triton kernel of :func:`shuffle_patches` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    n = _check(images, perm, patch_size, op="ppml.shuffle_patches_triton")
    from ppml.kernels.shuffle_patches import MAX_CHECKED_TILES
    from ppml.kernels.shuffle_patches import shuffle_patches_triton as launch

    # On a GPU the kernel checks the keys itself (a device-side assert; one launch, no host round trip). The
    # interpreter (CPU tensors) drops device asserts, and keys past MAX_CHECKED_TILES are too long for the kernel's
    # check: there, the check here (an error at once on CPU, queued device-side asserts on a GPU).
    if not perm.is_cuda or n > MAX_CHECKED_TILES:
        check_perm_rows(perm, "ppml.shuffle_patches_triton")
    return launch(images, perm, patch_size)


@shuffle_patches_triton.register_fake
def _fake_triton(images: Tensor, perm: Tensor, patch_size: int) -> Tensor:
    _check(images, perm, patch_size, op="ppml.shuffle_patches_triton")
    return empty_output(images, images.shape)


def _backward_triton(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    return torch.ops.ppml.shuffle_patches_triton(grad, invert_permutations(perm), ctx.patch_size), None, None


shuffle_patches_triton.register_autograd(_backward_triton, setup_context=_setup_context)


def _reference_backend(images: Tensor, perm: Tensor, patch_size: int) -> Tensor:
    if not torch.compiler.is_compiling():
        check_perm_rows(perm, OP)
    return _reference_shuffle(images, perm, patch_size)


_dispatch.register(
    "shuffle_patches",
    native=torch.ops.ppml.shuffle_patches,
    triton=torch.ops.ppml.shuffle_patches_triton,
    reference=_reference_backend,
)


# ---- public API --------------------------------------------------------------------------------------------------


def shuffle_patches(
    images: Tensor,
    patch_size: int = 16,
    perm: Tensor | None = None,
    *,
    backend: str | None = None,
    generator: torch.Generator | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """RS encryption: shuffle the p×p patches of each image with its own permutation.

    Args:
        images (Tensor[B, C, H, W]): uint8, float16, bfloat16, float32 or float64, any strides; p divides H and W.
        patch_size: p (the paper uses 16).
        perm (Tensor[B, N] int64, optional): the keys, N = (H/p)·(W/p); a fresh one per image from OS entropy
            (or from ``generator``) when omitted.
        backend: ``None``/``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` (default: ``PPML_BACKEND``).
        generator: seeds the permutations when ``perm`` is omitted (reproducible, not secret).
        out (Tensor[B, C, H, W], optional): preallocated result (contiguous or channels_last, not overlapping
            ``images``); saves an allocation per call. Not differentiable.

    Returns:
        ``(encrypted, perm)``: ``encrypted[b, :, tile i] = images[b, :, tile perm[b, i]]`` (tiles row-major), same
        shape and dtype, channels_last kept; keep ``perm`` to decrypt. Differentiable in ``images``.
    """
    n = _check(images, perm, patch_size)
    if perm is None:
        perm = random_permutations(images.shape[0], n, device=images.device, generator=generator)
    name, fn = _dispatch.choose("shuffle_patches", images.device, backend)
    if out is None:
        return fn(images, perm, patch_size), perm
    if name == "native":
        torch.ops.ppml.shuffle_patches.out(images, perm, patch_size, out=out)
        return out, perm
    _check_out(images, out)
    return out.copy_(fn(images, perm, patch_size)), perm


def unshuffle_patches(
    encrypted: Tensor, perm: Tensor, patch_size: int = 16, *, backend: str | None = None
) -> Tensor:
    """Decrypts :func:`shuffle_patches`: ``unshuffle_patches(shuffle_patches(x, p, perm)[0], perm, p) == x``.

    Args:
        encrypted (Tensor[B, C, H, W]): RS ciphertext.
        perm (Tensor[B, N] int64): the permutations used to encrypt.
        patch_size: p.
        backend: as in :func:`shuffle_patches`.

    Returns:
        Tensor[B, C, H, W], the plain images. Differentiable in ``encrypted``.
    """
    _check(encrypted, perm, patch_size, op="ppml.unshuffle_patches")
    if not torch.compiler.is_compiling():
        check_perm_rows(perm, "ppml.unshuffle_patches")
    _, fn = _dispatch.choose("shuffle_patches", encrypted.device, backend)
    return fn(encrypted, invert_permutations(perm), patch_size)


class PatchShuffle(nn.Module):
    """RS encryption as a module or a DataLoader transform.

    Takes what torchvision v2 transforms take — ``Tensor[B, C, H, W]``, one image ``Tensor[C, H, W]`` (uint8 or float),
    a ``torchvision.tv_tensors.Image`` or a PIL image — and returns the encrypted image of the same kind and shape (PIL
    in: PIL of the same mode out), with fresh OS-entropy keys on every call (or keys from ``generator``). With
    ``return_perm=True`` it returns ``(encrypted, perm)`` so the data owner can keep the keys.
    """

    def __init__(
        self,
        patch_size: int = 16,
        *,
        return_perm: bool = False,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(patch_size, "ppml.PatchShuffle", "patch_size")
        self.patch_size = patch_size
        self.return_perm = return_perm
        self.backend = backend
        self.generator = generator

    def forward(self, images):
        batch, restore, single = as_batch(images, "ppml.PatchShuffle")
        out, perm = shuffle_patches(batch, self.patch_size, backend=self.backend, generator=self.generator)
        out = restore(out)
        if single:
            perm = perm.squeeze(0)
        return (out, perm) if self.return_perm else out

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"

