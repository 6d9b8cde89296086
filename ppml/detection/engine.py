"""``ppml detect train`` / ``eval``: training a YOLOS-style detector on encrypted images, COCO evaluation.

Conventions of ``ppml train`` (and its runtime, :mod:`ppml.train.runtime`): a checkpoint after every
epoch; SIGINT / SIGTERM / ``stop_after`` finish the step and write one; ``resume`` continues exactly (the run's random
draws are functions of (seed, epoch, image) and (key seed, epoch, step), and the checkpoint holds the global RNG
state); ``DIR/metrics.jsonl`` (one line per epoch), ``DIR/summary.json``; tqdm progress on stderr; torchrun DDP
(gloo on CPU; nccl on GPU, gloo for CPU tensors; cuda:LOCAL_RANK per process) with torch's DistributedSampler,
identical parameters checked at every checkpoint.

The trainer only ever receives ciphertext and the targets of :class:`~ppml.detection.data.Owner`; the owner's part
(augmenting the plain images, encrypting, and at evaluation decoding predictions with the RS keys) runs in the
data pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._progress import progress
from ..train import runtime
from .data import Augment, CocoDetection, Owner, prepare_image, resolve_coco
from .losses import SetCriterion
from .matcher import HungarianMatcher
from .model import ENCRYPTIONS, HEADS, PRIORS, build_detector, default_backbone
from .synthetic import make_synthetic_coco

_OP = "ppml detect"
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# Defaults that depend on the data. The built-in set: a small ViT that trains on a 2-core CPU in minutes. Real data
# (a COCO folder): YOLOS-S — ViT-S (width 384, depth 12, 6 heads; the backbone's own size), 100 [DET] tokens,
# patch 16, a 512-pixel canvas, AdamW 1e-4, 150 epochs (YOLOS's schedule, here without pre-trained weights).
SYNTHETIC_DEFAULTS = dict(img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_det_tokens=10,
                          batch_size=16, lr=1e-3, epochs=10)
COCO_DEFAULTS = dict(img_size=512, patch_size=16, embed_dim=None, depth=None, num_heads=None, num_det_tokens=100,
                     batch_size=8, lr=1e-4, epochs=150)
# Settings a resumed or evaluated run may change freely.
_FREE = ("device", "amp", "out", "workers", "eval_every")


@dataclass
class DetectConfig:
    """Everything a detection run depends on; saved in every checkpoint (``resume`` refuses a different one).
    ``None`` means the data-dependent default (:data:`SYNTHETIC_DEFAULTS` for ``data="synthetic"``, else
    :data:`COCO_DEFAULTS`; :meth:`value` resolves it)."""

    data: str = "synthetic"
    synthetic_root: str | None = None
    synthetic_train: int = 1000
    synthetic_val: int = 200
    train_split: str = "train"
    val_split: str = "val"
    encryption: str = "none"
    head: str | None = None
    backbone: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    grid: int = 2
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    num_det_tokens: int | None = None
    membership_dim: int = 64
    det_prior: str | None = None
    drop_path: float = 0.0
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    clip_grad: float = 0.1
    eos_coef: float = 0.1
    hflip: float = 0.5
    crop: float = 0.5
    crop_min: float = 0.5
    scale_min: float = 0.6
    seed: int = 0
    key_seed: int | None = None
    device: str = "auto"
    amp: bool | None = None
    workers: int = 0
    eval_every: int = 1
    out: str = "runs/detect"

    @property
    def synthetic(self) -> bool:
        return self.data == "synthetic"

    def value(self, name: str) -> Any:
        """The setting, with ``None`` replaced by the data-dependent default."""
        v = getattr(self, name)
        if v is None and name in SYNTHETIC_DEFAULTS:
            v = (SYNTHETIC_DEFAULTS if self.synthetic else COCO_DEFAULTS)[name]
        if v is None and name == "head":
            v = "membership" if self.encryption == "rs" else "box"
        return v

    def check(self) -> None:
        if self.encryption not in ENCRYPTIONS:
            raise ValueError(f"{_OP}: --encryption must be one of {', '.join(ENCRYPTIONS)}, got {self.encryption!r}")
        if self.value("head") not in HEADS:
            raise ValueError(f"{_OP}: --head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.det_prior is not None and self.det_prior not in PRIORS:
            raise ValueError(f"{_OP}: --det-prior must be one of {', '.join(PRIORS)}, got {self.det_prior!r}")
        for name in ("img_size", "patch_size", "grid", "epochs", "batch_size", "num_det_tokens", "synthetic_train",
                     "synthetic_val", "membership_dim"):
            v = self.value(name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{_OP}: --{name.replace('_', '-')} must be a positive int, got {v!r}")
        if self.value("img_size") % self.value("patch_size"):
            raise ValueError(f"{_OP}: --patch-size must divide --img-size, got patch_size={self.value('patch_size')}, "
                             f"img_size={self.value('img_size')}")
        if self.encryption == "mi" and self.value("patch_size") % self.grid:
            raise ValueError(f"{_OP}: --grid must divide --patch-size, got grid={self.grid}, "
                             f"patch_size={self.value('patch_size')}")
        if not (self.value("lr") > 0 and self.min_lr >= 0 and self.warmup_epochs >= 0 and self.weight_decay >= 0
                and self.clip_grad >= 0):
            raise ValueError(f"{_OP}: --lr must be > 0 and --min-lr, --warmup-epochs, --weight-decay, --clip-grad >= 0")
        if not isinstance(self.workers, int) or self.workers < 0 or not isinstance(self.eval_every, int) \
                or self.eval_every < 0:
            raise ValueError(f"{_OP}: --workers and --eval-every must be ints >= 0, got {self.workers!r}, "
                             f"{self.eval_every!r}")
        Augment(self.hflip, self.crop, self.crop_min, self.scale_min).check()

    def build_model(self, num_classes: int) -> nn.Module:
        return build_detector(
            num_classes, encryption=self.encryption, backbone=self.backbone, img_size=self.value("img_size"),
            patch_size=self.value("patch_size"), grid=self.grid, embed_dim=self.value("embed_dim"),
            depth=self.value("depth"), num_heads=self.value("num_heads"), num_det_tokens=self.value("num_det_tokens"),
            head=self.value("head"), drop_path=self.drop_path, membership_dim=self.membership_dim,
            det_prior=self.det_prior,
        )

    def owner(self) -> Owner:
        return Owner(self.encryption, self.value("patch_size"), self.value("img_size"), grid=self.grid,
                     head=self.value("head"))


def saved_config(ckpt: dict) -> dict:
    """A checkpoint's DetectConfig fields. Checkpoints written before ``det_prior`` existed were plain YOLOS."""
    return {"det_prior": "none", **ckpt["config"]}


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so every (seed, epoch, image) has its own stream."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def load_splits(cfg: DetectConfig, d: runtime.Dist | None = None) -> tuple[CocoDetection, CocoDetection]:
    """The train and validation sets of a config (making the built-in set first, on rank 0, if needed)."""
    d = d or runtime.Dist()
    root = cfg.data
    if cfg.synthetic:
        root = cfg.synthetic_root or os.path.join(cfg.out, "synthetic")
        if d.main:
            make_synthetic_coco(root, cfg.synthetic_train, cfg.synthetic_val, seed=0)
        if d.world > 1:
            dist.barrier()
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"{_OP}: --data must be 'synthetic' or a COCO folder (ROOT/annotations/"
                                f"instances_<split>.json + ROOT/<split>/), got {root!r}")
    train = CocoDetection(*resolve_coco(root, cfg.train_split), cache=cfg.synthetic)
    val = CocoDetection(*resolve_coco(root, cfg.val_split), categories=train.categories, cache=cfg.synthetic)
    return train, val


class _TrainBatches(torch.utils.data.Dataset):
    """Batch ``j`` of an epoch from step ``first`` on, as the owner hands it over: augmented, encrypted, with the
    trainer's targets (the RS keys are dropped here: the trainer never gets them). Runs in DataLoader workers."""

    def __init__(self, dataset: CocoDetection, batches: list, first: int, epoch: int, cfg: DetectConfig,
                 owner: Owner) -> None:
        self.dataset, self.batches, self.first, self.epoch, self.cfg, self.owner = (
            dataset, batches, first, epoch, cfg, owner)
        self.augment = Augment(cfg.hflip, cfg.crop, cfg.crop_min, cfg.scale_min)

    def __len__(self) -> int:
        return len(self.batches) - self.first

    def __getitem__(self, j: int):
        step = self.first + j
        canvases, targets = [], []
        for i in self.batches[step].tolist():
            gen = torch.Generator().manual_seed(_mix(self.cfg.seed, self.epoch, i))
            c, t = prepare_image(*self.dataset[i], self.cfg.value("img_size"), augment=self.augment, generator=gen)
            canvases.append(c)
            targets.append(t)
        keys = None if self.cfg.key_seed is None else torch.Generator().manual_seed(
            _mix(self.cfg.key_seed, self.epoch, step))
        x, trainer_targets, _ = self.owner.encrypt(torch.stack(canvases), targets, generator=keys)
        return x, trainer_targets


def _to(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in t.items()} for t in targets]


def coco_evaluate(ann_file: str, results: list[dict], image_ids: list[int] | None = None,
                  log: bool = True) -> dict[str, float]:
    """COCO box AP with pycocotools' ``COCOeval``.

    Args:
        ann_file: the ground-truth instances file.
        results: detections ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original pixels.
        image_ids: evaluate these images only (default: all of the file).
        log: print COCOeval's 12-line summary to stderr.

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (COCOeval's first six stats; −1 where the ground
        truth has no object of that size; all 0 when there is no detection at all).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sink = sys.stderr if log else open(os.devnull, "w")
    try:
        with contextlib.redirect_stdout(sink):
            gt = COCO(ann_file)
            if not results:
                print(f"[{_OP}] no detections: AP = 0")
                return dict.fromkeys(AP_NAMES, 0.0)
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            if image_ids is not None:
                ev.params.imgIds = sorted(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    finally:
        if not log:
            sink.close()
    return {k: float(v) for k, v in zip(AP_NAMES, ev.stats[:6], strict=True)}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoDetection, cfg: DetectConfig, device: torch.device,
             d: runtime.Dist | None = None, *, batch_size: int | None = None, amp: bool = False, log: bool = True,
             owner: Owner | None = None) -> dict[str, float]:
    """COCO AP of ``model`` on ``dataset``: the owner prepares (no augmentation) and encrypts every image, the model
    predicts on the ciphertext, the owner decodes the predictions (with the RS keys) and maps them back to original
    pixels. Under DDP each rank takes every world-th image; rank 0 runs COCOeval and every rank gets the result.
    RS keys: from ``cfg.key_seed`` (then reproducible), else OS entropy. ``owner``: another :class:`Owner` (default
    ``cfg.owner()``), e.g. one that decodes without the keys, to measure what the predictions give away."""
    d = d or runtime.Dist()
    owner, size = owner or cfg.owner(), cfg.value("img_size")
    was_training = model.training
    model.eval()
    results: list[dict] = []
    idx = list(range(d.rank, len(dataset), d.world))
    bs = batch_size or 2 * cfg.value("batch_size")
    cats = [c["id"] for c in dataset.categories]
    for k, start in enumerate(range(0, len(idx), bs)):
        items = [prepare_image(*dataset[i], size) for i in idx[start : start + bs]]
        gen = None if cfg.key_seed is None else torch.Generator().manual_seed(_mix(cfg.key_seed, -1, d.rank, k))
        x, _, keys = owner.encrypt(torch.stack([c for c, _ in items]), [t for _, t in items], generator=gen)
        scores, labels, boxes = owner.detections(runtime.autocast_forward(model, x.to(device), amp), keys)
        for (_, t), s, lab, box in zip(items, scores.cpu(), labels.cpu(), boxes.cpu(), strict=True):
            sx, sy = t["scale"]
            h, w = t["orig_size"]
            xyxy = box * size / torch.tensor([sx, sy, sx, sy])
            xyxy = torch.minimum(xyxy.clamp(min=0), torch.tensor([w, h, w, h], dtype=torch.float32))
            for sc, lb, (x0, y0, x1, y1) in zip(s.tolist(), lab.tolist(), xyxy.tolist(), strict=True):
                results.append({"image_id": t["image_id"], "category_id": cats[lb], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": sc})
    if d.world > 1:
        gathered: list = [None] * d.world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    stats = [None]
    if d.main:
        ids = [im["id"] for im in dataset.images]
        stats = [coco_evaluate(dataset.ann_file, results, ids, log=log)]
    if d.world > 1:
        dist.broadcast_object_list(stats, src=0)
    model.train(was_training)
    return stats[0]


class _DetectRun:
    def __init__(self, cfg: DetectConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.d, self.device = runtime.init_distributed(cfg.device, _OP)
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        self.amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        if self.amp and self.device.type != "cuda":
            raise ValueError(f"{_OP}: --amp needs a CUDA device, got --device {self.device}")

    def _log(self, msg: str) -> None:
        if self.d.main:
            print(f"[{_OP}] {msg}", file=sys.stderr, flush=True)

    def _load_checkpoint(self, resume: bool) -> dict | None:
        cfg, d = self.cfg, self.d
        runtime.make_run_dir(cfg.out, d)
        ckpt = runtime.open_checkpoint(self.ckpt_path, cfg.out, resume, _OP)
        if ckpt is None:
            return None
        saved, mine = saved_config(ckpt), dataclasses.asdict(cfg)
        changed = {k: (saved.get(k), v) for k, v in mine.items() if k not in _FREE and saved.get(k) != v}
        if changed:
            raise ValueError(f"{_OP}: --resume with settings that differ from the checkpoint's (saved, given): "
                             f"{changed}")
        return ckpt

    def setup(self, resume: bool) -> None:
        cfg, d = self.cfg, self.d
        ckpt = self._load_checkpoint(resume)
        t0 = time.perf_counter()
        self.train_set, self.val_set = load_splits(cfg, d)
        self._log(f"{cfg.data}: {len(self.train_set)} train / {len(self.val_set)} val images, "
                  f"{self.train_set.num_classes} classes, canvas {cfg.value('img_size')} px, encryption "
                  f"{cfg.encryption}, head {cfg.value('head')} ({time.perf_counter() - t0:.1f} s)")
        torch.manual_seed(cfg.seed)
        self.model = cfg.build_model(self.train_set.num_classes).to(self.device)
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if d.world > 1 else self.model
        self.criterion = SetCriterion(self.train_set.num_classes, HungarianMatcher(),
                                      eos_coef=cfg.eos_coef).to(self.device)
        self.owner = cfg.owner()
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(self.model, cfg.weight_decay,
                                           no_weight_decay_list=("*pos_embed", "det_token", "det_reference"))
        self.opt = torch.optim.AdamW(groups, lr=cfg.value("lr"))
        self.steps_per_epoch = len(self._epoch_order(0))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, runtime.warmup_cosine(
            cfg.value("epochs"), self.steps_per_epoch, lr=cfg.value("lr"), min_lr=cfg.min_lr,
            warmup_epochs=cfg.warmup_epochs))
        self.start_epoch, self.start_step, self.rank_state = 0, 0, None
        if ckpt is None:
            if d.main:
                open(self.metrics_path, "w").close()
            return
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt["step"]
        if len(ckpt["rank_states"]) != d.world:
            raise ValueError(f"{_OP}: the checkpoint was written by {len(ckpt['rank_states'])} processes, this run "
                             f"has {d.world}")
        if self.start_step:
            self.rank_state = ckpt["rank_states"][d.rank]
        if d.main:  # keep the lines of completed epochs only
            runtime.keep_completed_epochs(self.metrics_path, self.start_epoch)
        self._log(f"resumed from {self.ckpt_path} at epoch {self.start_epoch + 1}, step {self.start_step}")

    def _epoch_order(self, epoch: int) -> list[torch.Tensor]:
        return runtime.epoch_order(len(self.train_set), self.cfg.value("batch_size"), self.cfg.seed, epoch, self.d)

    def save(self, epoch: int, step: int) -> None:
        d = self.d
        states, self.digests = runtime.gather_in_sync((torch.get_rng_state(), dict(self.sums)), self.model, d, _OP)
        if d.main:
            runtime.atomic_save({"config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                          "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "epoch": epoch,
                          "step": step, "rank_states": states, "param_digests": self.digests,
                          "categories": self.train_set.categories}, self.ckpt_path)
        if d.world > 1:
            dist.barrier()

    def _stop(self, epoch: int, step: int, why: str | None) -> dict:
        self.save(epoch, step)
        self._log(f"stopped ({why}) at epoch {epoch + 1} step {step}; checkpoint {self.ckpt_path}: continue with "
                  f"--resume")
        result = {"stopped": True, "epoch": epoch + 1, "step": step, "param_digests": self.digests}
        runtime.print_result(result, self.d)
        return result

    def _train_step(self, x: torch.Tensor, targets: list[dict]) -> dict[str, float]:
        out = runtime.autocast_forward(self.ddp, x.to(self.device), self.amp)
        losses = self.criterion(out, _to(targets, self.device))
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{_OP}: loss is {loss.item()} ({ {k: v.item() for k, v in losses.items()} })")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.opt.step()
        self.sched.step()
        return {k: v.item() for k, v in losses.items()}

    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        cfg, d = self.cfg, self.d
        self.setup(resume)
        epochs = cfg.value("epochs")
        if self.start_epoch >= epochs:
            self._log(f"{cfg.out} is complete ({epochs} epochs): nothing to resume")
            with open(os.path.join(cfg.out, "summary.json")) as fh:
                final = json.load(fh)
            runtime.print_result(final, d)
            return final
        steps_run, row, ap = 0, {}, None
        with runtime.StopRequest() as stop:
            for epoch in range(self.start_epoch, epochs):
                batches = self._epoch_order(epoch)
                first = 0
                if epoch == self.start_epoch and self.rank_state is not None:
                    first = self.start_step
                    rng, self.sums = self.rank_state
                    torch.set_rng_state(rng)
                else:
                    self.sums = {}
                    torch.manual_seed(_mix(cfg.seed, epoch, d.rank))  # dropout / drop path
                loader = torch.utils.data.DataLoader(
                    _TrainBatches(self.train_set, batches, first, epoch, cfg, self.owner), batch_size=None,
                    shuffle=False, num_workers=cfg.workers, persistent_workers=False,
                )
                self.model.train()
                t0 = time.perf_counter()
                bar = progress(loader, desc=f"epoch {epoch + 1}/{epochs}", enabled=d.main, leave=False,
                               total=len(batches) - first)
                for step, (x, targets) in enumerate(bar, start=first):
                    losses = self._train_step(x, targets)
                    for k, v in losses.items():
                        self.sums[k] = self.sums.get(k, 0.0) + v
                    self.sums["steps"] = self.sums.get("steps", 0) + 1
                    steps_run += 1
                    bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self.sched.get_last_lr()[0]:.1e}")
                    halt = stop_after is not None and steps_run >= stop_after
                    if runtime.any_rank(halt or stop.signum is not None, d, self.device) and step + 1 < len(batches):
                        why = f"signal {stop.signum}" if stop.signum is not None else f"--stop-after {stop_after}"
                        result = self._stop(epoch, step + 1, why)
                        if stop.signum is not None:
                            raise SystemExit(130)
                        return result
                train_s = time.perf_counter() - t0
                sums = torch.tensor([self.sums.get(k, 0.0) for k in sorted(self.sums)], dtype=torch.float64)
                if d.world > 1:
                    dist.all_reduce(sums)
                n = max(self.sums.get("steps", 1) * d.world, 1)
                means = {("train_" + k if k == "loss" else k): float(v) / n
                         for k, v in zip(sorted(self.sums), sums.tolist(), strict=True) if k != "steps"}
                row = {"epoch": epoch + 1, **means,
                       "lr": self.sched.get_last_lr()[0], "train_s": round(train_s, 3), "world_size": d.world}
                last = epoch + 1 == epochs
                if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                    t1 = time.perf_counter()
                    ap = evaluate(self.model, self.val_set, cfg, self.device, d, amp=self.amp)
                    row.update(ap, eval_s=round(time.perf_counter() - t1, 3))
                self.sums = {}
                self.save(epoch + 1, 0)
                row["param_digest"] = self.digests[0]
                if d.main:
                    with open(self.metrics_path, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    aps = f", AP {row['AP']:.3f} AP50 {row['AP50']:.3f}" if "AP" in row else ""
                    self._log(f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}{aps}, {train_s:.1f} s")
                if not last and runtime.any_rank(stop.signum is not None, d, self.device):
                    self._log(f"stopped (signal) after epoch {epoch + 1}: continue with --resume")
                    raise SystemExit(130)
                if not last and stop_after is not None and steps_run >= stop_after:
                    return self._stop(epoch + 1, 0, f"--stop-after {stop_after}")
        final = {"final": True, "epochs": epochs, **(ap or {}), "train_loss": row.get("train_loss"),
                 "encryption": cfg.encryption, "head": cfg.value("head"), "det_prior": self.model.det_prior,
                 "backbone": cfg.backbone or default_backbone(cfg.encryption),
                 "param_digests": getattr(self, "digests", None)}
        runtime.write_summary(cfg.out, final, d)
        return final


def train(cfg: DetectConfig, resume: bool = False, stop_after: int | None = None) -> dict:
    """Trains (or resumes) a detector; returns the summary (or, when stopped, ``{"stopped": True, ...}``)."""
    try:
        return _DetectRun(cfg).run(resume=resume, stop_after=stop_after)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def evaluate_run(out: str, *, checkpoint: str | None = None, data: str | None = None, split: str | None = None,
                 batch_size: int | None = None, device: str = "auto", key_seed: int | None = None,
                 save: bool = True) -> dict:
    """``ppml detect eval``: COCO AP of a run's checkpoint on its validation split (or ``data`` / ``split``).

    Writes ``OUT/eval.json`` (when ``save``) and returns ``{AP, AP50, AP75, APs, APm, APl, images, ...}``."""
    path = checkpoint or os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{_OP} eval: no checkpoint at {path!r} (train with `ppml detect train --out DIR`)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = DetectConfig(**saved_config(ckpt))
    if data is not None:
        cfg.data = data
    if split is not None:
        cfg.val_split = split
    if key_seed is not None:
        cfg.key_seed = key_seed
    cfg.device = device
    d, dev = runtime.init_distributed(device, f"{_OP} eval")
    try:
        if cfg.synthetic:
            root = cfg.synthetic_root or os.path.join(cfg.out, "synthetic")
            if not os.path.isdir(root):  # a run directory that moved: regenerate next to the checkpoint
                cfg.synthetic_root = os.path.join(os.path.dirname(os.path.abspath(path)), "synthetic")
            _, val = load_splits(cfg, d)
        else:
            val = CocoDetection(*resolve_coco(cfg.data, cfg.val_split), categories=ckpt["categories"])
        model = cfg.build_model(len(ckpt["categories"]))
        model.load_state_dict(ckpt["model"])
        model.to(dev)
        t0 = time.perf_counter()
        amp = cfg.amp if cfg.amp is not None else dev.type == "cuda"
        stats = evaluate(model, val, cfg, dev, d, batch_size=batch_size, amp=amp)
        result = {**stats, "images": len(val), "epoch": ckpt["epoch"], "step": ckpt["step"],
                  "encryption": cfg.encryption, "head": cfg.value("head"), "det_prior": model.det_prior,
                  "split": cfg.val_split,
                  "eval_s": round(time.perf_counter() - t0, 3)}
        if d.main:
            if save:
                with open(os.path.join(out, "eval.json"), "w") as fh:
                    json.dump(result, fh)
            print(f"[{_OP}] " + ", ".join(f"{k} {result[k]:.3f}" for k in AP_NAMES), file=sys.stderr)
            print(json.dumps(result), flush=True)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
