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

Training data (:func:`public_images`): the photos bundled with scikit-image minus the held-out evaluation photos
(:data:`HELD_OUT`: astronaut, coffee, chelsea — and any bundled image identical to one of them: ``skimage.data.cat``
*is* chelsea), plus the training split of scikit-learn's digits; random resized crops (aspect distortion included,
since evaluation images are whole photos squeezed to a square) and horizontal flips. No vertical flips: "sky at the
top" is exactly the kind of absolute-position prior the attacker should learn.

Training is resumable and cacheable: ``checkpoint=PATH`` (or ``"auto"``: a file under :func:`cache_dir` named by
the settings' hash) is written every ``checkpoint_every`` steps, at the end, and on SIGINT/SIGTERM (the step
finishes, the checkpoint is written, then KeyboardInterrupt); a later call with the same settings resumes from it, or
just loads it when it is complete. Every random draw (initial weights, crops, keys) comes from ``seed``, and the
generator state is in the checkpoint, so a resumed run ends with exactly the weights of an uninterrupted one.
The shared pieces (corpus, crops, training loop, checkpoints) also serve the MI decoder in
:mod:`ppml.attacks.mi_inversion`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import progress as _progress_bar
from .._checks import check_positive_int, describe
from ..ops.shuffle_patches import shuffle_patches

HELD_OUT: tuple[str, ...] = ("astronaut", "coffee", "chelsea")
# scikit-image photos that load without the optional `pooch` download (checked: skimage 0.26); grey ones are repeated
# over RGB. Synthetic patterns (checkerboard, binary_blobs) are left out: nothing like them is attacked.
PUBLIC_PHOTOS: tuple[str, ...] = (
    "rocket", "camera", "coins", "clock", "brick", "grass", "gravel", "moon", "page", "text", "cell",
    "microaneurysms", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle", "colorwheel",
    "logo", "horse", "shepp_logan_phantom",
)  # fmt: skip
DATA_CHOICES = ("public", "photos", "digits")
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
_MAX_SIDE = 512  # the corpus is stored at most this large (every crop is a downscale or a mild upscale of it)
_FORMAT = 1


# ---- the public corpus ---------------------------------------------------------------------------------------------


def _to_rgb_float(arr: np.ndarray) -> Tensor:
    """A scikit-image array (H×W, H×W×3 or H×W×4; bool, uint8 or float) as float32 ``Tensor[3, H, W]`` in [0, 1]."""
    a = np.asarray(arr)
    if a.dtype == bool:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    else:
        a = a.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-12)
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() == 2:
        return t.expand(3, -1, -1).contiguous()
    if t.shape[2] == 4:  # RGBA on white
        t = t[..., :3] * t[..., 3:] + (1 - t[..., 3:])
    return t[..., :3].permute(2, 0, 1).contiguous()


def _skimage_arrays(name: str) -> list[np.ndarray]:
    from skimage import data

    out = getattr(data, name)()
    return list(out[:2]) if name == "stereo_motorcycle" else [out]  # (left, right, disparity)


def _to_uint8(x: Tensor) -> Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=1)
def public_images() -> tuple[Tensor, ...]:
    """The attackers' photo corpus: :data:`PUBLIC_PHOTOS` from ``skimage.data``, without any image whose pixels
    equal a held-out one's (``skimage.data.cat`` is chelsea), downscaled (antialiased) to at most 512 px a side.

    Returns:
        tuple of uint8 ``Tensor[3, h, w]`` (21 images with scikit-image 0.26), channels-last in memory (torch's fast
        path for antialiased resizing). Cached per process.
    """
    held = [a for n in HELD_OUT for a in _skimage_arrays(n)]
    out = []
    for name in PUBLIC_PHOTOS:
        for arr in _skimage_arrays(name):
            if any(arr.shape == h.shape and np.array_equal(arr, h) for h in held):
                continue
            x = _to_rgb_float(arr)[None]
            h, w = x.shape[2:]
            s = min(1.0, _MAX_SIDE / max(h, w))
            if s < 1:
                size = (max(1, round(h * s)), max(1, round(w * s)))
                x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
            out.append(_to_uint8(x).contiguous(memory_format=torch.channels_last)[0])
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _digits() -> Tensor:
    from ..data.datasets import load_digits

    x = load_digits(img_size=8, channels=3).train_x  # [1437, 3, 8, 8] in [0, 1]; resized by the crop sampler
    return _to_uint8(x).contiguous(memory_format=torch.channels_last)


def load_photo(name: str, size: int) -> Tensor:
    """A whole ``skimage.data`` photo as an attack target: uint8 ``Tensor[3, size, size]``, bilinear with
    antialiasing, aspect ratio not kept (the evaluation protocol of ppml's attack tests and benchmarks)."""
    from skimage import data

    op = "ppml.attacks.load_photo"
    check_positive_int(size, op, "size")
    if not isinstance(name, str) or name.startswith("_") or not callable(getattr(data, name, None)):
        raise ValueError(f"{op}: name must be a skimage.data image such as {HELD_OUT[0]!r}, got {name!r}")
    x = _to_rgb_float(_skimage_arrays(name)[0])[None].double() * 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _random_crop(src: Tensor, out: int, gen: torch.Generator, side: tuple[float, float], flip: bool) -> Tensor:
    """One random resized crop of ``src`` (uint8 Tensor[3, h, w]) to uint8 ``Tensor[3, out, out]``: the
    crop's height is a fraction ``U(side)`` of h (capped at 1), its aspect ratio log-uniform in [2/3, 3/2] (capped
    by w), its place uniform; then a horizontal flip with probability ½ if ``flip``. Resized in uint8, channels-last
    (bilinear, antialiased: torch's vectorised path; measured 0.2 ms against 16 ms in float32 for 400×380 → 224²)."""
    h, w = src.shape[1:]
    fh = min(1.0, _uniform(gen, *side))
    aspect = math.exp(_uniform(gen, math.log(2 / 3), math.log(3 / 2)))
    ch = max(1, min(h, round(fh * h)))
    cw = max(1, min(w, round(ch * aspect)))
    top = int(torch.randint(0, h - ch + 1, (), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (), generator=gen))
    crop = src[None, :, top : top + ch, left : left + cw].contiguous(memory_format=torch.channels_last)
    crop = F.interpolate(crop, size=(out, out), mode="bilinear", antialias=True, align_corners=False)[0]
    return crop.flip(-1) if flip and bool(torch.rand((), generator=gen) < 0.5) else crop


def sample_crops(
    batch: int,
    size: int,
    generator: torch.Generator,
    *,
    data: str = "public",
    digits_fraction: float = 0.25,
    photo_side: tuple[float, float] = (0.6, 1.0),
    flip: bool = True,
) -> Tensor:
    """A batch of training images for the attackers, every draw from ``generator``.

    Args:
        batch, size: the output is float32 ``Tensor[batch, 3, size, size]`` in [0, 1].
        generator: the only source of randomness (image choice, crop, flip).
        data: ``"public"`` (photos, and digits with probability ``digits_fraction``), ``"photos"`` or ``"digits"``.
        photo_side: range of a photo crop's height as a fraction of the photo's (digits: always 0.75-1, whole
            digits).
        flip: random horizontal flips.
    """
    op = "ppml.attacks.sample_crops"
    check_positive_int(batch, op, "batch")
    check_positive_int(size, op, "size")
    if data not in DATA_CHOICES:
        raise ValueError(f"{op}: data must be one of {DATA_CHOICES}, got {data!r}")
    photos = public_images() if data != "digits" else ()
    digits = _digits() if data != "photos" else None
    p_digit = {"public": digits_fraction, "photos": 0.0, "digits": 1.0}[data]
    with _one_thread():
        return _sample(batch, size, generator, photos, digits, p_digit, photo_side, flip)


@contextlib.contextmanager
def _one_thread():
    """Runs a block of many tiny tensor ops on one thread: with other processes on the cores, each parallel op
    waits for a scheduler tick (measured: 32 crops at 224 px take 0.55 s with 2 threads, 0.02 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sample(batch, size, generator, photos, digits, p_digit, photo_side, flip) -> Tensor:
    out = torch.empty(batch, 3, size, size, dtype=torch.uint8)
    for k in range(batch):
        if float(torch.rand((), generator=generator)) < p_digit:
            src = digits[int(torch.randint(0, digits.shape[0], (), generator=generator))]
            out[k] = _random_crop(src, size, generator, (0.75, 1.0), flip)
        else:
            src = photos[int(torch.randint(0, len(photos), (), generator=generator))]
            out[k] = _random_crop(src, size, generator, photo_side, flip)
    return out.float().div_(255)


# ---- checkpoints, cache and the training loop shared by the learned attacks ------------------------------------------


def cache_dir() -> str:
    """Where ``checkpoint="auto"`` keeps trained attackers: ``$PPML_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/ppml/attacks``, else ``~/.cache/ppml/attacks``."""
    if os.environ.get("PPML_CACHE_DIR"):
        return os.environ["PPML_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ppml", "attacks")


def _config_hash(kind: str, config: dict[str, Any]) -> str:
    blob = json.dumps({"kind": kind, "format": _FORMAT, **config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _resolve_checkpoint(checkpoint: str | os.PathLike | None, kind: str, config: dict, stem: str, op: str):
    if checkpoint is None:
        return None
    if checkpoint == "auto":
        return os.path.join(cache_dir(), f"{stem}-{_config_hash(kind, config)}.pt")
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"{op}: checkpoint must be a path, 'auto' or None, got {checkpoint!r}")
    return os.fspath(checkpoint)


def _save_checkpoint(path: str, state: dict) -> None:
    from ..train.trainer import _atomic_save

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_save(state, path)


def _read_checkpoint(path: str, kind: str, op: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("kind") != kind or ck.get("format") != _FORMAT:
        got = ck.get("kind") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{op}: {path} is not a ppml {kind} checkpoint (format {_FORMAT}), got kind {got!r}")
    return ck


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def _fit(
    *,
    op: str,
    kind: str,
    config: dict[str, Any],
    build: Callable[[dict], nn.Module],
    make_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    checkpoint: str | None,
    checkpoint_every: int,
    stop_after: int | None,
    show_progress: bool,
    threads: int | None,
    on_train: Callable[[dict], None] | None = None,
) -> nn.Module:
    """Trains ``build(config)`` with AdamW on ``make_batch`` draws; checkpoint/resume as described in the module doc.

    ``config`` must hold steps, batch_size, lr, weight_decay and seed (it is stored in, and compared with, the
    checkpoint). Returns the model in eval mode with ``model.train_info`` = {steps_done, steps, seconds, loss,
    complete, checkpoint}. ``on_train``, if given, is called once before the first step this call trains (not when a
    complete checkpoint is loaded) with {checkpoint, steps, steps_done, end}.
    """
    steps = config["steps"]
    with torch.random.fork_rng(devices=[]):  # timm initialises from the global RNG: seed it without touching it
        torch.manual_seed(config["seed"])
        model = build(config)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "token" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config["lr"],
    )
    gen = torch.Generator().manual_seed(config["seed"])
    step, seconds, losses = 0, 0.0, []
    if checkpoint is not None and os.path.exists(checkpoint):
        ck = _read_checkpoint(checkpoint, kind, op)
        if ck["config"] != config:
            diff = {k: (ck["config"].get(k), config.get(k)) for k in set(ck["config"]) | set(config)
                    if ck["config"].get(k) != config.get(k)}  # fmt: skip
            raise ValueError(
                f"{op}: checkpoint {checkpoint} was trained with other settings (name: (checkpoint's, this call's))"
                f": {diff}; pass the same settings, or another checkpoint path"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        step, seconds, losses = ck["step"], ck["seconds"], list(ck["losses"])

    def save() -> None:
        if checkpoint is not None:
            _save_checkpoint(checkpoint, {
                "kind": kind, "format": _FORMAT, "config": config, "step": step, "seconds": seconds,
                "losses": losses, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
            })  # fmt: skip

    from ..train.trainer import _StopRequest

    start = step
    end = steps if stop_after is None else min(steps, stop_after)
    warmup = max(1, round(0.05 * steps))
    old_threads = torch.get_num_threads()
    if step < end and threads is not None:
        torch.set_num_threads(threads)
    if step < end:
        if on_train is not None:
            on_train({"checkpoint": checkpoint, "steps": steps, "steps_done": step, "end": end})
        model.train()
        bar = _progress_bar(desc=kind, total=steps, initial=step, enabled=show_progress, leave=False)
        with _StopRequest() as stop:
            try:
                while step < end:
                    t0 = time.perf_counter()
                    for g in opt.param_groups:
                        g["lr"] = _lr_at(step, steps, config["lr"], warmup)
                    x, target = make_batch(gen)
                    loss = loss_fn(model, x, target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    step += 1
                    seconds += time.perf_counter() - t0
                    losses.append(float(loss.detach()))
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    if stop.signum is not None:
                        save()
                        where = (f"checkpoint written to {checkpoint} (call again to resume)" if checkpoint
                                 else "no checkpoint (checkpoint=None): the progress is lost")
                        raise KeyboardInterrupt(f"{op}: stopped by signal {stop.signum} after step {step}; {where}")
                    if step % checkpoint_every == 0 or step == end:
                        save()
            finally:
                bar.close()
                torch.set_num_threads(old_threads)
    model.eval()
    model.train_info = _train_info(step, steps, seconds, losses, checkpoint, step - start)
    return model


def _train_info(step: int, steps: int, seconds: float, losses: list[float], checkpoint: str | None,
                this_call: int) -> dict:  # fmt: skip
    tail = losses[-20:]
    return {
        "steps_done": step,
        "steps_this_call": this_call,  # 0: loaded from a complete checkpoint
        "steps": steps,
        "seconds": seconds,
        "loss": sum(tail) / len(tail) if tail else float("nan"),  # mean of the last 20 steps
        "complete": step >= steps,
        "checkpoint": checkpoint,
    }


def _check_common(op: str, steps, batch_size, lr, weight_decay, seed, checkpoint_every, stop_after, data,
                  digits_fraction) -> None:  # fmt: skip
    check_positive_int(steps, op, "steps")
    check_positive_int(batch_size, op, "batch_size")
    check_positive_int(checkpoint_every, op, "checkpoint_every")
    if stop_after is not None:
        check_positive_int(stop_after, op, "stop_after")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{op}: lr must be a positive number, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"{op}: weight_decay must be a number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{op}: seed must be an int >= 0, got {seed!r}")
    if data not in DATA_CHOICES:
        raise ValueError(f"{op}: data must be one of {DATA_CHOICES}, got {data!r}")
    frac = digits_fraction
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
        raise ValueError(f"{op}: digits_fraction must lie in [0, 1], got {digits_fraction!r}")


def standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image standardisation: ``((x − μ) / σ, μ, σ)`` with μ, σ over C, H, W (σ floored at 1e-6 of the range
    scale), float32. Both learned attacks see standardised input, so they accept uint8, [0, 1] or 0..255 images
    alike, and RS (a permutation) and MI (a mean) leave μ unchanged."""
    x = x.float()
    mu = x.mean((1, 2, 3), keepdim=True)
    sd = x.std((1, 2, 3), keepdim=True, unbiased=False)
    sd = sd.clamp_min(1e-6 * (x.abs().amax((1, 2, 3), keepdim=True) + 1e-12))
    return (x - mu) / sd, mu, sd


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


def _attacker_config(patch_size, img_size, tile, dim, depth, heads, head, steps, batch_size, lr, weight_decay,
                     data, digits_fraction, seed) -> dict:  # fmt: skip
    return dict(patch_size=patch_size, img_size=img_size, tile=tile, dim=dim, depth=depth, heads=heads, head=head,
                steps=steps, batch_size=batch_size, lr=float(lr), weight_decay=float(weight_decay), data=data,
                digits_fraction=float(digits_fraction), seed=seed)  # fmt: skip


def _build_attacker(cfg: dict) -> PositionAttacker:
    return PositionAttacker(cfg["patch_size"], cfg["img_size"], tile=cfg["tile"], dim=cfg["dim"], depth=cfg["depth"],
                            heads=cfg["heads"], head=cfg["head"])  # fmt: skip


def train_position_attacker(
    patch_size: int,
    img_size: int = 224,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    tile: int | None = None,
    dim: int = 128,
    depth: int = 4,
    heads: int = 4,
    head: str = "factorized",
    data: str = "public",
    digits_fraction: float = 0.25,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    stop_after: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    on_train: Callable[[dict], None] | None = None,
) -> PositionAttacker:
    """Trains a :class:`PositionAttacker` on public images encrypted with random RS keys (CPU).

    Each step draws ``batch_size`` crops (:func:`sample_crops`), shuffles their p×p patches with fresh keys and
    minimises the mean negative log-probability of every tile's true cell. AdamW (weight decay on matrices only),
    linear warm-up over 5 % of the steps then cosine decay, gradient norm clipped at 1.

    Args:
        patch_size: p (>= 1, dividing ``img_size``).
        img_size: side of the square images to attack; the grid is (img_size/p)² cells.
        steps, batch_size, lr, weight_decay: the optimisation.
        tile: the ViT's patch size (the ciphertext is average-pooled by p / tile); default ``min(p, 8)``.
        dim, depth, heads: ViT width (divisible by heads), blocks, attention heads.
        head: ``"factorized"`` (default) or ``"full"``, see :class:`PositionAttacker`.
        data, digits_fraction: the training corpus (see :func:`sample_crops`).
        seed: every random draw (weights, crops, keys) comes from it.
        checkpoint: a path to save to and resume from, ``"auto"`` (under :func:`cache_dir`, named by the settings'
            hash) or None (no file). A complete checkpoint with the same settings is loaded without training; one
            with other settings is an error.
        checkpoint_every: steps between checkpoint writes (also written at the end, at ``stop_after`` and on
            SIGINT/SIGTERM).
        stop_after: stop (and checkpoint) after this many steps in total, as an interrupted run would.
        progress: show a tqdm bar.
        threads: torch CPU threads while training (restored afterwards); None keeps the current setting. On a
            machine shared with other busy processes, 1 can be several times faster than 2 for the small grids
            (measured on a loaded 2-core VM: p = 32, 8 vs 50 ms per image per step). Not part of the settings.
        on_train: called once before training starts in this call (not when a complete checkpoint is loaded), with
            {"checkpoint": the path or None, "steps": the budget, "steps_done": where training resumes, "end": the
            step it stops at}; ``ppml attack`` uses it to say that the attacker is being trained, once, into its
            cache.

    Returns:
        The model in eval mode; ``model.train_info`` holds the steps done (in all, and in this call: 0 when a
        complete checkpoint was loaded), training seconds (summed over resumptions), the mean loss of the last 20
        steps, whether training is complete, and the checkpoint path.
    """
    op = "ppml.attacks.train_position_attacker"
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
    _check_common(op, steps, batch_size, lr, weight_decay, seed, checkpoint_every, stop_after, data, digits_fraction)
    cfg = _attacker_config(patch_size, img_size, tile, dim, depth, heads, head, steps, batch_size, lr, weight_decay,
                           data, digits_fraction, seed)  # fmt: skip
    path = _resolve_checkpoint(checkpoint, "position_attacker", cfg, f"rs-attacker-p{patch_size}-{img_size}", op)

    def make_batch(gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x = sample_crops(batch_size, img_size, gen, data=data, digits_fraction=digits_fraction)
        return shuffle_patches(x, patch_size, generator=gen)

    return _fit(op=op, kind="position_attacker", config=cfg, build=_build_attacker, make_batch=make_batch,
                loss_fn=PositionAttacker.loss, checkpoint=path, checkpoint_every=checkpoint_every,
                stop_after=stop_after, show_progress=progress, threads=threads, on_train=on_train)  # fmt: skip


def _load(path, kind: str, build: Callable[[dict], nn.Module], op: str) -> nn.Module:
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        raise FileNotFoundError(f"{op}: path must be an existing checkpoint file, got {path!r}")
    ck = _read_checkpoint(os.fspath(path), kind, op)
    model = build(ck["config"])
    model.load_state_dict(ck["model"])
    model.eval()
    model.train_info = _train_info(ck["step"], ck["config"]["steps"], ck["seconds"], ck["losses"], os.fspath(path), 0)
    return model


def load_position_attacker(path: str | os.PathLike) -> PositionAttacker:
    """Loads a :class:`PositionAttacker` from a checkpoint written by :func:`train_position_attacker` (complete or
    not), in eval mode, with ``train_info``."""
    return _load(path, "position_attacker", _build_attacker, "ppml.attacks.load_position_attacker")


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
