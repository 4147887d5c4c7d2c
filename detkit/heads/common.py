"""Shared grid helpers for the anchor heads."""

from __future__ import annotations

import torch


def grid_offsets(h: int, w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row index of every cell, shaped (1, 1, H, W) for broadcasting."""
    rows = torch.arange(h, device=device, dtype=dtype).view(1, 1, h, 1)
    cols = torch.arange(w, device=device, dtype=dtype).view(1, 1, 1, w)
    return cols, rows


def anchor_pairs(section, key: str = "anchors") -> list[tuple[float, float]]:
    values = section.get_floats(key, [])
    if len(values) % 2:
        raise section.error(f"'{key}' has an odd number of values ({len(values)})", key)
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def flatten_predictions(boxes_and_scores: torch.Tensor) -> torch.Tensor:
    """(B, A, 5+C, H, W) -> (B, A*H*W, 5+C), anchor-major like darknet's entry order."""
    b, a, k, h, w = boxes_and_scores.shape
    return boxes_and_scores.permute(0, 1, 3, 4, 2).reshape(b, a * h * w, k)


def prior_logit(probability: float) -> float:
    """The logit whose sigmoid is `probability` (clamped to (1e-4, 0.5))."""
    import math

    p = min(max(probability, 1e-4), 0.5)
    return math.log(p / (1 - p))


def init_objectness_bias(bias: torch.Tensor, anchors: int, cells: int) -> None:
    """Objectness (entry 4 of each anchor's block) of a fresh head starts at ~8 objects per image
    over this grid (ultralytics' and RetinaNet's prior init) instead of darknet's 0.5 everywhere.

    On a pretrained backbone, darknet's start costs the first tens of iterations: the
    thousands of empty cells' 0.5 dominate the loss, every objectness is pushed to ~0 and the
    positives recover slowly (trees: validation mAP 0.0 after 40 iterations; 0.013 with this).
    """
    with torch.no_grad():
        bias.view(anchors, -1)[:, 4] = prior_logit(8.0 / cells)
