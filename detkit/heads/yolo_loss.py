"""[yolo] (YOLOv3) training targets and loss: darknet's forward_yolo_layer as batched tensor ops.

Darknet's yolo layer does not compute a loss: it writes l.delta = -dL/dz (z = the layer's input
logits) with three nested loops over predictions, truths and anchors. `yolo_loss` is the function
whose negative gradient is exactly that delta (proven against libdarknet in
tests/test_yolo_loss.py), built without a Python loop over truths, anchors or cells:

* every prediction (image b, anchor a, row j, col i) is one *slot* n = ((b*A + a)*H + j)*W + i;
* each truth is mapped to the slot its darknet loop iteration would write, and darknet's
  "later truths overwrite" rule becomes a scatter of the truth index with `amax` (the last truth
  of a slot wins its box and objectness deltas), while the class targets of every truth of a slot
  are OR-ed, as delta_yolo_class does for a second truth in an already written slot;
* the per-prediction "best IoU with any truth of the image" is a scatter-`amax` over
  (truth, prediction) pairs, so no tensor shape depends on the data and nothing syncs with the
  host (except one check that the targets are well formed).

The pieces shared with the [region] loss (truth preparation, darknet's IoU, the pairwise best IoU)
live here too and are imported by region_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..boxes import cxcywh_to_xyxy
from ..errors import DataError

Tensor = torch.Tensor

# AlexeyAB's iou_loss values: "mse" is darknet's x, y, w, h regression, the others replace it by
# 1 - (IoU, GIoU, DIoU or CIoU) of the decoded box with its truth.
IOU_LOSSES = ("mse", "iou", "giou", "diou", "ciou")


class YoloLike(Protocol):
    """What the loss needs from a YoloHead (kept structural so this module imports no layer)."""

    index: int
    classes: int
    mask: list[int]
    all_anchors: list[tuple[float, float]]
    ignore_thresh: float
    truth_thresh: float
    max_boxes: int
    scale_x_y: float
    anchors: Tensor
    iou_loss: str
    iou_normalizer: float
    obj_normalizer: float
    cls_normalizer: float
    iou_thresh: float

    @property
    def num_anchors(self) -> int: ...


@dataclass
class Truths:
    """One batch of ground truth as a darknet loss layer reads it, plus a sentinel last row.

    `box` is (T+1, 4) cx, cy, w, h normalised to the network input; `image` and `cls` are long
    (T+1,); `valid` marks the truths darknet would read (in range, positive size, among the first
    `limit` of their image). Row T is a harmless "no truth" box (0.5, 0.5, 1, 1, class 0, invalid):
    slots without a truth point at it, so per-slot gathers never need a data-dependent shape.
    """

    image: Tensor
    cls: Tensor
    box: Tensor
    valid: Tensor

    @property
    def sentinel(self) -> int:
        return self.box.shape[0] - 1


def prepare_truths(targets: Tensor | None, batch: int, classes: int, limit: int,
                   device: torch.device, where: str) -> Truths:
    """Rows (image_index, class, cx, cy, w, h) -> Truths, keeping darknet's reading rules.

    Darknet reads at most `limit` truths per image, in the order given (its loader has already
    dropped boxes that are too small; here boxes with w or h <= 0 are skipped because darknet would
    take log(0)). A row whose image index or class is out of range, or that holds a non-finite
    number, is a data error and raises DataError naming the layer (`where`), because dropping it
    silently would train on different labels than the user gave.
    """
    if targets is None:
        targets = torch.zeros((0, 6))
    if targets.ndim != 2 or targets.shape[1] != 6:
        raise DataError(f"{where}: targets must be (T, 6) rows of image_index, class, cx, cy, w, "
                        f"h; got shape {tuple(targets.shape)}")
    rows = targets.detach().to(device=device, dtype=torch.float32)
    image = rows[:, 0].long()
    cls = rows[:, 1].long()
    box = rows[:, 2:6]
    bad = ((image < 0) | (image >= batch) | (cls < 0) | (cls >= classes)
           | ~torch.isfinite(rows).all(1))
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise DataError(f"{where}: target row {first} {rows[first].tolist()} has an image index "
                        f"outside 0..{batch - 1}, a class outside 0..{classes - 1} or a "
                        f"non-finite value")
    usable = (box[:, 2] > 0) & (box[:, 3] > 0)
    # Rank of each usable row among the usable rows of its image (order kept): darknet's t.
    member = F.one_hot(image, batch) * usable[:, None]
    rank = (member.cumsum(0) * member).sum(1) - 1
    valid = usable & (rank < limit)
    sentinel_box = torch.tensor([[0.5, 0.5, 1.0, 1.0]], device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    return Truths(
        image=torch.cat([image, zero]),
        cls=torch.cat([cls, zero]),
        box=torch.cat([box, sentinel_box]),
        valid=torch.cat([valid, torch.zeros(1, dtype=torch.bool, device=device)]),
    )


def darknet_iou(a: Tensor, b: Tensor) -> Tensor:
    """box.c box_iou on (..., 4) cx, cy, w, h, operation for operation (threshold ties matter)."""
    ow = _overlap(a[..., 0], a[..., 2], b[..., 0], b[..., 2])
    oh = _overlap(a[..., 1], a[..., 3], b[..., 1], b[..., 3])
    inter = torch.where((ow < 0) | (oh < 0), torch.zeros_like(ow), ow * oh)
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return inter / union


def _overlap(x1: Tensor, w1: Tensor, x2: Tensor, w2: Tensor) -> Tensor:
    left = torch.maximum(x1 - w1 / 2, x2 - w2 / 2)
    right = torch.minimum(x1 + w1 / 2, x2 + w2 / 2)
    return right - left


def shape_iou(truth_wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """IoU of truth and anchor shapes with both centred at 0: (T, 2) x (T or 1, K, 2) -> (T, K)."""
    zeros = torch.zeros_like(truth_wh)
    truth = torch.cat([zeros, truth_wh], -1)[:, None, :]
    anchor = torch.cat([torch.zeros_like(anchor_wh), anchor_wh], -1)
    return darknet_iou(anchor, truth)


# Truth x prediction pairs evaluated at once by best_truth_iou (bounds its memory, ~16M pairs).
PAIR_BUDGET = 1 << 24


def best_truth_iou(pred: Tensor, truths: Truths, with_index: bool = False) -> tuple[Tensor, Tensor | None]:
    """Per prediction, the best IoU with any valid truth of its image (darknet starts at 0).

    pred is (B, P, 4). Evaluated on every (truth, prediction-of-its-image) pair and reduced with a
    scatter-amax over the truth's image; truths go in chunks of PAIR_BUDGET pairs (one chunk for
    ordinary batches) so dense data sets cannot exhaust memory. With `with_index`, also the first
    truth reaching the best IoU (darknet's best_t, for the truth_thresh branch), else the sentinel.
    """
    b, p, _ = pred.shape
    real = truths.sentinel
    best = pred.new_zeros((b, p))
    step = max(1, PAIR_BUDGET // max(p, 1))
    chunks = [(lo, min(lo + step, real)) for lo in range(0, real, step)]
    for lo, hi in chunks:
        iou, image = _pair_iou(pred, truths, lo, hi)
        best.scatter_reduce_(0, image[:, None].expand(hi - lo, p), iou, "amax", include_self=True)
    if not with_index:
        return best, None
    first = torch.full((b, p), real, dtype=torch.long, device=pred.device)
    for lo, hi in chunks:
        iou, image = _pair_iou(pred, truths, lo, hi)
        rows = torch.arange(lo, hi, device=pred.device)[:, None].expand(hi - lo, p)
        hit = (iou == best[image]) & (iou > 0)
        candidate = torch.where(hit, rows, torch.full_like(rows, real))
        first.scatter_reduce_(0, image[:, None].expand(hi - lo, p), candidate, "amin",
                              include_self=True)
    return best, first


def _pair_iou(pred: Tensor, truths: Truths, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """IoU of truths lo..hi-1 with every prediction of their image (0 for invalid truths)."""
    image = truths.image[lo:hi]
    iou = darknet_iou(pred[image], truths.box[lo:hi, None, :])
    return torch.where(truths.valid[lo:hi, None], iou, torch.zeros_like(iou)), image


def last_truth_per_slot(slot: Tensor, slots: int) -> Tensor:
    """For each of `slots` slots the index of the last truth written there, or -1.

    `slot` holds one slot per truth, with `slots` (one past the end) for truths not trained here;
    darknet processes truths in order, so the last one overwrites the box and objectness deltas.
    """
    order = torch.arange(slot.shape[0], device=slot.device)
    winner = torch.full((slots + 1,), -1, dtype=torch.long, device=slot.device)
    return winner.scatter_reduce(0, slot, order, "amax", include_self=True)[:slots]


def slot_grid(b: int, a: int, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Anchor, row and column of every slot, each flattened to (B*A*H*W,) in slot order."""
    anchor = torch.arange(a, device=device).view(1, a, 1, 1).expand(b, a, h, w).reshape(-1)
    row = torch.arange(h, device=device).view(1, 1, h, 1).expand(b, a, h, w).reshape(-1)
    col = torch.arange(w, device=device).view(1, 1, 1, w).expand(b, a, h, w).reshape(-1)
    return anchor, row, col


def truth_cells(truths: Truths, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Darknet's cell of each truth: i = (int)(x * l.w), j = (int)(y * l.h), kept on the grid."""
    col = (truths.box[:, 0] * w).long().clamp(0, w - 1)
    row = (truths.box[:, 1] * h).long().clamp(0, h - 1)
    return row, col


def yolo_loss(head: YoloLike, raw: Tensor, targets: Tensor | None,
              net_hw: tuple[int, int]) -> dict[str, Tensor]:
    """Darknet's [yolo] loss for one layer, summed over the batch.

    raw: the layer's input logits (B, A*(5+C), H, W); targets: (T, 6) rows of image_index, class,
    cx, cy, w, h normalised to the network input (net_hw = (height, width) in pixels).

    Returns the parts xy, wh, obj, noobj, cls (their sum is the loss):
    xy: (2 - w*h) * BCE(sigmoid(tx), target); wh: 0.5 * (2 - w*h) * (target - tw)^2;
    obj: BCE(obj, 1) at slots with a truth; noobj: BCE(obj, 0) at the other slots whose best IoU
    with a truth of the image is <= ignore_thresh; cls: per-class BCE at slots with a truth.
    With AlexeyAB's scale_x_y = s the x, y term is the one whose gradient is
    (s*sigmoid - (s-1)/2) - target, as AlexeyAB backpropagates it.

    AlexeyAB's loss keys: iou_thresh < 1 also trains every other anchor of this layer whose shape
    IoU with the truth exceeds it (multi-anchor assignment); iou_loss = iou/giou/diou/ciou replaces
    xy and wh by one part "box" = sum of 1 - (G/D/C)IoU of the decoded box with its truth, in
    input pixels, differentiated by autograd (AlexeyAB applies its hand-written IoU gradient to the
    logits without the sigmoid, grid and anchor factors, so its box gradient is larger for the
    same iou_normalizer; see docs/cfg.md); iou_normalizer scales the box terms,
    obj_normalizer obj and noobj, cls_normalizer cls. max_delta is not implemented (the cfg layer
    warns about it as unused).
    """
    b, _, h, w = raw.shape
    a, c = head.num_anchors, head.classes
    net_h, net_w = net_hw
    z5 = raw.float().view(b, a, 5 + c, h, w)
    slots = b * a * h * w
    truths = prepare_truths(targets, b, c, head.max_boxes, raw.device, f"[yolo] layer {head.index}")
    anchors = head.anchors.float().to(raw.device)
    with torch.no_grad():
        pred = _decode(z5, anchors, head.scale_x_y, net_w, net_h).view(b, -1, 4)
        strong_branch = head.truth_thresh < 1.0
        best, best_t = best_truth_iou(pred, truths, with_index=strong_branch)
        best = best.reshape(-1)
        truths, assignment, best_t = _assign_rows(head, truths, b, (h, w), net_hw, best_t)
        winner = last_truth_per_slot(assignment.slot, slots)
        trained = winner >= 0
        source = torch.where(trained, winner, torch.full_like(winner, truths.sentinel))
        strong = None
        if strong_branch:
            # Darknet's truth_thresh branch: a prediction overlapping a truth by more than
            # truth_thresh is trained on it (its box unless an assigned truth overwrites it).
            strong = best > head.truth_thresh
            best_t = best_t.reshape(-1)
            source = torch.where(trained | ~strong, source, best_t)
            trained = trained | strong
        noobj_mask = ~trained & ~(best > head.ignore_thresh)
        txy, twh, scale = box_targets(truths.box[source], anchors, (b, a, h, w), (net_w, net_h))
        scale = scale * trained
    zobj = z5[:, :, 4].reshape(-1)
    if head.iou_loss == "mse":
        box_parts = {
            "xy": (scale[:, None] * _xy_term(channels(z5, 0, 2), txy, head.scale_x_y)).sum(),
            "wh": (0.5 * scale[:, None] * (twh - channels(z5, 2, 4)) ** 2).sum(),
        }
    else:
        box_parts = {"box": _iou_term(z5, anchors, head, truths.box[source], trained, net_hw)}
    return {
        **{name: head.iou_normalizer * value for name, value in box_parts.items()},
        "obj": head.obj_normalizer * (F.softplus(-zobj) * trained).sum(),
        "noobj": head.obj_normalizer * (F.softplus(zobj) * noobj_mask).sum(),
        "cls": head.cls_normalizer * _class_loss(z5, truths, assignment, winner, strong, best_t),
    }


def _iou_term(z5: Tensor, anchors: Tensor, head: YoloLike, truth_box: Tensor, trained: Tensor,
              net_hw: tuple[int, int]) -> Tensor:
    """Sum over trained slots of 1 - (G/D/C)IoU between the decoded box and its truth.

    Computed densely (no data-dependent shapes); untrained slots see zero logits so their boxes
    stay finite and no NaN can leak into the gradient through torch.where.
    """
    b, a, _, h, w = z5.shape
    mask = trained.view(b, a, 1, h, w)
    safe = torch.where(mask, z5[:, :, 0:4], torch.zeros_like(z5[:, :, 0:4]))
    pred = _decode(safe, anchors, head.scale_x_y, net_hw[1], net_hw[0]).reshape(-1, 4)
    size = pred.new_tensor([net_hw[1], net_hw[0], net_hw[1], net_hw[0]])
    loss = box_iou_loss(pred * size, truth_box * size, head.iou_loss)
    return torch.where(trained, loss, torch.zeros_like(loss)).sum()


def box_iou_loss(pred: Tensor, truth: Tensor, kind: str) -> Tensor:
    """Per row 1 - IoU (or GIoU, DIoU, CIoU, torchvision's definitions) of (N, 4) cx, cy, w, h
    boxes; pixels, not normalised units, so that DIoU's distance and CIoU's aspect term are not
    distorted by a non-square network."""
    # imported here: torchvision costs ~1.5 s of `import detkit` that inference never needs
    from torchvision.ops import (
        complete_box_iou_loss,
        distance_box_iou_loss,
        generalized_box_iou_loss,
    )

    pred_xyxy, truth_xyxy = cxcywh_to_xyxy(pred), cxcywh_to_xyxy(truth)
    if kind == "giou":
        return generalized_box_iou_loss(pred_xyxy, truth_xyxy, reduction="none")
    if kind == "diou":
        return distance_box_iou_loss(pred_xyxy, truth_xyxy, reduction="none")
    if kind == "ciou":
        return complete_box_iou_loss(pred_xyxy, truth_xyxy, reduction="none")
    if kind == "iou":
        return 1 - darknet_iou(pred, truth)
    raise ValueError(f"iou_loss {kind!r} is not one of {', '.join(IOU_LOSSES[1:])}")


def channels(z5: Tensor, lo: int, hi: int) -> Tensor:
    """Entries lo..hi-1 of every slot: (B*A*H*W, hi-lo), copying only those channels."""
    return z5[:, :, lo:hi].permute(0, 1, 3, 4, 2).reshape(-1, hi - lo)


def box_targets(box: Tensor, anchors: Tensor, shape: tuple[int, int, int, int],
                size_wh: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """Darknet's delta_yolo_box / delta_region_box targets for each slot's truth `box`.

    tx = x*W - i, ty = y*H - j, tw = log(w*size_w / anchor_w), th alike (size = the network
    for [yolo], whose anchors are pixels; the grid for [region]); and the scale 2 - w*h.
    """
    b, a, h, w = shape
    anchor, row, col = slot_grid(b, a, h, w, box.device)
    txy = torch.stack([box[:, 0] * w - col, box[:, 1] * h - row], 1)
    twh = torch.stack([torch.log(box[:, 2] * size_wh[0] / anchors[anchor, 0]),
                       torch.log(box[:, 3] * size_wh[1] / anchors[anchor, 1])], 1)
    return txy, twh, 2 - box[:, 2] * box[:, 3]


def class_rows(z5: Tensor, truths: Truths, assignment: Assignment,
               winner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Class logits at each truth's slot, (T+1, C), without touching the other slots.

    Returns (logits, last, row): `last` marks the last truth of each trained slot, whose row
    carries that slot's class loss exactly once; `row` is, per truth, the row of its slot's last
    truth (the sentinel row for truths not trained here), where or_targets collects classes.
    """
    trained = assignment.position >= 0
    padded = torch.cat([winner, winner.new_full((1,), -1)])
    row = torch.where(trained, padded[assignment.slot], torch.full_like(winner[:1], truths.sentinel))
    last = trained & (row == torch.arange(row.shape[0], device=row.device))
    logits = z5[truths.image, assignment.position.clamp(min=0), 5:, assignment.row, assignment.col]
    return logits, last, row


def or_targets(truths: Truths, row: Tensor, classes: int) -> Tensor:
    """(T+1, C) multi-hot: every class of the truths sharing a slot, on that slot's row."""
    target = torch.zeros((row.shape[0], classes), device=row.device)
    target[row, truths.cls] = 1.0
    return target


def _class_loss(z5: Tensor, truths: Truths, assignment: Assignment, winner: Tensor,
                strong: Tensor | None, best_t: Tensor | None) -> Tensor:
    """Per-class BCE at trained slots, classes OR-ed over the slot's truths (delta_yolo_class).

    Computed on one row per truth; only the truth_thresh branch, whose slots are not tied to an
    assigned truth, needs every slot's class logits.
    """
    c = z5.shape[2] - 5
    logits, last, row = class_rows(z5, truths, assignment, winner)
    target = or_targets(truths, row, c)
    if strong is None:
        return (F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
                * last).sum()
    slot = assignment.slot.clamp(max=strong.shape[0] - 1)
    extra = F.one_hot(truths.cls[best_t[slot]], c) * (strong[slot] & last)[:, None]
    target = torch.maximum(target, extra.float())
    loss = (F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
            * last).sum()
    alone = strong & (winner < 0)
    dense = F.binary_cross_entropy_with_logits(
        channels(z5, 5, 5 + c), F.one_hot(truths.cls[best_t], c).float(), reduction="none")
    return loss + (dense.sum(1) * alone).sum()


def _decode(z5: Tensor, anchors: Tensor, scale_x_y: float, net_w: int, net_h: int) -> Tensor:
    """get_yolo_box for every slot: (B, A, H, W, 4) cx, cy, w, h normalised to the input."""
    _, a, _, h, w = z5.shape
    xy = torch.sigmoid(z5[:, :, 0:2])
    if scale_x_y != 1.0:
        xy = xy * scale_x_y - (scale_x_y - 1) / 2
    cols = torch.arange(w, device=z5.device, dtype=z5.dtype).view(1, 1, 1, w)
    rows = torch.arange(h, device=z5.device, dtype=z5.dtype).view(1, 1, h, 1)
    cx = (cols + xy[:, :, 0]) / w
    cy = (rows + xy[:, :, 1]) / h
    bw = torch.exp(z5[:, :, 2]) * anchors[:, 0].view(1, a, 1, 1) / net_w
    bh = torch.exp(z5[:, :, 3]) * anchors[:, 1].view(1, a, 1, 1) / net_h
    return torch.stack([cx, cy, bw, bh], -1)


@dataclass
class Assignment:
    """Where darknet's truth loop trains each target row in one layer (all (T,) long tensors).

    anchor: the best anchor by shape IoU (for [yolo] an index into all `num` anchors, for
    [region] into the layer's); position: its place in this layer (the mask position for [yolo]),
    -1 when the row is not trained here (another layer's anchor, or a row darknet does not read);
    row, col: the cell holding the box centre; slot: ((image*A + position)*H + row)*W + col, or
    B*A*H*W when not trained here. Rows sharing a slot collide: the last one wins the box.
    """

    anchor: Tensor
    position: Tensor
    row: Tensor
    col: Tensor
    slot: Tensor

    def without_sentinel(self) -> Assignment:
        return Assignment(*(t[:-1] for t in (self.anchor, self.position, self.row, self.col,
                                              self.slot)))


def yolo_assign(head: YoloLike, targets: Tensor | None, batch: int, grid_hw: tuple[int, int],
                net_hw: tuple[int, int]) -> Assignment:
    """The [yolo] assignment of each target row (see Assignment), for inspection and tests."""
    device = head.anchors.device
    truths = prepare_truths(targets, batch, head.classes, head.max_boxes, device,
                            f"[yolo] layer {head.index}")
    return _assign_rows(head, truths, batch, grid_hw, net_hw, None)[1].without_sentinel()


def _assign_rows(head: YoloLike, truths: Truths, b: int, grid_hw: tuple[int, int],
                 net_hw: tuple[int, int], best_t: Tensor | None
                 ) -> tuple[Truths, Assignment, Tensor | None]:
    """The truth rows this layer trains and their Assignment; `best_t` re-indexed to those rows.

    Without iou_thresh the rows are the truths themselves. With it (AlexeyAB) each truth becomes
    one row per mask position, in truth-major order so darknet's "later truth wins" still holds:
    the row trains when its anchor is the truth's best anchor over all `num`, or when the shape
    IoU with its anchor exceeds iou_thresh. A row that does not train keeps its truth's `valid`
    and gets position -1; the ignore rule was computed on the truths before the expansion.
    """
    if head.iou_thresh >= 1.0:
        return truths, _assign(head, truths, b, grid_hw, net_hw), best_t
    rows = _rows_per_position(truths, head.num_anchors)
    assignment = _assign(head, rows, b, grid_hw, net_hw, multi_anchor=True)
    if best_t is not None:
        a = head.num_anchors
        best_t = torch.where(best_t == truths.sentinel, torch.full_like(best_t, rows.sentinel),
                             best_t * a)
    return rows, assignment, best_t


def _rows_per_position(truths: Truths, a: int) -> Truths:
    """Each real truth repeated `a` times (row t*a + p for mask position p), sentinel last."""
    real = slice(0, truths.sentinel)
    return Truths(*(torch.cat([field[real].repeat_interleave(a, 0), field[-1:]])
                    for field in (truths.image, truths.cls, truths.box, truths.valid)))


def _assign(head: YoloLike, truths: Truths, b: int, grid_hw: tuple[int, int],
            net_hw: tuple[int, int], multi_anchor: bool = False) -> Assignment:
    """Darknet's truth loop: best anchor over *all* `num` anchors by shape IoU; the truth trains
    this layer only if that anchor is in its mask (int_index: the first position in the mask).

    multi_anchor: `truths` holds one row per (truth, mask position) (see _assign_rows); a row
    trains its own position when that anchor is the best one or passes iou_thresh.
    """
    device = truths.box.device
    h, w = grid_hw
    a = head.num_anchors
    all_wh = torch.tensor(head.all_anchors, dtype=torch.float32, device=device)
    all_wh = all_wh / torch.tensor([float(net_hw[1]), float(net_hw[0])], device=device)
    shape = shape_iou(truths.box[:, 2:4], all_wh[None])
    best_n = shape.argmax(1)
    lut = [-1] * len(head.all_anchors)
    for position, anchor in reversed(list(enumerate(head.mask))):
        lut[anchor] = position
    if multi_anchor:
        position = _multi_anchor_positions(head, shape, best_n, lut)
    else:
        position = torch.tensor(lut, dtype=torch.long, device=device)[best_n]
    position = torch.where(truths.valid, position, torch.full_like(position, -1))
    row, col = truth_cells(truths, h, w)
    slot = ((truths.image * a + position.clamp(min=0)) * h + row) * w + col
    slot = torch.where(position >= 0, slot, torch.full_like(slot, b * a * h * w))
    return Assignment(best_n, position, row, col, slot)


def _multi_anchor_positions(head: YoloLike, shape: Tensor, best_n: Tensor, lut: list[int]) -> Tensor:
    """Row t*A + p's position: p when mask[p] is the truth's best anchor or its shape IoU
    exceeds iou_thresh, else -1. A repeated mask anchor trains only at its first position, as
    AlexeyAB's int_index finds it."""
    a = head.num_anchors
    device = shape.device
    p = torch.arange(shape.shape[0], device=device) % a
    anchor = torch.tensor(head.mask, dtype=torch.long, device=device)[p]
    first = torch.tensor(lut, dtype=torch.long, device=device)[anchor] == p
    chosen = (best_n == anchor) | (shape.gather(1, anchor[:, None])[:, 0] > head.iou_thresh)
    return torch.where(chosen & first, p, torch.full_like(p, -1))


def _xy_term(z: Tensor, target: Tensor, scale_x_y: float) -> Tensor:
    """BCE-with-logits (= softplus(z) - t*z); AlexeyAB's scaled form when scale_x_y != 1."""
    if scale_x_y == 1.0:
        return F.binary_cross_entropy_with_logits(z, target, reduction="none")
    return scale_x_y * F.softplus(z) - (target + (scale_x_y - 1) / 2) * z
