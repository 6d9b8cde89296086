"""Where ``ppml train`` gets its batches: tensors in memory, or a stream (:mod:`ppml.data.stream`) read by DataLoader
workers in bounded memory.

Both feeds give the trainer the same three things: ``steps_per_epoch`` (the same on every rank),
``train_batches(epoch, first)`` (this rank's batches of the epoch from step ``first`` on, exactly those an
uninterrupted epoch would take there) and ``val_batches()`` (this rank's share of the validation split).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .runtime import Dist, epoch_order

__all__ = ["MemoryFeed", "StreamFeed"]


class MemoryFeed:
    """Tensors held in memory: torch's DistributedSampler order per epoch (:func:`ppml.train.runtime.epoch_order`),
    validation in 256-image chunks strided by rank."""

    def __init__(
        self, train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, batch_size: int, seed: int, d: Dist
    ):
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.batch_size, self.seed, self.d = batch_size, seed, d
        self.steps_per_epoch = len(epoch_order(len(train_y), batch_size, seed, 0, d))
        self.num_train, self.num_val = len(train_y), len(val_y)
        self.input_shape = list(train_x.shape[1:])

    def train_batches(self, epoch: int, first: int) -> Iterator[tuple[Tensor, Tensor]]:
        for b in epoch_order(self.num_train, self.batch_size, self.seed, epoch, self.d)[first:]:
            yield self.train_x[b], self.train_y[b]

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = torch.arange(self.num_val)[self.d.rank :: self.d.world]
        for b in idx.split(256):
            yield self.val_x[b], self.val_y[b]

    def take_skipped(self) -> list[dict]:
        return []


class StreamFeed:
    """A :class:`ppml.data.stream.StreamDataset` per split behind a DataLoader (``workers`` processes, each a
    consumer of its own share; ``batch_size=None``: the dataset batches). The unreadable images the workers report
    (folders only) are collected for :meth:`take_skipped`.

    The DataLoader gets its own generator: otherwise each new iterator would draw its base seed from torch's
    global generator, which the trainer's dropout uses, and a resumed run (one iterator more) would drift."""

    def __init__(self, source, batch_size: int, seed: int, shuffle_buffer: int, workers: int, d: Dist):
        from ppml.data.stream import StreamDataset

        kw = dict(seed=seed, shuffle_buffer=shuffle_buffer, rank=d.rank, world=d.world, workers=workers)
        self.train = StreamDataset(source, "train", batch_size, **kw)
        self.val = StreamDataset(source, "val", batch_size, **kw)
        self.workers = workers
        self.num_train, self.num_val = self.train.num_samples, self.val.num_samples
        if not self.num_train:
            raise ValueError("ppml train: the data hold no training samples")
        self.steps_per_epoch = self.train.steps_per_epoch()
        self._skipped: list[dict] = []
        # uint8 batches stay uint8 (a quarter of the bytes to the device) when the trainer feeds them to
        # ppml.patch_tokens, which divides by 255 in its one pass; otherwise they become float in [0, 1] here.
        self.keep_uint8 = False

    def _loader(self, ds):
        from torch.utils.data import DataLoader

        return DataLoader(
            ds, batch_size=None, num_workers=self.workers, generator=torch.Generator(), persistent_workers=False
        )

    def _unpack(self, batch: dict) -> tuple[Tensor, Tensor]:
        if "error" in batch:
            raise ValueError(batch["error"])
        self._skipped += batch["skipped"]
        x = batch["x"]
        if x.dtype == torch.uint8 and not self.keep_uint8:
            x = x.float().div_(255.0)
        return x, batch["y"]

    def train_batches(self, epoch: int, first: int) -> Iterator[tuple[Tensor, Tensor]]:
        self.train.set_epoch(epoch, first)
        for batch in self._loader(self.train):
            yield self._unpack(batch)

    def val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self._loader(self.val):
            yield self._unpack(batch)

    def take_skipped(self) -> list[dict]:
        """The unreadable images reported since the last call (each once)."""
        out, seen = [], set()
        for s in self._skipped:
            if s["path"] not in seen:
                seen.add(s["path"])
                out.append(s)
        self._skipped = []
        return out
