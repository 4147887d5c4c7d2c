"""Anchor boxes for a data set: k-means on label shapes with distance 1 - IoU.

This is AlexeyAB's ``detector calc_anchors``: each label's (w, h) is scaled to the network input
(normalised w times the network width, as AlexeyAB does, ignoring letterboxing), boxes are
compared by the IoU of their shapes with both centred at the origin, centroids are the mean of
their members, and the anchors come out sorted by area. Unlike calc_anchors the initialisation
is k-means++ *in the IoU distance* and the best of several restarts (highest mean IoU) is kept.
Everything is vectorised over boxes; identical shapes are merged and weighted, so large data sets
with few distinct box sizes cost little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data.labels import Dataset
from .errors import DataError


@dataclass
class AnchorResult:
    """anchors: (K, 2) w, h in network pixels, ascending area; mean_iou: mean over the boxes of
    the IoU with their best anchor; wh: the (N, 2) box shapes used; skipped: boxes with w or
    h <= 0 that were left out."""

    anchors: np.ndarray
    mean_iou: float
    wh: np.ndarray
    skipped: int = 0

    def rounded(self, stride: int = 1, decimals: int = 0) -> np.ndarray:
        """The anchors as a cfg would hold them: divided by `stride` (32 for [region] cfgs, whose
        anchors are in grid cells) and rounded, never below the smallest printable value (an
        anchor of 0 would make the size target log(0))."""
        values = np.round(self.anchors / stride, decimals)
        return np.maximum(values, 10.0 ** -decimals)

    def line(self, stride: int = 1, decimals: int = 0) -> str:
        """The ``anchors = ...`` cfg line, pairs separated like darknet's cfgs."""
        pairs = [f"{w:.{decimals}f},{h:.{decimals}f}" for w, h in self.rounded(stride, decimals)]
        return "anchors = " + ",  ".join(pairs)


def wh_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """IoU of (N, 2) shapes with (K, 2) shapes, all centred at the origin: (N, K)."""
    inter = (np.minimum(wh[:, None, 0], anchors[None, :, 0])
             * np.minimum(wh[:, None, 1], anchors[None, :, 1]))
    union = (wh[:, 0] * wh[:, 1])[:, None] + (anchors[:, 0] * anchors[:, 1])[None, :] - inter
    return inter / union


def mean_best_iou(wh: np.ndarray, anchors: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean over the boxes of the IoU with their best anchor (the number calc_anchors prints)."""
    best = wh_iou(wh, np.asarray(anchors, dtype=np.float64)).max(1)
    return float(np.average(best, weights=weights))


def kmeans_anchors(wh: np.ndarray, k: int, restarts: int = 10, seed: int = 0,
                   max_iter: int = 300) -> AnchorResult:
    """k anchors for (N, 2) box shapes (network pixels); the best of `restarts` runs."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    keep = (wh > 0).all(1) & np.isfinite(wh).all(1)
    used = wh[keep]
    points, weights = np.unique(used, axis=0, return_counts=True)
    weights = weights.astype(np.float64)
    if k < 1:
        raise DataError(f"the number of anchors must be at least 1 (got {k})")
    if len(points) < k:
        raise DataError(f"only {len(points)} distinct box shapes ({len(used)} boxes) for {k} "
                        f"anchors: use fewer anchors or more labels")
    rng = np.random.default_rng(seed)
    best_centers, best_iou = None, -1.0
    for _ in range(max(1, restarts)):
        centers = _kmeans_once(points, weights, k, rng, max_iter)
        score = mean_best_iou(points, centers, weights)
        if score > best_iou:
            best_centers, best_iou = centers, score
    order = np.argsort(best_centers[:, 0] * best_centers[:, 1], kind="stable")
    return AnchorResult(anchors=best_centers[order], mean_iou=best_iou, wh=used,
                        skipped=int((~keep).sum()))


def dataset_anchors(dataset: Dataset, k: int, size: tuple[int, int], restarts: int = 10,
                    seed: int = 0, include_difficult: bool = False) -> AnchorResult:
    """Anchors for a Dataset at network size (w, h). Difficult objects are left out by default,
    as darknet's voc_label.py leaves them out of the label files calc_anchors reads."""
    boxes = dataset.boxes(include_difficult=include_difficult)
    if len(boxes) == 0:
        raise DataError(f"{dataset.source}: no boxes to compute anchors from")
    wh = boxes[:, 2:4].astype(np.float64) * np.array(size, dtype=np.float64)
    return kmeans_anchors(wh, k, restarts=restarts, seed=seed)


def _kmeans_once(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
                 max_iter: int) -> np.ndarray:
    """Lloyd iterations in the 1 - IoU distance with weighted-mean centroids."""
    centers = _kmeans_plus_plus(points, weights, k, rng)
    assign = None
    for _ in range(max_iter):
        iou = wh_iou(points, centers)
        new = iou.argmax(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        mass = np.bincount(assign, weights=weights, minlength=k)
        sums = np.stack([np.bincount(assign, weights=weights * points[:, d], minlength=k)
                         for d in (0, 1)], 1)
        empty = mass == 0
        centers = np.where(empty[:, None], centers, sums / np.maximum(mass, 1e-300)[:, None])
        if empty.any():
            centers[empty] = _farthest(points, centers[~empty], int(empty.sum()))
    return centers


def _kmeans_plus_plus(points: np.ndarray, weights: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with D = 1 - IoU: each new centre drawn with probability ~ w * D^2."""
    chosen = [int(rng.choice(len(points), p=weights / weights.sum()))]
    distance = 1 - wh_iou(points, points[chosen]).max(1)
    for _ in range(k - 1):
        mass = weights * distance ** 2
        total = mass.sum()
        pick = int(rng.choice(len(points), p=mass / total)) if total > 0 else int(distance.argmax())
        chosen.append(pick)
        distance = np.minimum(distance, 1 - wh_iou(points, points[pick:pick + 1])[:, 0])
    return points[chosen].copy()


def _farthest(points: np.ndarray, centers: np.ndarray, count: int) -> np.ndarray:
    """The `count` points worst served by `centers`: new homes for emptied clusters."""
    best = wh_iou(points, centers).max(1) if len(centers) else np.zeros(len(points))
    return points[np.argsort(best, kind="stable")[:count]]
