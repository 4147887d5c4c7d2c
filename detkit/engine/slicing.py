"""Sliced inference: a photo much larger than the network input is cut into overlapping windows,
each detected at the network's own resolution, and the windows' boxes are merged.

Letterboxing a 5000x5000 orthophoto into 416x416 shrinks a 40 px tree crown to 3 px, below what
any YOLO head resolves; a model trained on 416 px tiles must be run on 416 px windows of the
photo (SAHI's slicing, DeepForest's `predict_tile`).

The merge: every window owns a core, the part of the photo nearer to it than to its neighbours
(the overlaps split down the middle), and keeps only the boxes whose centre lies in its core;
one per-class NMS then removes what is left of duplicates. For an object no wider than the
overlap this is exact: if its centre is in a window's core, that window shows it whole, and
where a neighbour cuts it, the cut part's centre lies beyond the neighbour's core. Rules on
boxes touching window edges (SAHI) fail whenever the detector's box for a cut object stops a few
pixels short of the edge; a half object has IoU 0.5 with the whole one, too low for NMS at
0.45-0.5 to remove reliably.

Windows are all the same size (the last one along each axis is moved back to end at the edge,
never shrunk), so one batch holds any number of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..errors import DetkitError

WINDOWS_PER_PASS = 16  # windows per forward pass: bounds memory on very large photos


class Window(NamedTuple):
    x0: int
    y0: int
    width: int
    height: int
    core: tuple[float, float, float, float]  # x1, y1, x2, y2 in photo pixels, edges infinite


MAX_OVERLAP = 0.75  # a window every quarter tile: 16x the windows of no overlap, already slow


def check_tiling(tile: int | None, overlap: float, tile_option: str = "--tile") -> None:
    """Refuse what would not work or would run for hours (overlap near 1 on a large photo)."""
    if tile is not None and tile < 32:
        raise DetkitError(f"{tile_option} {tile}: windows must be at least 32 px")
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise DetkitError(f"--tile-overlap {overlap} must be between 0 and {MAX_OVERLAP}")


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride` px, plus one ending exactly at the edge."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def stride_of(tile: int, overlap: float) -> int:
    return max(1, round(tile * (1.0 - overlap)))


def core_spans(origins: Sequence[int], tile: int) -> list[tuple[float, float]]:
    """Per window along one axis, the span it owns: its overlaps with its neighbours split
    down the middle; the first and last reach to infinity (boxes clipped at the photo edge)."""
    cuts = [(nxt + prev + tile) / 2.0 for prev, nxt in zip(origins[:-1], origins[1:], strict=True)]
    lows = [-np.inf, *cuts]
    highs = [*cuts, np.inf]
    return list(zip(lows, highs, strict=True))


def windows(width: int, height: int, tile: int, overlap: float) -> list[Window]:
    """The windows covering a width x height photo, row by row; one window if it fits in a tile."""
    stride = stride_of(tile, overlap)
    xs, ys = tile_origins(width, tile, stride), tile_origins(height, tile, stride)
    win_w, win_h = min(tile, width), min(tile, height)
    return [Window(x0, y0, win_w, win_h, (cx1, cy1, cx2, cy2))
            for y0, (cy1, cy2) in zip(ys, core_spans(ys, tile), strict=True)
            for x0, (cx1, cx2) in zip(xs, core_spans(xs, tile), strict=True)]


def merge_windows(rows_per_window: Sequence[torch.Tensor], window_list: Sequence[Window],
                  nms_thresh: float) -> torch.Tensor:
    """Per-window (K, 6) rows in window pixels -> one (K, 6) tensor in photo pixels, by score:
    all windows' rows at once, each shifted by its window's origin and kept if its centre lies
    in that window's core."""
    from torchvision.ops import batched_nms

    rows = torch.cat(list(rows_per_window))
    owner = torch.repeat_interleave(torch.arange(len(window_list)),
                                    torch.tensor([len(r) for r in rows_per_window]))
    origins = torch.tensor([[w.x0, w.y0] for w in window_list], dtype=rows.dtype)[owner]
    cores = torch.tensor([w.core for w in window_list], dtype=rows.dtype)[owner]
    boxes = rows[:, :4] + origins.repeat(1, 2)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    owned = ((centre >= cores[:, :2]) & (centre < cores[:, 2:])).all(1)
    merged = torch.cat([boxes, rows[:, 4:]], 1)[owned]
    keep = batched_nms(merged[:, :4].float(), merged[:, 4].float(), merged[:, 5].long(), nms_thresh)
    return merged[keep]  # batched_nms returns indices by decreasing score


def predict_sliced(image: np.ndarray, tile: int, overlap: float,
                   predict: Callable[[list[np.ndarray]], list[torch.Tensor]],
                   nms_thresh: float) -> torch.Tensor:
    """(K, 6) x1, y1, x2, y2, score, class in photo pixels for one BGR photo.

    `predict` maps same-size BGR windows to per-window rows in window pixels (the whole-image
    detector, with its own score threshold and cap per window: a photo of thousands of trees
    keeps them all). A photo that fits in one window is passed to it unchanged.
    """
    height, width = image.shape[:2]
    window_list = windows(width, height, tile, overlap)
    if len(window_list) == 1:
        return predict([image])[0]
    crops = [image[w.y0:w.y0 + w.height, w.x0:w.x0 + w.width] for w in window_list]
    rows: list[torch.Tensor] = []
    for start in range(0, len(crops), WINDOWS_PER_PASS):
        rows.extend(predict(crops[start:start + WINDOWS_PER_PASS]))
    return merge_windows(rows, window_list, nms_thresh)
