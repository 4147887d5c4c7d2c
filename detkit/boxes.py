"""Box conversions, IoU and darknet-semantics postprocessing (batched, on the tensor's device)."""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


# detect's cap: at most this many (box, class) candidates per image enter NMS, the best-scoring
# ones (as ultralytics' max_nms). A trained net at detect's thresholds stays far below it, but a
# random or diverged one can give 300k candidates and seconds of NMS per image. postprocess
# itself has no cap by default, as darknet: at eval's conf 0.005 a trained yolov3 can pass 30k
# candidates on one photo, and capping them changed darknet parity.
MAX_NMS = 30000


def postprocess(preds: torch.Tensor, conf_thresh: float = 0.5, nms_thresh: float = 0.45,
                max_det: int = 300, merge: bool = False,
                max_nms: int | None = None) -> list[torch.Tensor]:
    """Darknet's get_network_boxes + do_nms_sort, for a whole batch in one NMS call.

    Candidates: objectness > conf_thresh; each class with score = objectness * p(class) >
    conf_thresh becomes one (box, score, class) row; greedy NMS per image and class. Returns per
    image a (K, 6) tensor x1, y1, x2, y2, score, class, sorted by score, at most max_det rows.
    `merge` (yolov5's merge-NMS, for test-time augmentation): each kept box becomes the
    score-weighted mean of the candidates of its image and class it overlaps by more than
    `nms_thresh`, itself included (a candidate may count for two kept boxes, as in yolov5).
    With `max_nms`, per image only that many best-scoring candidates enter NMS (MAX_NMS).
    """
    # imported here: torchvision costs ~1 s of CLI start-up that most commands never need
    from torchvision.ops import batched_nms

    batch, _, width = preds.shape
    num_classes = width - 5
    image_idx, anchor_idx = (preds[..., 4] > conf_thresh).nonzero(as_tuple=True)
    candidates = preds[image_idx, anchor_idx]
    scores = candidates[:, 4:5] * candidates[:, 5:]
    row, cls = (scores > conf_thresh).nonzero(as_tuple=True)
    boxes = cxcywh_to_xyxy(candidates[row, :4])
    score = scores[row, cls]
    owner = image_idx[row]
    if max_nms is not None and len(score) > max_nms:
        best = best_per_image(score, owner, batch, max_nms)
        boxes, score, owner, cls = boxes[best], score[best], owner[best], cls[best]
    group = owner * max(num_classes, 1) + cls
    keep = batched_nms(boxes.float(), score.float(), group, nms_thresh)
    kept_boxes = merge_overlapping(boxes, score, group, keep, nms_thresh) if merge else boxes[keep]
    detections = torch.cat([kept_boxes, score[keep, None], cls[keep, None].to(boxes.dtype)], 1)
    owner = owner[keep]
    return [detections[owner == b][:max_det] for b in range(batch)]


def best_per_image(score: torch.Tensor, owner: torch.Tensor, batch: int, limit: int) -> torch.Tensor:
    """Indices of at most `limit` highest-scoring rows of each image, in their original order."""
    chosen = []
    for image in range(batch):
        rows = (owner == image).nonzero().squeeze(1)
        if len(rows) > limit:
            rows = rows[score[rows].topk(limit).indices].sort().values
        chosen.append(rows)
    return torch.cat(chosen)


def merge_overlapping(boxes: torch.Tensor, score: torch.Tensor, group: torch.Tensor, keep: torch.Tensor,
                      iou_thresh: float, chunk: int = 256) -> torch.Tensor:
    """The score-weighted mean of the same-group boxes each kept box overlaps by more than
    `iou_thresh`, itself always included (a zero-area box's IoU with itself is 0/0). Kept boxes
    are taken `chunk` at a time, so memory stays chunk x candidates."""
    from torchvision.ops import box_iou

    candidates, weights_of = boxes.float(), score.float()
    merged = []
    for start in range(0, len(keep), chunk):
        rows = keep[start:start + chunk]
        overlap = box_iou(candidates[rows], candidates) > iou_thresh
        overlap[torch.arange(len(rows), device=rows.device), rows] = True
        weights = (overlap & (group[rows, None] == group[None])).float() * weights_of[None]
        merged.append(weights @ candidates / weights.sum(1, keepdim=True))
    return torch.cat(merged).to(boxes.dtype) if merged else boxes[keep]
