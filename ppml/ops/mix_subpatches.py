"""MI encryption: ``ppml::mix_subpatches`` and its Triton twin — schema, checks, fake, autograd, public API."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _dispatch
from ..reference import mix_subpatches as _reference_mix
from ..reference.mix_subpatches import accumulation_dtype, output_dtype
from ._common import check_images, check_positive_int, describe, empty_output, fallback_kernel, lib
from ._transform import as_batch

OP = "ppml.mix_subpatches"

lib.define("mix_subpatches(Tensor images, int patch_size, int grid, Tensor? weights) -> Tensor")

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(images: Tensor, patch_size: int, grid: int, weights: Tensor | None, op: str = OP) -> int:
    """Shape, dtype and device checks (no data reads, so fake tensors pass). Returns N = (H/p)·(W/p)."""
    check_images(images, op)
    check_positive_int(patch_size, op, "patch_size")
    check_positive_int(grid, op, "grid")
    if patch_size % grid:
        raise ValueError(f"{op}: grid must divide patch_size, got grid={grid} for patch_size={patch_size}")
    B, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"{op}: patch_size must divide H and W, got patch_size={patch_size} for H={H}, W={W}")
    n = (H // patch_size) * (W // patch_size)
    if weights is not None:
        gg = grid * grid
        if not isinstance(weights, Tensor) or weights.dtype not in _WEIGHT_DTYPES or weights.shape != (B, n, gg):
            raise ValueError(
                f"{op}: weights must be float [B, N, g*g] with B={B}, N=(H/p)*(W/p)={n}, g*g={gg}, "
                f"got {describe(weights)}"
            )
        if weights.device != images.device:
            raise ValueError(f"{op}: weights must be on the images' device {images.device}, got {describe(weights)}")
    return n


def _fake_out(images: Tensor, grid: int) -> Tensor:
    B, C, H, W = images.shape
    return empty_output(images, (B, C, H // grid, W // grid), dtype=output_dtype(images.dtype))


@torch.library.register_fake("ppml::mix_subpatches")
def _fake(images: Tensor, patch_size: int, grid: int, weights: Tensor | None) -> Tensor:
    _check(images, patch_size, grid, weights)
    return _fake_out(images, grid)


# ---- autograd (shared by the native op and the Triton twin) -------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    images, patch_size, grid, weights = inputs
    ctx.patch_size, ctx.grid = patch_size, grid
    ctx.images_dtype = images.dtype
    ctx.has_weights = weights is not None
    # The weight gradient needs the images; the image gradient needs only the weights.
    need_images = weights is not None and weights.requires_grad
    ctx.save_for_backward(images if need_images else None, weights)


def _backward(ctx, grad: Tensor):
    images, weights = ctx.saved_tensors
    p, g = ctx.patch_size, ctx.grid
    q = p // g
    B, C, Hg, Wg = grad.shape
    th, tw = Hg // q, Wg // q
    acc_t = accumulation_dtype(ctx.images_dtype)
    go = grad.to(acc_t).reshape(B, C, th, 1, q, tw, 1, q)
    grad_images = grad_weights = None
    if ctx.needs_input_grad[0]:
        # Each sub-patch pixel receives its weight times the gradient of the output pixel it was mixed into.
        if weights is None:
            gi = go.expand(B, C, th, g, q, tw, g, q) * (1.0 / (g * g))
        else:
            w = weights.to(acc_t).reshape(B, th, tw, g, g).permute(0, 1, 3, 2, 4)
            gi = go * w.reshape(B, 1, th, g, 1, tw, g, 1)
        # .contiguous(): traced, the reshape becomes a view, which the broadcast product's strides need not allow.
        grad_images = gi.contiguous().reshape(B, C, Hg * g, Wg * g).to(ctx.images_dtype)
    if ctx.has_weights and ctx.needs_input_grad[3]:
        x = images.to(acc_t).reshape(B, C, th, g, q, tw, g, q)
        gw = torch.einsum("bcaiudjv,bcaudv->badij", x, go.reshape(B, C, th, q, tw, q))
        grad_weights = gw.reshape(B, th * tw, g * g).to(weights.dtype)
    return grad_images, None, None, grad_weights


torch.library.register_autograd("ppml::mix_subpatches", _backward, setup_context=_setup_context)


@fallback_kernel("mix_subpatches")
def _reference_kernel(images: Tensor, patch_size: int, grid: int, weights: Tensor | None) -> Tensor:
    """The reference as a kernel: same checks and output layout as the C++ kernels."""
    _check(images, patch_size, grid, weights)
    out = _fake_out(images, grid)
    out.copy_(_reference_mix(images, patch_size, grid, weights))
    return out


# ---- Triton twin -------------------------------------------------------------------------------------------------


@torch.library.custom_op("ppml::mix_subpatches_triton", mutates_args=())
def mix_subpatches_triton(images: Tensor, patch_size: int, grid: int, weights: Tensor | None) -> Tensor:
    """Triton kernel of :func:`mix_subpatches` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    _check(images, patch_size, grid, weights, op="ppml.mix_subpatches_triton")
    from ppml.kernels.mix_subpatches import mix_subpatches_triton as launch

    return launch(images, patch_size, grid, weights)


@mix_subpatches_triton.register_fake
def _fake_triton(images: Tensor, patch_size: int, grid: int, weights: Tensor | None) -> Tensor:
    _check(images, patch_size, grid, weights, op="ppml.mix_subpatches_triton")
    return _fake_out(images, grid)


mix_subpatches_triton.register_autograd(_backward, setup_context=_setup_context)

_dispatch.register(
    "mix_subpatches",
    native=torch.ops.ppml.mix_subpatches,
    triton=torch.ops.ppml.mix_subpatches_triton,
    reference=_reference_mix,
)


# ---- public API --------------------------------------------------------------------------------------------------


def mix_subpatches(
    images: Tensor,
    patch_size: int = 16,
    grid: int = 2,
    weights: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """MI encryption: replace each p×p patch by the (weighted) mix of its g×g sub-patches.

    Args:
        images (Tensor[B, C, H, W]): uint8, float16, bfloat16, float32 or float64, any strides; p divides H and W.
        patch_size: p (the paper: 16).
        grid: g, dividing p (the paper: 2); each sub-patch is (p/g)×(p/g).
        weights (Tensor[B, N, g*g], optional): per-patch mixing weights, row-major over the sub-patch grid
            (N = (H/p)·(W/p)); ``None`` is the plain mean. See :func:`random_mixing_weights` for keyed weights.
        backend: ``None``/``"auto"``, ``"native"``, ``"triton"`` or ``"reference"`` (default: ``PPML_BACKEND``).

    Returns:
        Tensor[B, C, H/g, W/g]: float32 for uint8 images, else the images' dtype (accumulated in float32, float64 for
        float64). Differentiable in ``images`` and ``weights``.
    """
    _check(images, patch_size, grid, weights)
    _, fn = _dispatch.choose("mix_subpatches", images.device, backend)
    return fn(images, patch_size, grid, weights)


def random_mixing_weights(
    batch: int,
    num_patches: int,
    grid: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keyed MI weights: per image and patch, g² non-negative weights summing to 1 (uniform on the simplex).

    OS entropy (os.urandom) unless a seeded ``generator`` is given, like :func:`ppml.random_permutations`.

    Returns:
        Tensor[B, N, g*g] of ``dtype``.
    """
    from ..keys import random_simplex

    check_positive_int(grid, "ppml.random_mixing_weights", "grid")
    return random_simplex(batch, num_patches, grid * grid, device=device, dtype=dtype, generator=generator)


class SubpatchMix(nn.Module):
    """MI encryption as a module or a DataLoader transform: ``[B, C, H, W]`` or one ``[C, H, W]`` image in,
    ``[..., H/g, W/g]`` out; a ``torchvision.tv_tensors.Image`` or a PIL image in, the same kind out (PIL: same mode,
    the mean rounded half to even for integer pixels; palette and 1-bit images are refused — convert first).
    ``keyed=True`` draws fresh random weights per image and patch (from OS entropy, or ``generator``) instead of the
    paper's plain mean; ``return_weights=True`` also returns them."""

    def __init__(
        self,
        patch_size: int = 16,
        grid: int = 2,
        *,
        keyed: bool = False,
        return_weights: bool = False,
        backend: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(patch_size, "ppml.SubpatchMix", "patch_size")
        check_positive_int(grid, "ppml.SubpatchMix", "grid")
        if patch_size % grid:
            raise ValueError(
                f"ppml.SubpatchMix: grid must divide patch_size, got grid={grid} for patch_size={patch_size}"
            )
        self.patch_size, self.grid = patch_size, grid
        self.keyed, self.return_weights = keyed, return_weights
        self.backend, self.generator = backend, generator

    def forward(self, images):
        batch, restore, single = as_batch(images, "ppml.SubpatchMix", averages=True)
        weights = None
        if self.keyed:
            B, _, H, W = batch.shape
            n = (H // self.patch_size) * (W // self.patch_size)
            weights = random_mixing_weights(B, n, self.grid, device=batch.device, generator=self.generator)
        out = mix_subpatches(batch, self.patch_size, self.grid, weights, backend=self.backend)
        out = restore(out)
        if single and weights is not None:
            weights = weights.squeeze(0)
        return (out, weights) if self.return_weights else out

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, grid={self.grid}, keyed={self.keyed}"
