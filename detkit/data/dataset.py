"""Training/validation samples as tensors, with a deterministic sampler that can resume.

A sample's augmentation is seeded by (seed, epoch, index), never by worker state, so a run's
batches depend only on the images consumed so far: a resumed run sees the same batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .augment import DarknetAugment, augment, augment_with_extent, mosaic
from .ssd_augment import SSDAugment, ssd_augment

log = logging.getLogger("detkit")


@dataclass
class Sample:
    image: Path
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # cx,cy,w,h /image
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    difficult: np.ndarray | None = None


class DetectionDataset(Dataset):
    """Samples -> (uint8 RGB CHW canvas, targets (K, 5) class, cx, cy, w, h network-normalised).

    The geometry follows the settings: DarknetAugment (or None with `letterbox`) places the image
    darknet's way; SSDAugment (or None without `letterbox`) warps it to the network size, as SSD
    is trained and run.
    """

    def __init__(self, samples: Sequence[Sample], net_size: tuple[int, int],
                 settings: DarknetAugment | SSDAugment | None = None, seed: int = 0, max_boxes: int = 90,
                 letterbox: bool = True) -> None:
        self.samples = list(samples)
        self.net_size = net_size
        self.settings = settings
        self.seed = seed
        self.max_boxes = max_boxes
        stretch = isinstance(settings, SSDAugment) or (settings is None and not letterbox)
        self._transform = ssd_augment if stretch else augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int):
        """`key` = epoch * len + index (from ResumableSampler), or a plain index (epoch 0)."""
        epoch, index = divmod(int(key), len(self.samples))
        rng = np.random.default_rng([self.seed, epoch, index]) if self.settings else None
        if rng is not None and getattr(self.settings, "mosaic", False):
            others = rng.integers(0, len(self.samples), 3)
            # k + 1: a trailing 0 would give the mosaic's own stream (SeedSequence pads with 0s)
            parts = [self._transformed(i, np.random.default_rng([self.seed, epoch, index, k + 1]), augment_with_extent)
                     for k, i in enumerate([index, *others.tolist()])]
            canvas, boxes, classes = mosaic(parts, *self.net_size, rng)
        else:
            canvas, boxes, classes = self._transformed(index, rng)
        if rng is not None and len(boxes) > self.max_boxes:  # darknet keeps `max`, shuffled
            keep = rng.permutation(len(boxes))[: self.max_boxes]
            boxes, classes = boxes[keep], classes[keep]
        tensor = torch.from_numpy(np.ascontiguousarray(canvas[:, :, ::-1])).permute(2, 0, 1)
        targets = torch.cat([torch.from_numpy(classes).float()[:, None], torch.from_numpy(boxes)], 1)
        return tensor, targets, index

    def _transformed(self, index: int, rng: np.random.Generator | None, transform=None):
        """One sample read and placed at the network size (augmented when `rng` is given) by
        `transform`, the dataset's own by default."""
        sample = self.samples[index]
        image = cv2.imread(str(sample.image), cv2.IMREAD_COLOR)
        if image is None:
            log.warning("%s: unreadable image, used as an empty gray sample", sample.image)
            image = np.full((self.net_size[1], self.net_size[0], 3), 127, np.uint8)
            boxes, classes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            boxes, classes = sample.boxes.astype(np.float32), sample.classes.astype(np.int64)
        return (transform or self._transform)(image, boxes, classes, *self.net_size, self.settings, rng)


def collate(batch):
    """Stack images; targets become rows of (image_index_in_batch, class, cx, cy, w, h)."""
    images = torch.stack([item[0] for item in batch])
    rows = [torch.cat([torch.full((len(t), 1), float(i)), t], 1) for i, (_, t, _) in enumerate(batch)]
    return images, torch.cat(rows) if rows else torch.zeros((0, 6)), [item[2] for item in batch]


class ResumableSampler(Sampler[int]):
    """An endless stream of per-epoch permutations, started at any image offset.

    With several processes each rank takes every world-th index of the same permutation, so the
    union of one step's rank batches is the single-process batch.
    """

    def __init__(self, dataset: DetectionDataset, seed: int = 0, start: int = 0,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.dataset, self.seed, self.start = dataset, seed, start
        self.rank, self.world, self.shuffle = rank, world, shuffle

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        position = self.start
        while True:
            epoch, offset = divmod(position, n)
            order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                     if self.shuffle else torch.arange(n))
            for i in range(offset, n):
                if (position - self.start) % self.world == self.rank:
                    yield epoch * n + int(order[i])  # the dataset decodes the epoch
                position += 1

    def __len__(self) -> int:  # endless; DataLoader needs a number only for progress
        return 2**62
