"""SSD training maths: truth padding, the two-rule matcher, box coding and the multibox loss.

Everything is batched over images (no Python loop over images, truths or priors) and follows
torchvision's SSD (`SSDMatcher`, `BoxCoder(10, 10, 5, 5)`, `SSD.compute_loss`), the reference
detkit is tested against. Boxes here are normalised to the input (0..1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..boxes import cxcywh_to_xyxy
from ..errors import DataError

# torchvision's BoxCoder clamp of the decoded log-size offsets: exp() never overflows.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass
class PaddedTruths:
    """Ground truth of a batch as (B, G) slots: G = most truths in one image; `valid` marks them."""

    boxes: torch.Tensor   # (B, G, 4) cx, cy, w, h normalised
    labels: torch.Tensor  # (B, G) class, 0-based without background
    valid: torch.Tensor   # (B, G) bool


def pad_truths(targets: torch.Tensor, batch: int) -> PaddedTruths:
    """Rows (image_index, class, cx, cy, w, h) -> per-image slots, without a loop over images.

    Boxes with no area cannot be matched (their IoU is 0 with every prior) and are dropped, where
    torchvision asserts instead.
    """
    device = targets.device
    targets = targets.reshape(-1, 6)
    targets = targets[(targets[:, 4] > 0) & (targets[:, 5] > 0)]
    image = targets[:, 0].long()
    if image.numel() and (image.min() < 0 or image.max() >= batch):
        raise DataError(f"target image indices must be in 0..{batch - 1}, got "
                        f"{int(image.min())}..{int(image.max())}")
    order = torch.argsort(image, stable=True)
    targets, image = targets[order], image[order]
    counts = torch.bincount(image, minlength=batch)
    most = int(counts.max()) if image.numel() else 0
    slot = torch.arange(image.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[image]
    boxes = targets.new_zeros(batch, most, 4)
    labels = torch.zeros(batch, most, dtype=torch.long, device=device)
    valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
    boxes[image, slot] = targets[:, 2:6]
    labels[image, slot] = targets[:, 1].long()
    valid[image, slot] = True
    return PaddedTruths(boxes, labels, valid)


def box_iou_batched(truths: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """IoU of (B, G, 4) truths with (P, 4) priors, both x1y1x2y2 -> (B, G, P).

    The same operations in the same order as torchvision.ops.box_iou, so ties break alike.
    """
    area_t = (truths[..., 2] - truths[..., 0]) * (truths[..., 3] - truths[..., 1])
    area_p = (priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])
    # x and y apart: half the peak memory of one (B, G, P, 2) tensor, the same values.
    iw = (torch.min(truths[..., 2, None], priors[:, 2]) - torch.max(truths[..., 0, None], priors[:, 0]))
    ih = (torch.min(truths[..., 3, None], priors[:, 3]) - torch.max(truths[..., 1, None], priors[:, 1]))
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = area_t[..., None] + area_p - inter
    return inter / union


def match_priors(truths_xyxy: torch.Tensor, valid: torch.Tensor, priors_xyxy: torch.Tensor,
                 iou_thresh: float = 0.5) -> torch.Tensor:
    """(B, P) index of the truth each prior is matched to, -1 for background.

    Rule 1: every truth takes the prior it overlaps most, whatever the IoU; when truths share that
    prior the one listed last wins (torchvision's and Caffe's outcome). Rule 2: any other prior
    with IoU >= iou_thresh to some truth takes the truth it overlaps most.
    """
    batch, most = valid.shape
    matched = torch.full((batch, priors_xyxy.shape[0]), -1, dtype=torch.long,
                         device=priors_xyxy.device)
    if most == 0:
        return matched
    iou = box_iou_batched(truths_xyxy, priors_xyxy).masked_fill(~valid[..., None], -1.0)
    best_iou, best_truth = iou.max(dim=1)
    matched = torch.where(best_iou >= iou_thresh, best_truth, matched)
    best_prior = iou.argmax(dim=2)
    truth_ids = torch.arange(most, device=valid.device).expand(batch, most).masked_fill(~valid, -1)
    forced = torch.full_like(matched, -1).scatter_reduce(1, best_prior, truth_ids, reduce="amax")
    return torch.where(forced >= 0, forced, matched)


def encode(truths: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Centre-size offsets of truths from priors (both cx, cy, w, h), divided by the variances."""
    centre = (truths[..., :2] - priors[..., :2]) / (variances[0] * priors[..., 2:])
    size = torch.log(truths[..., 2:] / priors[..., 2:]) / variances[1]
    return torch.cat([centre, size], -1)


def decode(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Inverse of `encode`: (..., 4) offsets and (P, 4) priors -> cx, cy, w, h normalised.

    The log-size offsets are clamped at log(1000/16) as torchvision's BoxCoder does.
    """
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(torch.clamp(loc[..., 2:] * variances[1], max=BBOX_XFORM_CLIP))
    return torch.cat([centre, size], -1)


@dataclass
class SSDTargets:
    """Per prior: the encoded box target, the class index into the logits, positive or not."""

    loc: torch.Tensor       # (B, P, 4)
    classes: torch.Tensor   # (B, P) logit index (background where not positive)
    positive: torch.Tensor  # (B, P) bool


def build_targets(targets: torch.Tensor, batch: int, priors: torch.Tensor, iou_thresh: float,
                  background: int, variances: tuple[float, float]) -> SSDTargets:
    """Match a batch's truth rows to the priors and encode what each prior must predict."""
    truths = pad_truths(targets.to(priors.dtype), batch)
    matched = match_priors(cxcywh_to_xyxy(truths.boxes), truths.valid, cxcywh_to_xyxy(priors),
                           iou_thresh)
    positive = matched >= 0
    index = matched.clamp(min=0)
    if truths.boxes.shape[1] == 0:
        loc = priors.new_zeros(batch, priors.shape[0], 4)
        classes = torch.full_like(matched, background)
        return SSDTargets(loc, classes, positive)
    boxes = truths.boxes.gather(1, index[..., None].expand(-1, -1, 4))
    labels = truths.labels.gather(1, index)
    logit = labels + (labels >= background).long()  # skip the background column
    classes = torch.where(positive, logit, torch.full_like(logit, background))
    return SSDTargets(encode(boxes, priors, variances), classes, positive)


def multibox_loss(loc: torch.Tensor, logits: torch.Tensor, targets: SSDTargets,
                  neg_pos: float = 3.0) -> dict[str, torch.Tensor]:
    """Smooth L1 on positives plus softmax cross-entropy with hard negative mining.

    Per image the `neg_pos` x positives negatives with the highest cross-entropy are kept (ranked
    as torchvision does: a full sort, positives at -inf); both parts are divided by the batch's
    positives, at least 1, so an image set without truths gives 0, never NaN.
    """
    positive = targets.positive
    loc_loss = F.smooth_l1_loss(loc[positive], targets.loc[positive], reduction="sum")
    num_classes = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, num_classes), targets.classes.reshape(-1),
                         reduction="none").view(positive.shape)
    ranking = ce.detach().masked_fill(positive, -math.inf)
    _, order = ranking.sort(1, descending=True)
    rank = order.sort(1)[1]
    num_neg = neg_pos * positive.sum(1, keepdim=True)
    negative = (rank < num_neg) & ~positive
    count = max(1, int(positive.sum()))
    return {"loc": loc_loss / count, "cls": (ce[positive].sum() + ce[negative].sum()) / count}
