"""Box conversions, IoU and darknet-semantics postprocessing (batched, on the tensor's device)."""

from __future__ import annotations

import torch


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


def postprocess(preds: torch.Tensor, conf_thresh: float = 0.5, nms_thresh: float = 0.45,
                max_det: int = 300) -> list[torch.Tensor]:
    """Darknet's get_network_boxes + do_nms_sort, for a whole batch in one NMS call.

    Candidates: objectness > conf_thresh; each class with score = objectness * p(class) >
    conf_thresh becomes one (box, score, class) row; greedy NMS per image and class. Returns per
    image a (K, 6) tensor x1, y1, x2, y2, score, class, sorted by score, at most max_det rows.
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
    keep = batched_nms(boxes.float(), score.float(), owner * max(num_classes, 1) + cls, nms_thresh)
    detections = torch.cat([boxes[keep], score[keep, None], cls[keep, None].to(boxes.dtype)], 1)
    owner = owner[keep]
    return [detections[owner == b][:max_det] for b in range(batch)]
