"""[region] (YOLOv2) training targets and loss: darknet's forward_region_layer as tensor ops.

Darknet's region layer writes l.delta with respect to the *sigmoid outputs* of x, y and
objectness; its GPU backward multiplies those entries by sigmoid' (its CPU backward is commented
out). The true gradient is therefore that of a squared error on the sigmoid outputs for x, y and
objectness, a squared error on the raw tw, th, and softmax cross-entropy (or, with softmax=0,
logistic BCE, since the backward leaves class deltas alone) for the classes. `region_loss` is
that function, built from the same slot machinery as the [yolo] loss (see yolo_loss).

Differences from [yolo] that darknet makes: the best anchor is chosen among this layer's anchors
only, by the anchor shape (bias_match=1) or the *current predicted* shape in the truth's cell
(bias_match=0); the objectness target is the IoU of the prediction with its truth when
rescore=1; every scale comes from the cfg; a softmax class target is overwritten by a later truth
in the same slot (delta_region_class only ORs logistic classes); at most 30 truths per image are
read; and while fewer than 12,800 images have been seen every slot without a truth is pulled
(scale 0.01) towards the cell centre and the prior's size.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .yolo_loss import (
    Assignment,
    Truths,
    best_truth_iou,
    box_targets,
    channels,
    class_rows,
    darknet_iou,
    last_truth_per_slot,
    or_targets,
    prepare_truths,
    shape_iou,
    truth_cells,
)

Tensor = torch.Tensor

# darknet's region layer reads at most 30 truths per image (l.truths = 30*(coords+1)).
REGION_TRUTHS = 30
# forward_region_layer pulls every prediction towards its prior while *net.seen < 12800.
PRIOR_PULL_IMAGES = 12800
PRIOR_PULL_SCALE = 0.01


class RegionLike(Protocol):
    """What the loss needs from a RegionHead."""

    index: int
    classes: int
    softmax: bool
    rescore: bool
    bias_match: bool
    thresh: float
    coord_scale: float
    object_scale: float
    noobject_scale: float
    class_scale: float
    max_boxes: int
    num_anchors: int
    anchors: Tensor


def region_loss(head: RegionLike, raw: Tensor, targets: Tensor | None, seen: int) -> dict[str, Tensor]:
    """Darknet's [region] loss for one layer, summed over the batch.

    raw: the layer's input logits (B, A*(5+C), H, W); targets: (T, 6) rows of image_index, class,
    cx, cy, w, h normalised; seen: darknet's *net->seen during this forward (darknet has already
    added this batch to it), which switches the prior pull off at 12,800.

    Parts: xy = 0.5 * coord_scale * (2 - w*h) * (target - sigmoid(tx))^2 (plus the prior pull),
    wh = the same on raw tw, th, obj = 0.5 * object_scale * (1 or IoU - sigmoid(obj))^2,
    noobj = 0.5 * noobject_scale * sigmoid(obj)^2 where the best IoU with a truth is <= thresh,
    cls = class_scale * (softmax cross-entropy or per-class BCE).
    """
    b, _, h, w = raw.shape
    a, c = head.num_anchors, head.classes
    z5 = raw.float().view(b, a, 5 + c, h, w)
    slots = b * a * h * w
    limit = min(head.max_boxes, REGION_TRUTHS)
    truths = prepare_truths(targets, b, c, limit, raw.device, f"[region] layer {head.index}")
    anchors = head.anchors.float().to(raw.device)
    with torch.no_grad():
        pred = _decode(z5, anchors)
        best, _ = best_truth_iou(pred.view(b, -1, 4), truths)
        assignment = _assign(head, truths, pred, anchors)
        winner = last_truth_per_slot(assignment.slot, slots)
        trained = winner >= 0
        source = torch.where(trained, winner, torch.full_like(winner, truths.sentinel))
        box = truths.box[source]
        txy, twh, scale = box_targets(box, anchors, (b, a, h, w), (w, h))
        scale = head.coord_scale * scale * trained
        obj_target = darknet_iou(pred.reshape(-1, 4), box) if head.rescore else 1.0
        noobj_mask = ~trained & ~(best.reshape(-1) > head.thresh)
    sig_xy = torch.sigmoid(channels(z5, 0, 2))
    zwh = channels(z5, 2, 4)
    xy = 0.5 * scale[:, None] * (txy - sig_xy) ** 2
    wh = 0.5 * scale[:, None] * (twh - zwh) ** 2
    if seen < PRIOR_PULL_IMAGES:
        prior = 0.5 * PRIOR_PULL_SCALE * ~trained[:, None]
        xy = xy + prior * (0.5 - sig_xy) ** 2
        wh = wh + prior * zwh ** 2
    obj = torch.sigmoid(z5[:, :, 4].reshape(-1))
    return {
        "xy": xy.sum(),
        "wh": wh.sum(),
        "obj": (0.5 * head.object_scale * (obj_target - obj) ** 2 * trained).sum(),
        "noobj": (0.5 * head.noobject_scale * obj ** 2 * noobj_mask).sum(),
        "cls": head.class_scale * _class_loss(head, z5, truths, assignment, winner),
    }


def _decode(z5: Tensor, anchors: Tensor) -> Tensor:
    """get_region_box for every slot: (B, A, H, W, 4); anchors are in grid cells."""
    _, a, _, h, w = z5.shape
    xy = torch.sigmoid(z5[:, :, 0:2])
    cols = torch.arange(w, device=z5.device, dtype=z5.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=z5.device, dtype=z5.dtype).view(1, 1, h, 1)
    cx = (cols + xy[:, :, 0]) / w
    cy = (rows + xy[:, :, 1]) / h
    bw = torch.exp(z5[:, :, 2]) * anchors[:, 0].view(1, a, 1, 1) / w
    bh = torch.exp(z5[:, :, 3]) * anchors[:, 1].view(1, a, 1, 1) / h
    return torch.stack([cx, cy, bw, bh], -1)


def region_assign(head: RegionLike, raw: Tensor, targets: Tensor | None) -> Assignment:
    """The [region] assignment of each target row (see yolo_loss.Assignment). It needs the raw
    logits because with bias_match=0 the anchor is chosen by the shape it currently predicts."""
    b, _, h, w = raw.shape
    truths = prepare_truths(targets, b, head.classes, min(head.max_boxes, REGION_TRUTHS),
                            raw.device, f"[region] layer {head.index}")
    z5 = raw.detach().float().view(b, head.num_anchors, 5 + head.classes, h, w)
    pred = _decode(z5, head.anchors.float().to(raw.device))
    return _assign(head, truths, pred, head.anchors.float().to(raw.device)).without_sentinel()


def _assign(head: RegionLike, truths: Truths, pred: Tensor, anchors: Tensor) -> Assignment:
    """Darknet's truth loop: the best of this layer's anchors by shape IoU, using the anchor's own
    shape with bias_match=1, else the shape that anchor currently predicts in the truth's cell."""
    b, a, h, w, _ = pred.shape
    row, col = truth_cells(truths, h, w)
    if head.bias_match:
        wh = (anchors / torch.tensor([float(w), float(h)], device=anchors.device))[None]
    else:
        wh = pred[truths.image, :, row, col, 2:4]
    best_n = shape_iou(truths.box[:, 2:4], wh).argmax(1)
    position = torch.where(truths.valid, best_n, torch.full_like(best_n, -1))
    slot = ((truths.image * a + best_n) * h + row) * w + col
    slot = torch.where(truths.valid, slot, torch.full_like(slot, b * a * h * w))
    return Assignment(best_n, position, row, col, slot)


def _class_loss(head: RegionLike, z5: Tensor, truths: Truths, assignment: Assignment,
                winner: Tensor) -> Tensor:
    """Softmax: cross-entropy on the class of the slot's last truth (delta_region_class
    overwrites). Logistic: BCE on the OR of the slot's classes. One row per truth."""
    logits, last, row = class_rows(z5, truths, assignment, winner)
    if head.softmax:
        loss = F.cross_entropy(logits, truths.cls, reduction="none")
    else:
        target = or_targets(truths, row, head.classes)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    return (loss * last).sum()
