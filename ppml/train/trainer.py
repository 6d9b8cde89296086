"""Training ViTs on encrypted images: one process or torchrun DDP, exact checkpoint/resume.

Settings (``TrainConfig``):

- ``encryption`` none | rs | mi and ``mode`` owner | in-model. ``owner``: the data owner encrypts the whole dataset
  once, before training (keys from OS entropy unless ``key_seed`` is given; kept in ``DIR/owner_keys.pt``, which the
  trainer never reads); the trainer only sees ciphertext and augments it in the encrypted domain (``ppml.augment``,
  at the ciphertext's patch size). ``in-model``: the paper's setting — plaintext augmentation, then the model
  encrypts its input itself: a fresh RS shuffle of each batch every step (``pevit_*`` with ``shuffle_input=True``,
  keys from the run's generator) or the MI mix (``mivit_*`` with ``mix_input=True``).
- Determinism: every random draw comes from ``seed`` (model init, batch order, augmentation, in-model keys, dropout),
  per rank, per epoch. A checkpoint holds the optimizer, the schedule and every rank's generator states, so a run
  stopped mid-epoch (``stop_after`` steps, SIGINT or SIGTERM: the step finishes, a checkpoint is written) and resumed
  reproduces the uninterrupted run exactly.
- ``compile``: a torch.compile backend (``inductor``, ``eager``, ``aot_eager``, ...; ``compile_mode`` passed on) for
  the training forward and backward, compiled after the DDP wrap as in timm's train.py. Checkpoints hold the plain
  module's state_dict (no ``_orig_mod.`` prefixes), and ``compile`` / ``compile_mode`` may change on ``--resume``:
  a run compiled or not resumes, evaluates and loads the same way.
- The loop's plumbing (torchrun, checkpoints, stop requests, the schedule, the DDP check) is the training runtime,
  :mod:`ppml.train.runtime`, which ``ppml detect train`` and the learned attacks share.
- Data: ``--data digits`` and old-format (``ppml-encrypted-v1``) DSTs are held in memory. An image folder and a
  ``ppml-wds`` DST are streamed (:mod:`ppml.data.stream`, :mod:`ppml.train.feed`): ``workers`` DataLoader processes
  each read a disjoint share of the epoch (split by rank and worker), shuffle it through a buffer of
  ``shuffle_buffer`` samples, decode it (and, for a folder in owner mode, encrypt it: RS keys per image from a hash
  of (key seed, image index), the seed kept in ``DIR/owner_keys.pt`` and read back on ``--resume``). Peak memory per
  process is bounded independently of the dataset's size: a worker holds about ``shuffle_buffer`` × the encoded
  sample's bytes + one batch being decoded; the main process ``2 × workers`` decoded batches in flight + the model
  and optimizer. ``stream`` False holds a folder or DST in memory instead; a stopped stream resumes at the same
  sample with the same batches.
- DDP: launched by torchrun (``WORLD_SIZE`` > 1) it uses gloo on CPU; on CUDA, nccl (gloo for the few CPU
  tensors it all-reduces) and one GPU per process, cuda:LOCAL_RANK; torch's DistributedSampler (seeded,
  per epoch; a stream splits its shards by rank and worker instead), and checks at every checkpoint that all ranks
  hold identical parameters. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._progress import progress
from .feed import MemoryFeed
from .runtime import (
    Dist,
    StopRequest,
    any_rank,
    atomic_save,
    autocast_forward,
    gather_in_sync,
    init_distributed,
    keep_completed_epochs,
    make_run_dir,
    open_checkpoint,
    print_result,
    warmup_cosine,
    write_summary,
)

_OP = "ppml train"

ENCRYPTIONS = ("none", "rs", "mi")
MODES = ("owner", "in-model")
LOSSES = ("ce", "anchor-sqeuclidean", "anchor-euclidean", "anchor-cosine")
DEFAULT_MODELS = {"none": "vit_tiny_patch16_224", "rs": "pevit_tiny_patch16_224", "mi": "mivit_tiny_patch16_224"}
# Anchor-loss defaults (scale γ, pull λ) per metric, radius-1 anchors. A ViT's pooled features come out of its final
# LayerNorm with norm ≈ √D, so a γ that suits unit-scale features (benchmarks/experiments/anchor_digits.py uses 16)
# saturates the softmax for the distance metrics: on the digits (RS, 15 epochs, D = 96) sqeuclidean went 0.59 → 0.89
# validation accuracy from γ = 16 to γ = 1, euclidean 0.79 → 0.87 from γ = 1 to 4; cosine is scale-free in f and
# keeps γ = 16.
ANCHOR_DEFAULTS = {"sqeuclidean": (1.0, 0.1), "euclidean": (4.0, 0.0), "cosine": (16.0, 0.0)}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint (``--resume`` refuses a different one)."""

    data: str = "digits"
    encryption: str = "rs"
    mode: str = "owner"
    loss: str = "ce"
    model: str | None = None
    img_size: int = 32
    patch_size: int = 8
    grid: int = 2
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    drop_path: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    anchor_scale: float | None = None
    anchor_pull: float | None = None
    anchor_kind: str = "simplex"
    hflip: float | None = None
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    patch_drop: float = 0.0
    seed: int = 0
    key_seed: int | None = None
    stream: bool | None = None  # None: stream image folders and ppml-wds DSTs, hold digits and old DSTs in memory
    shuffle_buffer: int = 1000
    workers: int = 2
    device: str = "auto"
    amp: bool | None = None
    compile: str | None = None  # a torch.compile backend ("inductor", "eager", "aot_eager", ...); None: eager PyTorch
    compile_mode: str | None = None
    out: str = "runs/ppml"
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        for name, allowed in (("encryption", ENCRYPTIONS), ("mode", MODES), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_OP}: --{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("img_size", "patch_size", "grid", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{_OP}: --{name.replace('_', '-')} must be a positive int, got {v!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"{_OP}: --patch-size must divide --img-size, got patch_size={self.patch_size}, "
                f"img_size={self.img_size}"
            )
        if self.encryption == "mi" and self.patch_size % self.grid:
            raise ValueError(f"{_OP}: --grid must divide --patch-size, got grid={self.grid}, patch={self.patch_size}")
        if self.encryption == "none" and self.mode != "owner":
            raise ValueError(f"{_OP}: --mode in-model needs --encryption rs or mi, got --encryption none")
        family = {"rs": "pevit", "mi": "mivit"}.get(self.encryption)
        if self.mode == "in-model" and not self.model_name.startswith(f"{family}_"):
            # in-model encryption is an option of the scheme's model (shuffle_input / mix_input): another model
            # would see plain images
            raise ValueError(f"{_OP}: --mode in-model with --encryption {self.encryption} needs a {family}_* model "
                             f"(it encrypts its own input), got --model {self.model_name}")
        for name in ("shuffle_buffer", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{_OP}: --{name.replace('_', '-')} must be an int >= 0, got {v!r}")
        if self.stream and self.data == "digits":
            raise ValueError(f"{_OP}: --stream needs --data FOLDER or a ppml-wds DST; the built-in digits are held "
                             "in memory")
        if self.compile_mode is not None and self.compile is None:
            raise ValueError(f"{_OP}: --compile-mode {self.compile_mode} needs --compile")
        if self.compile is not None:
            known = torch.compiler.list_backends(exclude_tags=())
            if self.compile not in known:
                shown = ", ".join(sorted(torch.compiler.list_backends())) + "; to debug: eager, aot_eager, ..."
                raise ValueError(f"{_OP}: --compile must name a torch.compile backend ({shown}), got {self.compile!r}")
        if not (self.lr > 0 and self.min_lr >= 0 and self.warmup_epochs >= 0 and self.weight_decay >= 0):
            raise ValueError(f"{_OP}: lr must be > 0 and min-lr, warmup-epochs, weight-decay >= 0")

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.encryption]

    @property
    def metric(self) -> str | None:
        return self.loss.split("-", 1)[1] if self.loss.startswith("anchor-") else None

    @property
    def cipher_patch(self) -> int:
        """The patch size of the tensor the model (and the encrypted-domain augmentation) sees."""
        return self.patch_size // self.grid if self.encryption == "mi" and self.mode == "owner" else self.patch_size


# ----------------------------------------------------------------------------------------------------------- setup


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The timm model named by the config; with an anchor loss its head is removed (the pooled features are the
    embedding the anchors live in)."""
    import ppml.models

    kwargs: dict[str, Any] = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, drop_path_rate=cfg.drop_path)
    kwargs["num_classes"] = 0 if cfg.metric else num_classes
    for name in ("depth", "embed_dim", "num_heads"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    if cfg.model_name.startswith("mivit"):
        kwargs["grid"] = cfg.grid
        kwargs["mix_input"] = cfg.mode == "in-model"
    elif cfg.model_name.startswith("pevit") and cfg.mode == "in-model":
        kwargs["shuffle_input"] = True  # the trainer hands it its keys' generator (model.shuffle_generator)
    kwargs.update(cfg.extra)
    if cfg.model_name in ppml.models.MODEL_NAMES:
        return ppml.models.create_model(cfg.model_name, **kwargs)
    import timm

    return timm.create_model(cfg.model_name, pretrained=False, **kwargs)  # any timm model, never downloaded


def _encrypt_owner(cfg: TrainConfig, data, out_dir: str, d: Dist):
    """Owner mode: encrypt train and val once. The ciphertext is cached in DIR (a resumed run reuses it); the RS keys
    go to DIR/owner_keys.pt — what the data owner keeps, never read by the trainer."""
    import ppml

    cache = os.path.join(out_dir, "ciphertext.pt")
    if os.path.exists(cache):
        blob = torch.load(cache, map_location="cpu", weights_only=True)
        return blob["train_x"], blob["val_x"]
    gen = torch.Generator().manual_seed(cfg.key_seed) if cfg.key_seed is not None else None
    keys = {}
    if cfg.encryption == "rs":
        train_x, keys["train"] = ppml.shuffle_patches(data.train_x, cfg.patch_size, generator=gen)
        val_x, keys["val"] = ppml.shuffle_patches(data.val_x, cfg.patch_size, generator=gen)
    else:  # mi: keyless, the plain mean of the paper
        train_x = ppml.mix_subpatches(data.train_x, cfg.patch_size, cfg.grid)
        val_x = ppml.mix_subpatches(data.val_x, cfg.patch_size, cfg.grid)
    if d.main:
        atomic_save({"train_x": train_x, "val_x": val_x}, cache)
        if keys:
            atomic_save(keys, os.path.join(out_dir, "owner_keys.pt"))
    return train_x, val_x


def _check_encrypted(cfg: TrainConfig, manifest: dict) -> None:
    """--data DST from `ppml encrypt`: the run's settings must describe that ciphertext."""
    if "image_size" in manifest:  # ppml-wds: the same facts under its names
        manifest = {**manifest, "size": manifest["image_size"], "grid": manifest.get("mix_group")}
    want = {"encryption": manifest["scheme"], "patch_size": manifest["patch_size"], "img_size": manifest["size"],
            "mode": "owner"}
    if manifest["scheme"] == "mi":
        want["grid"] = manifest["grid"]
    wrong = {k: v for k, v in want.items() if getattr(cfg, k) != v}
    if wrong:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in want.items())
        got = " ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in wrong)
        raise ValueError(f"{_OP}: --data {cfg.data} holds {manifest['scheme']} ciphertext (patch "
                         f"{manifest['patch_size']}, {manifest['size']} px): pass {flags} (got {got})")


def _compiled(module: nn.Module, cfg: TrainConfig) -> nn.Module:
    """torch.compile(module) with the config's backend (checked by TrainConfig.check) and mode."""
    return torch.compile(module, backend=cfg.compile, mode=cfg.compile_mode)


def plain_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` without the ``_orig_mod.`` that torch.compile puts in the keys of a compiled module (or submodule):
    the plain module's state_dict, which is what checkpoints hold."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------------------- training


def _rank_generator(cfg: TrainConfig, epoch: int, d: Dist) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 7919 + epoch) * 65_537 + d.rank)


class _Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.d, self.device = init_distributed(cfg.device, _OP)
        self.out = cfg.out
        self.ckpt_path = os.path.join(self.out, "checkpoint.pt")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            raise ValueError(f"{_OP}: --amp needs a CUDA device, got --device {self.device}")

    # -- pieces -------------------------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.d.main:
            print(msg, file=sys.stderr, flush=True)

    def _setup(self, resume: bool):
        import ppml
        import ppml.augment as aug

        cfg, d = self.cfg, self.d
        ckpt = open_checkpoint(self.ckpt_path, self.out, resume, _OP)
        if ckpt is not None:
            saved = TrainConfig(**ckpt["config"])
            mine = dataclasses.replace(cfg, device=saved.device, amp=saved.amp, out=saved.out, compile=saved.compile,
                                       compile_mode=saved.compile_mode)
            if dataclasses.asdict(saved) != dataclasses.asdict(mine):
                diff = {k: (v, getattr(cfg, k)) for k, v in dataclasses.asdict(saved).items()
                        if getattr(mine, k) != v}
                raise ValueError(f"{_OP}: --resume with settings that differ from the checkpoint's: {diff}")

        t0 = time.perf_counter()
        if self._streams():
            self._setup_stream(ckpt is not None)
        else:
            self._setup_memory()
        feed = self.feed
        self._log(
            f"[ppml train] {cfg.data}: {feed.num_train} train / {feed.num_val} val images, {self.num_classes} "
            f"classes, {self.input_desc} ({cfg.encryption}, {cfg.mode}) in {time.perf_counter() - t0:.1f} s"
        )

        torch.manual_seed(cfg.seed)
        model = build_model(cfg, self.num_classes).to(self.device)
        self.criterion = None
        if cfg.metric:
            scale, pull = ANCHOR_DEFAULTS[cfg.metric]
            scale = cfg.anchor_scale if cfg.anchor_scale is not None else scale
            pull = cfg.anchor_pull if cfg.anchor_pull is not None else pull
            dim = model.num_features
            kind = cfg.anchor_kind if not (cfg.anchor_kind == "simplex" and dim < self.num_classes - 1) else "random"
            self.criterion = ppml.AnchorLoss(
                self.num_classes, dim, kind=kind, metric=cfg.metric, scale=scale, pull=pull, reduction="none",
                generator=torch.Generator().manual_seed(cfg.seed),
            ).to(self.device)
        self.model = model
        # Owner mode with a PE-free ViT: batches go in as patch tokens, cast and unfolded in one pass
        # (ppml.patch_tokens); the model's linear patch embedding equals its conv. In-model RS shuffles images.
        pevit = isinstance(model, ppml.models.PEFreeViT) and not model.shuffle_input and cfg.mode == "owner"
        self.token_patch = model.patch_embed.patch_size[0] if pevit else None
        self.ddp = nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
        if cfg.compile is not None:  # the training forward only; self.model (saved, evaluated) stays the plain module
            self.ddp = _compiled(self.ddp, cfg)
        # Weight decay on matrices only: not on biases, norms, the class token or position embeddings (as timm/DeiT).
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            (decay if p.ndim > 1 and "pos_embed" not in n and "token" not in n else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        self.steps_per_epoch = self.feed.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(
            cfg.epochs, self.steps_per_epoch, lr=cfg.lr, min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs))

        hflip = cfg.hflip if cfg.hflip is not None else (0.0 if cfg.data == "digits" else 0.5)
        # RS ciphertext: flips act on every patch in place — for a PE-free model exactly the flipped plain image
        # under another key. Plain images and MI ciphertext (whose model keeps its position embedding): the whole
        # image flips (flip(mix(x)) = mix(flip(x))).
        per_patch = cfg.encryption == "rs" and cfg.mode == "owner"
        self.geometric = aug.EncryptedAugment(cfg.cipher_patch, hflip=hflip, per_patch=per_patch)
        self.augment = aug.EncryptedAugment(
            cfg.cipher_patch, hflip=0.0, brightness=cfg.brightness, contrast=cfg.contrast, saturation=cfg.saturation,
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, patch_drop=cfg.patch_drop,
        )
        # Streamed uint8 ciphertext goes to the device as uint8 and through patch_tokens (cast, /255, patchify in one
        # pass) when nothing on the way needs floats (flips and rotations only move pixels): the same values as the
        # float path, bit for bit.
        if self.token_patch is not None and self.augment.moves_pixels_only and hasattr(self.feed, "keep_uint8"):
            self.feed.keep_uint8 = True
        self.start_epoch, self.start_step, self.rank_state = 0, 0, None
        if ckpt is not None:
            model.load_state_dict(plain_state_dict(ckpt["model"]))
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.start_epoch, self.start_step = ckpt["epoch"], ckpt["step"]
            if len(ckpt["rank_states"]) != d.world:
                raise ValueError(
                    f"{_OP}: the checkpoint was written by {len(ckpt['rank_states'])} ranks, this run has {d.world}"
                )
            if self.start_step:  # mid-epoch: this rank's generators and partial loss sums continue
                self.rank_state = ckpt["rank_states"][d.rank]
            if d.main:  # drop metric lines of epochs that will be run again ("epoch" counts completed epochs)
                keep_completed_epochs(self.metrics_path, self.start_epoch)
            self._log(f"[ppml train] resumed from {self.ckpt_path}: epoch {self.start_epoch + 1}, "
                      f"step {self.start_step}")
        elif d.main:
            open(self.metrics_path, "w").close()

    def _streams(self) -> bool:
        """Whether --data is streamed: ``stream`` None streams image folders and ppml-wds DSTs."""
        import ppml.data
        from ppml.data.stream import is_stream_dataset

        cfg = self.cfg
        can = cfg.data != "digits" and os.path.isdir(cfg.data) and (
            is_stream_dataset(cfg.data) or not ppml.data.is_encrypted_dataset(cfg.data))
        if cfg.stream and not can:
            raise ValueError(f"{_OP}: --stream needs --data FOLDER or a ppml-wds DST, got {cfg.data!r} (an old-format "
                             "DST or not a folder: pass --no-stream)")
        return can if cfg.stream is None else cfg.stream

    def _setup_memory(self) -> None:
        import ppml.data
        from ppml.data.stream import ShardSource, is_stream_dataset, load_stream_split

        cfg, d = self.cfg, self.d
        encrypted = ppml.data.is_encrypted_dataset(cfg.data)
        if encrypted and is_stream_dataset(cfg.data):  # a ppml-wds DST held in memory (--no-stream)
            source = ShardSource(cfg.data)
            _check_encrypted(cfg, source.manifest)
            source.verify(show=d.main)
            data, encrypted = load_stream_split(source), True
        elif encrypted:  # `ppml encrypt` output: the owner already encrypted it; the trainer reads ciphertext only
            data, manifest = ppml.data.load_encrypted(cfg.data)
            _check_encrypted(cfg, manifest)
        else:
            data = ppml.data.load_dataset(cfg.data, cfg.img_size)
        # the run folder is made once the data are in hand: a refused or failed load leaves nothing behind
        make_run_dir(self.out, d)
        self.skipped = list(getattr(data, "skipped", []))
        if self.skipped:  # as `ppml encrypt` does: unreadable images are left out, listed and counted
            self._report_skipped(self.skipped)
        self.classes = data.classes
        self.num_classes = data.num_classes
        if encrypted:
            train_x, val_x = data.train_x, data.val_x
        elif cfg.encryption != "none" and cfg.mode == "owner":
            if d.world > 1 and not d.main:
                dist.barrier()  # rank 0 encrypts and writes the cache first, the others read it
            train_x, val_x = _encrypt_owner(cfg, data, self.out, d)
            if d.world > 1 and d.main:
                dist.barrier()
        else:
            train_x, val_x = data.train_x, data.val_x
        self.feed = MemoryFeed(train_x, data.train_y, val_x, data.val_y, cfg.batch_size, cfg.seed, d)
        self.input_desc = f"input {self.feed.input_shape}"

    def _setup_stream(self, resumed: bool) -> None:
        from ppml.data.datasets import folder_index
        from ppml.data.stream import FolderSource, OwnerEncryption, ShardSource, is_stream_dataset

        from .feed import StreamFeed

        cfg, d = self.cfg, self.d
        if is_stream_dataset(cfg.data):
            source = ShardSource(cfg.data)
            _check_encrypted(cfg, source.manifest)
            if d.main:
                source.verify()
            make_run_dir(self.out, d)
            what = f"{len(source.names)} shard(s)"
        else:
            source = FolderSource(cfg.data, cfg.img_size, folder_index(cfg.data))
            make_run_dir(self.out, d)
            if cfg.encryption != "none" and cfg.mode == "owner":
                seed = self._owner_key_seed(resumed) if cfg.encryption == "rs" else 0  # MI is keyless
                source.owner = OwnerEncryption(cfg.encryption, cfg.patch_size, cfg.grid, seed)
            what = "image files"
        self.skipped = []
        skipped_path = os.path.join(self.out, "skipped.json")
        if resumed and os.path.exists(skipped_path):
            with open(skipped_path) as fh:
                self.skipped = json.load(fh)["skipped"]
        self.classes = list(source.classes)
        self.num_classes = len(self.classes)
        self.feed = StreamFeed(source, cfg.batch_size, cfg.seed, cfg.shuffle_buffer, cfg.workers, d)
        self.input_desc = (f"streamed from {what} by {max(1, cfg.workers)} worker(s) per rank, shuffle buffer "
                           f"{cfg.shuffle_buffer}")

    def _owner_key_seed(self, resumed: bool) -> int:
        """Streaming a folder in owner mode, the trainer is the owner: the seed of every image's key is drawn once
        (OS entropy unless --key-seed), kept in DIR/owner_keys.pt and read back by --resume."""
        import secrets

        path = os.path.join(self.out, "owner_keys.pt")
        if resumed:
            return int(torch.load(path, weights_only=True)["stream_key_seed"])
        box = [self.cfg.key_seed if self.cfg.key_seed is not None else secrets.randbits(62)]
        if self.d.world > 1:
            dist.broadcast_object_list(box, src=0)
        if self.d.main:
            atomic_save({"stream_key_seed": box[0]}, path)
        return int(box[0])

    def _note_skipped(self) -> None:
        """Streaming: the unreadable images the workers met (all ranks), logged and kept in DIR/skipped.json."""
        new = self.feed.take_skipped()
        if self.d.world > 1:
            every = [None] * self.d.world
            dist.all_gather_object(every, new)
            new = [s for part in every for s in part]
        known = {s["path"] for s in self.skipped}
        new = [s for s in new if s["path"] not in known and not known.add(s["path"])]
        if new:
            self.skipped += new
            self._report_skipped(new)

    def _report_skipped(self, new: list[dict]) -> None:
        cfg = self.cfg
        shown = "; ".join(f"{s['path']} ({s['error']})" for s in new[:10])
        more = f"; ... ({len(new) - 10} more in {self.out}/skipped.json)" if len(new) > 10 else ""
        self._log(f"[ppml train] skipped {len(new)} unreadable image(s) of {cfg.data}: {shown}{more}")
        if self.d.main:
            with open(os.path.join(self.out, "skipped.json"), "w") as fh:
                json.dump({"skipped": self.skipped}, fh, indent=1)

    def _loss(self, out: Tensor, ya: Tensor, yb: Tensor, lam: Tensor) -> Tensor:
        if self.criterion is None:
            ls = self.cfg.label_smoothing
            la = F.cross_entropy(out.float(), ya, reduction="none", label_smoothing=ls)
            lb = F.cross_entropy(out.float(), yb, reduction="none", label_smoothing=ls)
        else:
            la, lb = self.criterion(out.float(), ya), self.criterion(out.float(), yb)
        return (lam * la + (1 - lam) * lb).mean()

    def _predict(self, out: Tensor) -> Tensor:
        return out.argmax(1) if self.criterion is None else self.criterion.predict(out.float())

    def _prepare(self, x: Tensor, y: Tensor, gen: torch.Generator):
        x = self.geometric(x, y, generator=gen)[0]
        x, ya, yb, lam = self.augment(x, y, generator=gen)
        return self._model_input(x), ya, yb, lam.to(x.device)

    def _model_input(self, x: Tensor) -> Tensor:
        import ppml

        return ppml.patch_tokens(x, self.token_patch) if self.token_patch is not None else x

    @torch.no_grad()
    def evaluate(self) -> float:
        cfg, d = self.cfg, self.d
        self.model.eval()
        correct = torch.zeros(2, dtype=torch.float64)
        # In-model RS: the model shuffles the validation images too, with keys fixed for the run (same seed every
        # epoch); the training generator is handed back afterwards.
        train_gen = self._keys(torch.Generator().manual_seed(cfg.seed + 1))
        for x, y in self.feed.val_batches():
            pred = self._predict(autocast_forward(self.model, self._model_input(x.to(self.device)), self.amp)).cpu()
            correct += torch.tensor([(pred == y).sum().item(), len(y)], dtype=torch.float64)
        self._keys(train_gen)
        if d.world > 1:
            dist.all_reduce(correct)
        self.model.train()
        return float(correct[0] / correct[1])

    def _keys(self, gen: torch.Generator | None) -> torch.Generator | None:
        """In-model RS: ``gen`` becomes the generator the model draws its keys from (after the augmentation's draws
        of the same step, as they always were); returns the previous one."""
        old = getattr(self.model, "shuffle_generator", None)
        if getattr(self.model, "shuffle_input", False):
            self.model.shuffle_generator = gen
        return old

    def _save(self, epoch: int, step: int, gen: torch.Generator) -> None:
        d = self.d
        state = (gen.get_state(), torch.get_rng_state(), list(self.epoch_loss))
        states, digests = gather_in_sync(state, self.model, d, _OP)
        self.last_digests = digests
        if d.main:
            atomic_save(
                {
                    "config": dataclasses.asdict(self.cfg),
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "rank_states": states,
                    "param_digests": digests,
                    "classes": self.classes,
                },
                self.ckpt_path,
            )
        if d.world > 1:
            dist.barrier()

    def _stopped(self, epoch: int, step: int) -> dict:
        """The result of a run stopped by --stop-after before step ``step`` of epoch index ``epoch`` (printed as one
        JSON line by rank 0 only; "epoch" is 1-based there, as in the log)."""
        result = {"stopped": True, "epoch": epoch + 1, "step": step, "param_digests": self.last_digests}
        print_result(result, self.d)
        return result

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        cfg, d = self.cfg, self.d
        self._setup(resume)
        if self.start_epoch >= cfg.epochs:
            self._log(f"[ppml train] {self.out} is complete ({cfg.epochs} epochs): nothing to resume")
            with open(os.path.join(self.out, "summary.json")) as fh:
                final = json.load(fh)
            print_result(final, d)
            return final
        steps_run = 0
        summary: dict[str, Any] = {}
        self.epoch_loss = [0.0, 0]
        with StopRequest() as stop:
            for epoch in range(self.start_epoch, cfg.epochs):
                steps = self.steps_per_epoch
                gen = _rank_generator(cfg, epoch, d)
                first = 0
                if epoch == self.start_epoch and self.rank_state is not None:
                    first = self.start_step
                    gen_state, rng_state, self.epoch_loss = self.rank_state
                    gen.set_state(gen_state)
                    torch.set_rng_state(rng_state)
                else:
                    self.epoch_loss = [0.0, 0]
                    # dropout / drop-path draw from the global generator: seeded per (epoch, rank)
                    torch.manual_seed(cfg.seed * 7919 + epoch * 104_729 + d.rank)
                self._keys(gen)
                self.model.train()
                t0 = time.perf_counter()
                bar = progress(range(first, steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", enabled=d.main,
                               leave=False)
                done = first
                for step, (xb, yb_) in zip(bar, self.feed.train_batches(epoch, first), strict=False):
                    done += 1
                    x, ya, yb, lam = self._prepare(xb.to(self.device), yb_.to(self.device), gen)
                    out = autocast_forward(self.ddp, x, self.amp)
                    loss = self._loss(out, ya, yb, lam)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"{_OP}: loss is {loss.item()} at epoch {epoch + 1} step {step}")
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                    self.sched.step()
                    self.epoch_loss[0] += loss.item() * len(yb_)
                    self.epoch_loss[1] += len(yb_)
                    steps_run += 1
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.sched.get_last_lr()[0]:.2e}")
                    halt = stop_after is not None and steps_run >= stop_after
                    if any_rank(halt or stop.signum is not None, d, self.device) and step + 1 < steps:
                        self._note_skipped()
                        self._save(epoch, step + 1, gen)
                        why = f"signal {stop.signum}" if stop.signum is not None else f"--stop-after {stop_after}"
                        self._log(f"[ppml train] stopped ({why}) at epoch {epoch + 1} step {step + 1}; "
                                  f"checkpoint {self.ckpt_path}: continue with --resume")
                        if stop.signum is not None:
                            raise SystemExit(130)
                        return self._stopped(epoch, step + 1)
                train_s = time.perf_counter() - t0
                if done != steps:
                    raise RuntimeError(f"{_OP}: the data ended after step {done} of {steps} in epoch {epoch + 1}")
                tl = torch.tensor(self.epoch_loss, dtype=torch.float64)
                if d.world > 1:
                    dist.all_reduce(tl)
                acc = self.evaluate()
                self._note_skipped()
                row = {
                    "epoch": epoch + 1,
                    "train_loss": float(tl[0] / max(tl[1], 1)),
                    "val_acc": acc,
                    "lr": self.sched.get_last_lr()[0],
                    "train_s": round(train_s, 3),
                    "world_size": d.world,
                }
                self.epoch_loss = [0.0, 0]
                self._save(epoch + 1, 0, gen)  # the next epoch seeds its own generators
                row["param_digest"] = self.last_digests[0]
                if d.main:
                    with open(self.metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    self._log(
                        f"[ppml train] epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, "
                        f"val acc {acc:.4f}, {train_s:.1f} s"
                    )
                summary = row
                if any_rank(stop.signum is not None, d, self.device) and epoch + 1 < cfg.epochs:
                    self._log(f"[ppml train] stopped (signal) after epoch {epoch + 1}: continue with --resume")
                    raise SystemExit(130)
                if stop_after is not None and steps_run >= stop_after and epoch + 1 < cfg.epochs:
                    return self._stopped(epoch + 1, 0)
        final = {
            "final": True,
            "epochs": cfg.epochs,
            "val_acc": summary.get("val_acc"),
            "train_loss": summary.get("train_loss"),
            "model": cfg.model_name,
            "encryption": cfg.encryption,
            "mode": cfg.mode,
            "loss": cfg.loss,
            "param_digests": getattr(self, "last_digests", None),
            "skipped_images": len(self.skipped),
        }
        write_summary(self.out, final, d)
        return final


def run(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Entry point for the CLI: trains (or resumes), then tears the process group down.

    A new run that fails or is interrupted before its first checkpoint removes the run folder it made (nothing in it
    could be resumed); Ctrl-C before the first step raises KeyboardInterrupt with a one-line message."""
    out = os.path.abspath(cfg.out)
    made = not os.path.exists(out)
    try:
        return _Trainer(cfg).run(resume=resume, stop_after=stop_after)
    except BaseException as exc:
        ckpt = os.path.join(out, "checkpoint.pt")
        if made and not resume and os.path.isdir(out) and not os.path.exists(ckpt) and _rank0():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        if type(exc) is KeyboardInterrupt:
            kept = (f"the last checkpoint {ckpt} is kept; continue with the same command plus --resume"
                    if os.path.exists(ckpt) else f"no checkpoint was written ({cfg.out} removed); re-run the command")
            raise KeyboardInterrupt(f"[ppml train] interrupted: {kept}") from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
