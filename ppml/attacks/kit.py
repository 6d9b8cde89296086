"""The kit the learned attacks train with: the public corpus, the settings they share, and a resumable, cacheable
training loop. :mod:`ppml.attacks.learned` (the RS position attacker) and :mod:`ppml.attacks.mi_inversion` (the MI
decoder) are built on it.

Training data (:func:`public_images`, :func:`sample_crops`): the photos bundled with scikit-image minus the held-out
evaluation photos (:data:`HELD_OUT`: astronaut, coffee, chelsea — and any bundled image identical to one of them:
``skimage.data.cat`` *is* chelsea), plus the training split of scikit-learn's digits; random resized crops (aspect
distortion included, since evaluation images are whole photos squeezed to a square) and horizontal flips. No
vertical flips: "sky at the top" is exactly the kind of absolute-position prior an attacker should learn.

Training (:func:`fit`, with :class:`TrainSettings`) is resumable and cacheable: ``checkpoint=PATH`` (or ``"auto"``:
a file under :func:`cache_dir` named by the settings' hash) is written every ``checkpoint_every`` steps, at the end,
and on SIGINT/SIGTERM (the step finishes, the checkpoint is written, then KeyboardInterrupt); a later call with the
same settings resumes from it, or just loads it when it is complete. Every random draw (initial weights, crops, keys)
comes from ``seed``, and the generator state is in the checkpoint, so a resumed run ends with exactly the weights of
an uninterrupted one. Checkpoints are written and signals handled by the training runtime
(:mod:`ppml.train.runtime`) that ``ppml train`` and ``ppml detect`` use too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_positive_int
from .._progress import progress as _progress_bar
from ..train.runtime import StopRequest, atomic_save

__all__ = [
    "DATA_CHOICES",
    "HELD_OUT",
    "PUBLIC_PHOTOS",
    "TrainSettings",
    "cache_dir",
    "evaluation_images",
    "fit",
    "load_photo",
    "load_trained",
    "public_images",
    "resolve_checkpoint",
    "sample_crops",
    "standardize",
]

HELD_OUT: tuple[str, ...] = ("astronaut", "coffee", "chelsea")
# scikit-image photos that load without the optional `pooch` download (checked: skimage 0.26); grey ones are repeated
# over RGB. Synthetic patterns (checkerboard, binary_blobs) are left out: nothing like them is attacked.
PUBLIC_PHOTOS: tuple[str, ...] = (
    "rocket", "camera", "coins", "clock", "brick", "grass", "gravel", "moon", "page", "text", "cell",
    "microaneurysms", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle", "colorwheel",
    "logo", "horse", "shepp_logan_phantom",
)  # fmt: skip
DATA_CHOICES = ("public", "photos", "digits")
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



# ---- the evaluation set ---------------------------------------------------------------------------------------------

# Shares of an evaluation set of n images: held-out photos (whole, then crops), digits; LFW faces fill the rest.
_EVAL_PHOTO_SHARE, _EVAL_DIGIT_SHARE, _EVAL_FACES, _EVAL_DIGITS = 0.3, 0.2, 100, 359  # 359: the validation split


def evaluation_images(n: int = 50, size: int = 224) -> tuple[Tensor, tuple[str, ...]]:
    """The attack evaluation set: ``n`` distinct images none of the learned attackers trained on, deterministic.

    - photos, ``max(3, round(0.3·n))``: the held-out photos (:data:`HELD_OUT`) whole (squeezed to a square as
      :func:`load_photo` does), then random crops of them (height 40-90 % of the photo's, aspect 2/3-3/2, place and
      horizontal flip from a fixed seed), cycling over the three;
    - digits, ``round(0.2·n)``: the first validation images of :func:`ppml.data.load_digits` (8×8, bilinearly
      upscaled: mostly identical black tiles, which direct comparison counts as wrong when swapped), at most 359;
    - faces: the rest, from the 100 faces of ``skimage.data.lfw_subset`` (25×25 grey, bilinearly upscaled); past
      100 faces (and 359 digits), more photo crops.

    Photo crops of one photo share content, so the set holds 3 photo sources, not 3 + crops independent ones; the
    benchmarks report both the whole-set means and per-kind rows where it matters.

    Args:
        n: images (>= 3).
        size: side S.

    Returns:
        (uint8 ``Tensor[n, 3, S, S]``, names): names like ``astronaut``, ``astronaut/crop4``, ``digit-val0007``,
        ``lfw-face012``; the same for the same arguments on every machine.
    """
    from skimage import data

    from ..data.datasets import load_digits

    op = "ppml.attacks.evaluation_images"
    check_positive_int(size, op, "size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"{op}: n must be an int >= 3, got {n!r}")
    n_digit = min(_EVAL_DIGITS, round(_EVAL_DIGIT_SHARE * n)) if n >= 10 else 0
    n_photo = max(len(HELD_OUT), round(_EVAL_PHOTO_SHARE * n))
    n_face = min(_EVAL_FACES, n - n_photo - n_digit)
    n_photo = n - n_digit - n_face
    images, names = [load_photo(name, size) for name in HELD_OUT], list(HELD_OUT)
    sources = [_to_uint8(_to_rgb_float(_skimage_arrays(name)[0])) for name in HELD_OUT]
    gen = torch.Generator().manual_seed(20261205)
    for k in range(n_photo - len(HELD_OUT)):
        src = sources[k % len(sources)]
        images.append(_random_crop(src, size, gen, (0.4, 0.9), flip=True))
        names.append(f"{HELD_OUT[k % len(HELD_OUT)]}/crop{k // len(HELD_OUT)}")
    if n_digit:
        digits = load_digits(img_size=8, channels=3).val_x[:n_digit]
        up = F.interpolate(digits.double(), size=(size, size), mode="bilinear", align_corners=False)
        images += list(_to_uint8(up.clamp(0, 1)))
        names += [f"digit-val{i:04d}" for i in range(n_digit)]
    if n_face:
        faces = torch.from_numpy(np.asarray(data.lfw_subset()[:n_face], dtype=np.float64))[:, None]
        faces = faces / 255 if faces.max() > 1 else faces
        up = F.interpolate(faces, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        images += list(_to_uint8(up).expand(-1, 3, -1, -1))
        names += [f"lfw-face{i:03d}" for i in range(n_face)]
    return torch.stack([im.contiguous() for im in images]), tuple(names)


# ---- the settings every learned attack trains with ------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """The settings :func:`ppml.attacks.train_position_attacker` and :func:`ppml.attacks.train_unmix_decoder` share.

    Each trainer takes them as keyword arguments (``**settings``) with its own defaults for the first five;
    :meth:`from_kwargs` resolves and checks them.

    Attributes:
        steps, batch_size, lr, weight_decay: the optimisation (AdamW, weight decay on matrices only; linear warm-up
            over 5 % of the steps, then cosine decay to 0; gradient norm clipped at 1).
        digits_fraction, data: the training corpus (see :func:`sample_crops`).
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
    """

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    digits_fraction: float
    data: str = "public"
    seed: int = 0
    checkpoint: str | os.PathLike | None = None
    checkpoint_every: int = 50
    stop_after: int | None = None
    progress: bool = True
    threads: int | None = None
    on_train: Callable[[dict], None] | None = None

    @classmethod
    def from_kwargs(cls, op: str, kwargs: dict[str, Any], **defaults: Any) -> TrainSettings:
        """The settings a trainer was called with (``kwargs``), the trainer's ``defaults`` filling the rest; not yet
        checked (:meth:`check`: the trainer checks its model's arguments first).

        Raises:
            TypeError: a keyword that is not a setting (as Python says it for a function that does not take it).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for name in kwargs:
            if name not in names:
                raise TypeError(f"{op.rsplit('.', 1)[-1]}() got an unexpected keyword argument {name!r}")
        return cls(**{**defaults, **kwargs})

    def check(self, op: str) -> None:
        """Raises ValueError, naming ``op`` and the setting, for a setting out of range."""
        check_positive_int(self.steps, op, "steps")
        check_positive_int(self.batch_size, op, "batch_size")
        check_positive_int(self.checkpoint_every, op, "checkpoint_every")
        if self.stop_after is not None:
            check_positive_int(self.stop_after, op, "stop_after")
        lr, weight_decay, seed = self.lr, self.weight_decay, self.seed
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"{op}: lr must be a positive number, got {lr!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"{op}: weight_decay must be a number >= 0, got {weight_decay!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{op}: seed must be an int >= 0, got {seed!r}")
        if self.data not in DATA_CHOICES:
            raise ValueError(f"{op}: data must be one of {DATA_CHOICES}, got {self.data!r}")
        frac = self.digits_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac <= 1:
            raise ValueError(f"{op}: digits_fraction must lie in [0, 1], got {frac!r}")

    def config(self) -> dict[str, Any]:
        """The settings a trained model depends on: stored in its checkpoint (a resume must match them) and hashed
        into its ``"auto"`` cache name, next to the model's own (the run settings are left out)."""
        return dict(steps=self.steps, batch_size=self.batch_size, lr=float(self.lr),
                    weight_decay=float(self.weight_decay), data=self.data,
                    digits_fraction=float(self.digits_fraction), seed=self.seed)  # fmt: skip

    def crops(self, size: int, gen: torch.Generator, **kwargs: Any) -> Tensor:
        """A training batch of :func:`sample_crops` (``batch_size`` crops of ``size`` px from ``data``)."""
        return sample_crops(self.batch_size, size, gen, data=self.data, digits_fraction=self.digits_fraction,
                            **kwargs)  # fmt: skip


def standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image standardisation: ``((x − μ) / σ, μ, σ)`` with μ, σ over C, H, W (σ floored at 1e-6 of the range
    scale), float32. Both learned attacks see standardised input, so they accept uint8, [0, 1] or 0..255 images
    alike, and RS (a permutation) and MI (a mean) leave μ unchanged."""
    x = x.float()
    mu = x.mean((1, 2, 3), keepdim=True)
    sd = x.std((1, 2, 3), keepdim=True, unbiased=False)
    sd = sd.clamp_min(1e-6 * (x.abs().amax((1, 2, 3), keepdim=True) + 1e-12))
    return (x - mu) / sd, mu, sd


# ---- checkpoints, cache and the training loop ------------------------------------------------------------------------


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


def resolve_checkpoint(checkpoint: str | os.PathLike | None, kind: str, config: dict, stem: str, op: str) -> str | None:
    """The checkpoint file of a training call: None (no file), ``checkpoint`` as a path, or for ``"auto"``
    ``cache_dir()/STEM-HASH.pt`` with HASH from ``kind`` and ``config`` (the same settings, the same file)."""
    if checkpoint is None:
        return None
    if checkpoint == "auto":
        return os.path.join(cache_dir(), f"{stem}-{_config_hash(kind, config)}.pt")
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise ValueError(f"{op}: checkpoint must be a path, 'auto' or None, got {checkpoint!r}")
    return os.fspath(checkpoint)


def _save_checkpoint(path: str, state: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_save(state, path)


def _read_checkpoint(path: str, kind: str, op: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("kind") != kind or ck.get("format") != _FORMAT:
        got = ck.get("kind") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{op}: {path} is not a ppml {kind} checkpoint (format {_FORMAT}), got kind {got!r}")
    return ck


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``. (Not the runtime's
    :func:`~ppml.train.runtime.warmup_cosine`: that one multiplies ``lr`` by a factor, which rounds differently in
    the warm-up, and cached attackers must resume bit for bit.)"""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def fit(
    *,
    op: str,
    kind: str,
    stem: str,
    model_config: dict[str, Any],
    settings: TrainSettings,
    build: Callable[[dict], nn.Module],
    make_batch: Callable[[torch.Generator], tuple[Tensor, Tensor]],
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
) -> nn.Module:
    """Trains ``build(config)`` with AdamW on ``make_batch`` draws; checkpoint/resume as described in the module doc.

    Args:
        op: the public function, named in errors.
        kind: the model kind stored in (and checked against) the checkpoint.
        stem: the ``"auto"`` cache file's name before its hash.
        model_config: the model's own settings; with ``settings.config()`` they form the run's ``config``
            (stored in, and compared with, the checkpoint; what ``build`` receives).
        settings: the training settings.
        build, make_batch, loss_fn: the model from ``config``, a batch ``(input, target)`` from the run's generator,
            the loss of a batch.

    Returns:
        The model in eval mode with ``model.train_info`` = {steps_done, steps_this_call, steps, seconds, loss,
        complete, checkpoint}.
    """
    config = {**model_config, **settings.config()}
    checkpoint = resolve_checkpoint(settings.checkpoint, kind, config, stem, op)
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

    start = step
    end = steps if settings.stop_after is None else min(steps, settings.stop_after)
    warmup = max(1, round(0.05 * steps))
    old_threads = torch.get_num_threads()
    if step < end and settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if step < end:
        if settings.on_train is not None:
            settings.on_train({"checkpoint": checkpoint, "steps": steps, "steps_done": step, "end": end})
        model.train()
        bar = _progress_bar(desc=kind, total=steps, initial=step, enabled=settings.progress, leave=False)
        with StopRequest() as stop:
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
                    if step % settings.checkpoint_every == 0 or step == end:
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


def load_trained(path, kind: str, build: Callable[[dict], nn.Module], op: str) -> nn.Module:
    """A model of ``kind`` from a checkpoint written by :func:`fit` (complete or not), in eval mode, with
    ``train_info``; ``build`` makes the model from the checkpoint's config."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.exists(path):
        raise FileNotFoundError(f"{op}: path must be an existing checkpoint file, got {path!r}")
    ck = _read_checkpoint(os.fspath(path), kind, op)
    model = build(ck["config"])
    model.load_state_dict(ck["model"])
    model.eval()
    model.train_info = _train_info(ck["step"], ck["config"]["steps"], ck["seconds"], ck["losses"], os.fspath(path), 0)
    return model
