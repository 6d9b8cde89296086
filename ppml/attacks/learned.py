"""A learned attack on RS: a transformer that predicts, from the shuffled patches alone, where each patch came from.

Threat model: the attacker sees ``encrypted = shuffle_patches(x, p, perm)`` and knows p (hence the grid), but not the
key. Public images (never the images attacked) give unlimited training pairs: crop, encrypt with a random key,
and ask for the key back.

The model (:class:`PositionAttacker`) is ppml's own PE-free ViT (``pevit_*``, timm, no position embedding — the token
positions are the secret) followed by a per-token head: for every ciphertext tile i a distribution over the N grid
cells, ``log_probs[b, i, j] = log P(tile i came from cell j)``. The default head is *factorised*: row and column
logits (R + C outputs instead of R·C), summed as log-probabilities; ``head="full"`` is the plain N-way classifier.
Being permutation-equivariant, the model's prediction for a tile does not depend on where the key put it, so one key
per image is as good an evaluation as many.

Decoding: :func:`assign_positions` turns the log-probabilities into a permutation with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``, maximising the summed log-probability), so the answer is a valid key in
the convention of :func:`ppml.attacks.solve_jigsaw`: ``perm_hat[b, i]`` is the cell given to ciphertext tile i, and
``ppml.unshuffle_patches(encrypted, perm_hat, p)`` is the reconstruction.

Training (:func:`train_position_attacker`) draws crops of public images (:func:`ppml.attacks.sample_crops`),
encrypts them with random keys and asks for the keys back; the corpus, the settings shared with the MI decoder and
the resumable, cacheable training loop are :mod:`ppml.attacks.kit`'s.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int, describe
from ..ops.shuffle_patches import shuffle_patches
from .kit import (
    HELD_OUT,
    PUBLIC_PHOTOS,
    TrainSettings,
    cache_dir,
    fit,
    load_photo,
    load_trained,
    public_images,
    sample_crops,
    standardize,
)

HEADS = ("factorized", "full")
# The training budgets `ppml attack` and benchmarks/attack_learned.py use, per patch size (one cache entry each): what
# two shared CPU cores train in about 1-2.5 minutes per patch size. Attention over N = 784 tokens makes p = 8 the
# dearest per image, hence its smaller model and budget.
ATTACKER_SETTINGS: dict[int, dict[str, Any]] = {
    32: dict(steps=400, batch_size=32, dim=128, depth=4, heads=4, lr=2e-3),
    16: dict(steps=300, batch_size=16, dim=128, depth=4, heads=4, lr=2e-3),
    8: dict(steps=100, batch_size=8, dim=96, depth=3, heads=3, lr=2e-3),
}


def attacker_settings(patch_size: int) -> dict[str, Any]:
    """The :data:`ATTACKER_SETTINGS` entry for ``patch_size`` (that of the nearest listed patch size otherwise)."""
    nearest = min(ATTACKER_SETTINGS, key=lambda q: (abs(q - patch_size), q))
    return dict(ATTACKER_SETTINGS[nearest])


# ---- the position attacker ------------------------------------------------------------------------------------------


class PositionAttacker(nn.Module):
    """A PE-free ViT over the ciphertext tiles with a per-tile position head.

    Args:
        patch_size: p of the RS encryption attacked.
        img_size: side of the (square) images attacked; p divides it; grid R = C = img_size / p.
        tile: the ViT's patch size; the ciphertext is average-pooled by p / tile first (pooling by a divisor of p
            commutes with shuffling p×p patches, so the tokens are still exactly the shuffled tiles). Divides p.
        dim, depth, heads: the ViT's width, number of blocks and attention heads.
        head: ``"factorized"`` (row + column logits) or ``"full"`` (N logits).

    Shapes:
        input (Tensor[B, C, img_size, img_size]): RS ciphertext (C = 1 or 3), uint8 or float, any range.
        output: Tensor[B, N, N] float32 log-probabilities, ``out[b, i, j] = log P(tile i came from cell j)``; each
        row sums to 1 in probability. Differentiable.
    """

    def __init__(self, patch_size: int, img_size: int, *, tile: int, dim: int, depth: int, heads: int,
                 head: str = "factorized") -> None:  # fmt: skip
        super().__init__()
        from ..models.vit import create_model

        self.patch_size, self.img_size, self.tile, self.head_kind = patch_size, img_size, tile, head
        self.pool = patch_size // tile
        self.rows = self.cols = img_size // patch_size
        n = self.rows * self.cols
        self.vit = create_model(
            "pevit_tiny_patch16_224",
            img_size=img_size // self.pool,
            patch_size=tile,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            num_classes=0,
            rpe=False,
        )
        self.head = nn.Linear(dim, self.rows + self.cols if head == "factorized" else n)

    def _scores(self, encrypted: Tensor) -> Tensor:
        """The head's raw output ``Tensor[B, N, R + C]`` (factorised) or ``Tensor[B, N, N]`` (full)."""
        x = encrypted.expand(-1, 3, -1, -1) if encrypted.shape[1] == 1 else encrypted
        x, _, _ = standardize(x)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens :]  # [B, N, D]
        return self.head(tokens)

    def forward(self, encrypted: Tensor) -> Tensor:
        out = self._scores(encrypted)
        if self.head_kind == "full":
            return out.log_softmax(-1)
        r = out[..., : self.rows].log_softmax(-1)  # [B, N, R]
        c = out[..., self.rows :].log_softmax(-1)  # [B, N, C]
        return (r[..., :, None] + c[..., None, :]).flatten(2)  # cell j = row·C + col

    def loss(self, encrypted: Tensor, perm: Tensor) -> Tensor:
        """Mean negative log-probability of every tile's true cell (``perm[b, i]``, Tensor[B, N] int64): the same
        number as ``F.nll_loss(self(encrypted).flatten(0, 1), perm.flatten())``, without the [B, N, N] tensor for the
        factorised head (row and column cross-entropies)."""
        out = self._scores(encrypted)
        if self.head_kind == "full":
            return F.cross_entropy(out.flatten(0, 1), perm.flatten())
        target = perm.flatten()
        row = F.cross_entropy(out[..., : self.rows].flatten(0, 1), target // self.cols)
        col = F.cross_entropy(out[..., self.rows :].flatten(0, 1), target % self.cols)
        return row + col


def _build_attacker(cfg: dict) -> PositionAttacker:
    return PositionAttacker(cfg["patch_size"], cfg["img_size"], tile=cfg["tile"], dim=cfg["dim"], depth=cfg["depth"],
                            heads=cfg["heads"], head=cfg["head"])  # fmt: skip


# The defaults of the settings each learned attack chooses for itself (the others are TrainSettings').
_DEFAULTS = dict(steps=300, batch_size=32, lr=1e-3, weight_decay=0.05, digits_fraction=0.25)


def train_position_attacker(
    patch_size: int,
    img_size: int = 224,
    *,
    tile: int | None = None,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    head: str = "factorized",
    **settings: Any,
) -> PositionAttacker:
    """Trains a :class:`PositionAttacker` on public images encrypted with random RS keys (CPU).

    Each step draws ``batch_size`` crops (:func:`sample_crops`), shuffles their p×p patches with fresh keys and
    minimises the mean negative log-probability of every tile's true cell. AdamW (weight decay on matrices only),
    linear warm-up over 5 % of the steps then cosine decay, gradient norm clipped at 1.

    Args:
        patch_size: p (>= 1, dividing ``img_size``).
        img_size: side of the square images to attack; the grid is (img_size/p)² cells.
        tile: the ViT's patch size (the ciphertext is average-pooled by p / tile); default ``min(p, 8)``.
        dim, depth, heads: ViT width (divisible by heads), blocks, attention heads.
        head: ``"factorized"`` (default) or ``"full"``, see :class:`PositionAttacker`.
        **settings: the fields of :class:`ppml.attacks.kit.TrainSettings`, which the MI decoder shares: steps (default
            300), batch_size (32), lr (1e-3), weight_decay (0.05), digits_fraction (0.25), data ("public"),
            seed (0), checkpoint (None; a path or "auto"), checkpoint_every (50), stop_after, progress (True),
            threads, on_train.

    Returns:
        The model in eval mode; ``model.train_info`` holds the steps done (in all, and in this call: 0 when a
        complete checkpoint was loaded), training seconds (summed over resumptions), the mean loss of the last 20
        steps, whether training is complete, and the checkpoint path.
    """
    op = "ppml.attacks.train_position_attacker"
    run = TrainSettings.from_kwargs(op, settings, **_DEFAULTS)
    check_positive_int(patch_size, op, "patch_size")
    check_positive_int(img_size, op, "img_size")
    if img_size % patch_size:
        raise ValueError(f"{op}: patch_size must divide img_size, got patch_size={patch_size}, img_size={img_size}")
    if img_size // patch_size < 2:
        raise ValueError(f"{op}: the grid img_size/patch_size must be >= 2 cells a side, got {img_size}/{patch_size}")
    tile = min(patch_size, 8) if tile is None else tile
    check_positive_int(tile, op, "tile")
    if patch_size % tile:
        raise ValueError(f"{op}: tile must divide patch_size, got tile={tile}, patch_size={patch_size}")
    for name, v in (("dim", dim), ("depth", depth), ("heads", heads)):
        check_positive_int(v, op, name)
    if dim % heads:
        raise ValueError(f"{op}: dim must be divisible by heads, got dim={dim}, heads={heads}")
    if head not in HEADS:
        raise ValueError(f"{op}: head must be one of {HEADS}, got {head!r}")
    run.check(op)
    model_config = dict(patch_size=patch_size, img_size=img_size, tile=tile, dim=dim, depth=depth, heads=heads,
                        head=head)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        return shuffle_patches(run.crops(img_size, gen), patch_size, generator=gen)

    return fit(op=op, kind="position_attacker", stem=f"rs-attacker-p{patch_size}-{img_size}",
               model_config=model_config, settings=run, build=_build_attacker, make_batch=make_batch,
               loss_fn=PositionAttacker.loss)  # fmt: skip


def load_position_attacker(path: str | os.PathLike) -> PositionAttacker:
    """Loads a :class:`PositionAttacker` from a checkpoint written by :func:`train_position_attacker` (complete or
    not), in eval mode, with ``train_info``."""
    return load_trained(path, "position_attacker", _build_attacker, "ppml.attacks.load_position_attacker")


def _check_ciphertext(model: PositionAttacker, encrypted, patch_size, op: str) -> tuple[Tensor, bool]:
    if not isinstance(model, PositionAttacker):
        raise ValueError(f"{op}: model must be a ppml.attacks.PositionAttacker, got {type(model).__name__}")
    if not isinstance(encrypted, Tensor) or encrypted.dim() not in (3, 4):
        raise ValueError(f"{op}: encrypted must be [B, C, H, W] or [C, H, W], got {describe(encrypted)}")
    if not (encrypted.dtype == torch.uint8 or encrypted.is_floating_point()):
        raise ValueError(f"{op}: encrypted must be uint8 or floating point, got {describe(encrypted)}")
    if patch_size != model.patch_size:
        raise ValueError(f"{op}: patch_size must be the attacker's, {model.patch_size}, got {patch_size!r}")
    single = encrypted.dim() == 3
    x = encrypted.unsqueeze(0) if single else encrypted
    s = model.img_size
    if x.shape[1] not in (1, 3) or tuple(x.shape[-2:]) != (s, s):
        raise ValueError(f"{op}: encrypted must be [B, 1 or 3, {s}, {s}] (the attacker's img_size), got "
                         f"{describe(encrypted)}")  # fmt: skip
    return x, single


@torch.no_grad()
def predict_position_logits(
    model: PositionAttacker, encrypted: Tensor, patch_size: int, *, batch_size: int = 16
) -> Tensor:
    """Per-tile position log-probabilities of RS ciphertext.

    Args:
        model: a trained :class:`PositionAttacker` (its patch size and image size must match).
        encrypted (Tensor[B, C, H, W] or Tensor[C, H, W]): RS ciphertext, C = 1 or 3, uint8 or float (any range).
        patch_size: p; must equal ``model.patch_size`` (a check).
        batch_size: images per forward pass.

    Returns:
        Tensor[B, N, N] float32 on the CPU (Tensor[N, N] for one image): ``out[b, i, j] = log P(ciphertext tile i
        came from cell j)``. ``out.argmax(-1)`` is a per-tile guess (not necessarily a permutation); see
        :func:`assign_positions`. Not differentiable (no_grad).
    """
    op = "ppml.attacks.predict_position_logits"
    x, single = _check_ciphertext(model, encrypted, patch_size, op)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(c.to(dev)).float().cpu() for c in x.split(batch_size)])
    finally:
        model.train(was_training)
    return out[0] if single else out


def assign_positions(log_probs: Tensor) -> Tensor:
    """The most probable permutation under independent per-tile position distributions (Hungarian algorithm).

    Args:
        log_probs (Tensor[B, N, N] or Tensor[N, N]): ``log_probs[b, i, j]`` = score of ciphertext tile i in cell j
            (log-probabilities, or any scores to maximise; finite or -inf, with at least one valid assignment).

    Returns:
        Tensor[B, N] int64 (Tensor[N] for 2-D input): ``perm_hat[b, i]`` = the cell given to tile i, maximising
        ``Σ_i log_probs[b, i, perm_hat[b, i]]`` over all permutations — the key convention of
        :func:`ppml.shuffle_patches` / :func:`ppml.attacks.solve_jigsaw`.
    """
    from scipy.optimize import linear_sum_assignment

    op = "ppml.attacks.assign_positions"
    if (not isinstance(log_probs, Tensor) or log_probs.dim() not in (2, 3) or not log_probs.is_floating_point()
            or log_probs.shape[-1] != log_probs.shape[-2] or log_probs.shape[-1] < 1):  # fmt: skip
        raise ValueError(f"{op}: log_probs must be a float tensor [B, N, N] or [N, N] with N >= 1, got "
                         f"{describe(log_probs)}")  # fmt: skip
    if torch.isnan(log_probs).any() or torch.isposinf(log_probs).any():
        raise ValueError(f"{op}: log_probs must not hold NaN or +inf, got {describe(log_probs)} with some")
    single = log_probs.dim() == 2
    lp = log_probs.detach().to("cpu", torch.float64)
    lp = lp[None] if single else lp
    out = torch.empty(lp.shape[:2], dtype=torch.int64)
    for b in range(lp.shape[0]):
        cost = -lp[b].numpy()
        finite = np.isfinite(cost)
        if not finite.all():  # -inf scores: forbidden cells (scipy refuses inf costs)
            big = (np.abs(cost[finite]).max() if finite.any() else 0.0) * cost.shape[0] + 1e9
            cost = np.where(finite, cost, big)
        rows, cols = linear_sum_assignment(cost)
        out[b, torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    out = out.to(log_probs.device)
    return out[0] if single else out


def solve_with_attacker(model: PositionAttacker, encrypted: Tensor, patch_size: int, *, batch_size: int = 16) -> Tensor:
    """Attacks RS ciphertext with a trained :class:`PositionAttacker`: predicted log-probabilities, then the most
    probable permutation (:func:`assign_positions`).

    Args:
        model, encrypted, patch_size, batch_size: as in :func:`predict_position_logits`.

    Returns:
        Tensor[B, N] int64 on ``encrypted``'s device (Tensor[N] for one image), in the key's convention:
        ``perm_hat[b, i]`` is the cell (row-major) given to ciphertext tile i, so
        ``ppml.unshuffle_patches(encrypted, perm_hat, p)`` is the reconstruction and the metrics
        ``direct_comparison(perm_hat, perm)`` etc. apply as for :func:`ppml.attacks.solve_jigsaw`.
    """
    logp = predict_position_logits(model, encrypted, patch_size, batch_size=batch_size)
    return assign_positions(logp).to(encrypted.device)


def position_accuracy(log_probs: Tensor, perm: Tensor) -> Tensor:
    """Share of tiles whose most probable cell (per-tile argmax, no assignment) is the true one.

    Args:
        log_probs (Tensor[B, N, N] or Tensor[N, N]): from :func:`predict_position_logits`.
        perm (Tensor[B, N] or Tensor[N]): the true key (``perm[b, i]`` = true cell of ciphertext tile i).

    Returns:
        Tensor[B] float32 (B = 1 for one image); chance level is 1/N.
    """
    op = "ppml.attacks.position_accuracy"
    if not isinstance(log_probs, Tensor) or log_probs.dim() not in (2, 3) or not log_probs.is_floating_point():
        raise ValueError(f"{op}: log_probs must be a float tensor [B, N, N] or [N, N], got {describe(log_probs)}")
    lp = log_probs.reshape(-1, *log_probs.shape[-2:])
    if not isinstance(perm, Tensor) or perm.is_floating_point() or tuple(perm.shape) != tuple(log_probs.shape[:-1]):
        raise ValueError(f"{op}: perm must be an integer tensor of shape {list(log_probs.shape[:-1])}, got "
                         f"{describe(perm)}")  # fmt: skip
    pk = perm.reshape(lp.shape[:2]).to(lp.device, torch.int64)
    return (lp.argmax(-1) == pk).float().mean(1)


__all__ = [
    "HELD_OUT",
    "PUBLIC_PHOTOS",
    "PositionAttacker",
    "assign_positions",
    "cache_dir",
    "load_photo",
    "load_position_attacker",
    "position_accuracy",
    "predict_position_logits",
    "public_images",
    "sample_crops",
    "solve_with_attacker",
    "standardize",
    "train_position_attacker",
]
