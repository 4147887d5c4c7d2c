"""Test-time augmentation: the model sees each input in several orientations and the decoded
boxes of every view are mapped back and merged (ultralytics' `--augment`).

A view is (flip, turns): a horizontal flip, then `turns` quarter turns of the network input
(torch.rot90 over height, width). Square inputs get all eight symmetries of the square (overhead
photos have no "up"); other inputs the identity and the flip, since a turn would change the input
shape. The views' boxes are merged by `boxes.postprocess(..., merge=True)` (yolov5's merge-NMS,
each kept box the score-weighted mean of the same-class boxes it overlaps): the views' position
errors partly cancel.
"""

from __future__ import annotations

import torch

View = tuple[bool, int]


def views_for(width: int, height: int) -> list[View]:
    """The views an input of this size allows: eight when square, else identity and flip."""
    turns = range(4) if width == height else range(1)
    return [(flip, k) for flip in (False, True) for k in turns]


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """The (N, C, H, W) batch as the model sees it in this view."""
    flip, turns = view
    if flip:
        x = x.flip(-1)
    # contiguous: the fast path's CUDA graphs are keyed on strides as well as the shape
    return torch.rot90(x, turns, dims=(-2, -1)).contiguous() if turns else x


def undo_view(preds: torch.Tensor, view: View, width: int, height: int) -> torch.Tensor:
    """Decoded predictions (..., cx, cy, w, h, ...) of a view in the original input's pixels.

    One quarter turn by torch.rot90 sends the input point (x, y) to (y, width - x); undoing it
    sends (x', y') back to (width - y', x') and swaps w and h.
    """
    out = preds.clone()
    flip, turns = view
    for _ in range(turns % 4):
        cx, cy = out[..., 0].clone(), out[..., 1].clone()
        out[..., 0], out[..., 1] = width - cy, cx
        out[..., 2], out[..., 3] = out[..., 3].clone(), out[..., 2].clone()
    if flip:
        out[..., 0] = width - out[..., 0]
    return out


@torch.no_grad()
def predict_views(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Decoded predictions (N, A * views, 5 + C) of every view, in the input's pixels."""
    height, width = x.shape[-2:]
    return torch.cat([undo_view(model(apply_view(x, view)), view, width, height)
                      for view in views_for(width, height)], 1)
