"""SSD matching, box coding and the multibox loss on hand-made cases and against torchvision."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.ssd import SSD
from torchvision.ops import box_iou

from detkit.boxes import cxcywh_to_xyxy
from detkit.errors import DataError
from detkit.heads.ssd_match import (
    build_targets,
    decode,
    encode,
    match_priors,
    multibox_loss,
    pad_truths,
)

# Four quadrant priors and a small central one (cx, cy, w, h normalised).
PRIORS = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5],
                       [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]])
VARIANCES = (0.1, 0.2)


def match(truths_cxcywh: list[list[float]], thresh: float = 0.5) -> list[int]:
    truths = torch.tensor([truths_cxcywh]).reshape(1, -1, 4)
    valid = torch.ones(truths.shape[:2], dtype=torch.bool)
    return match_priors(cxcywh_to_xyxy(truths), valid, cxcywh_to_xyxy(PRIORS), thresh)[0].tolist()


def torchvision_match(truths_cxcywh: list[list[float]], priors: torch.Tensor = PRIORS) -> list[int]:
    iou = box_iou(cxcywh_to_xyxy(torch.tensor(truths_cxcywh)), cxcywh_to_xyxy(priors))
    return tv_utils.SSDMatcher(0.5)(iou).clamp(min=-1).tolist()


def test_each_truth_forces_its_best_prior_even_below_threshold():
    # IoU with the bottom-right quadrant is 0.0025 / 0.25 = 0.01, far below 0.5.
    truths = [[0.9, 0.9, 0.05, 0.05]]
    assert match(truths) == [-1, -1, -1, 0, -1]
    assert match(truths) == torchvision_match(truths)


def test_prior_claimed_by_two_truths_goes_to_the_last():
    # Both truths overlap prior 0 most; truth 0 overlaps it more (0.81 vs 0.64), yet the forced
    # rule gives the prior to the truth listed last, as torchvision (and Caffe) do.
    truths = [[0.25, 0.25, 0.45, 0.45], [0.25, 0.25, 0.4, 0.4]]
    assert match(truths)[0] == 1
    assert match(truths) == torchvision_match(truths)


def test_threshold_is_inclusive_and_second_rule_takes_best_truth():
    # The top half overlaps priors 0 and 1 by exactly 0.5: prior 0 is forced (first maximum),
    # prior 1 joins by IoU >= 0.5.
    truths = [[0.5, 0.25, 1.0, 0.5]]
    assert match(truths) == [0, 0, -1, -1, -1]
    assert match(truths) == torchvision_match(truths)


def test_no_truths_matches_nothing():
    empty = pad_truths(torch.zeros((0, 6)), batch=2)
    assert empty.boxes.shape == (2, 0, 4)
    matched = match_priors(empty.boxes, empty.valid, cxcywh_to_xyxy(PRIORS))
    assert matched.shape == (2, 5) and (matched == -1).all()


def test_random_batch_matches_torchvision_per_image():
    gen = torch.Generator().manual_seed(3)
    priors = torch.cat([torch.rand(300, 2, generator=gen),
                        torch.rand(300, 2, generator=gen) * 0.4 + 0.05], 1)
    counts = [4, 0, 9]
    rows = []
    for image, count in enumerate(counts):
        boxes = torch.cat([torch.rand(count, 2, generator=gen) * 0.6 + 0.2,
                           torch.rand(count, 2, generator=gen) * 0.3 + 0.05], 1)
        rows.append(torch.cat([torch.full((count, 1), float(image)), torch.zeros(count, 1), boxes], 1))
    targets = torch.cat(rows)[torch.randperm(sum(counts), generator=gen)]  # images interleaved
    truths = pad_truths(targets, batch=3)
    matched = match_priors(cxcywh_to_xyxy(truths.boxes), truths.valid, cxcywh_to_xyxy(priors))
    for image, count in enumerate(counts):
        own = targets[targets[:, 0] == image, 2:6]
        if count == 0:
            assert (matched[image] == -1).all()
            continue
        assert matched[image].tolist() == torchvision_match(own.tolist(), priors)


def test_pad_truths_keeps_order_and_drops_empty_boxes():
    targets = torch.tensor([[1, 2, 0.5, 0.5, 0.2, 0.2], [0, 1, 0.3, 0.3, 0.1, 0.1],
                            [1, 0, 0.6, 0.6, 0.3, 0.3], [1, 4, 0.6, 0.6, 0.0, 0.3]])
    truths = pad_truths(targets, batch=3)
    assert truths.valid.tolist() == [[True, False], [True, True], [False, False]]
    assert truths.labels[1].tolist() == [2, 0]
    with pytest.raises(DataError, match="image indices"):
        pad_truths(torch.tensor([[3, 0, 0.5, 0.5, 0.1, 0.1]]), batch=2)


def test_encode_decode_round_trip_and_variances():
    truths = torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.7, 0.2, 0.05, 0.3]])
    priors = torch.tensor([[0.25, 0.45, 0.3, 0.15], [0.75, 0.25, 0.1, 0.2]])
    codes = encode(truths, priors, VARIANCES)
    assert codes[0, 0].item() == pytest.approx((0.3 - 0.25) / (0.1 * 0.3))
    assert codes[0, 2].item() == pytest.approx(torch.log(torch.tensor(0.2 / 0.3)).item() / 0.2)
    assert torch.allclose(decode(codes, priors, VARIANCES), truths, atol=1e-6)


def _random_batch(gen: torch.Generator, batch: int, priors: int, classes: int):
    loc = torch.randn(batch, priors, 4, generator=gen)
    logits = torch.randn(batch, priors, classes + 1, generator=gen) * 2
    rows = []
    for image, count in enumerate([3, 1, 0, 6][:batch]):
        boxes = torch.cat([torch.rand(count, 2, generator=gen) * 0.6 + 0.2,
                           torch.rand(count, 2, generator=gen) * 0.4 + 0.05], 1)
        cls = torch.randint(0, classes, (count, 1), generator=gen).float()
        rows.append(torch.cat([torch.full((count, 1), float(image)), cls, boxes], 1))
    return loc, logits, torch.cat(rows)


def test_loss_equals_torchvision_compute_loss():
    gen = torch.Generator().manual_seed(5)
    priors = torch.cat([torch.rand(500, 2, generator=gen),
                        torch.rand(500, 2, generator=gen) * 0.5 + 0.02], 1)
    loc, logits, targets = _random_batch(gen, batch=4, priors=500, classes=6)
    size = 300.0
    anchors = [cxcywh_to_xyxy(priors) * size] * 4
    tv_targets, matched = [], []
    for image in range(4):
        own = targets[targets[:, 0] == image]
        boxes = cxcywh_to_xyxy(own[:, 2:6]) * size
        tv_targets.append({"boxes": boxes, "labels": own[:, 1].long() + 1})
        matched.append(tv_utils.SSDMatcher(0.5)(box_iou(boxes, anchors[image])) if len(own)
                       else torch.full((500,), -1, dtype=torch.long))
    fake = SSD.__new__(SSD)  # compute_loss only needs box_coder and neg_to_pos_ratio
    fake.box_coder, fake.neg_to_pos_ratio = tv_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), 3.0
    ref = SSD.compute_loss(fake, tv_targets, {"bbox_regression": loc, "cls_logits": logits},
                           anchors, matched)
    ours = multibox_loss(loc, logits, build_targets(targets, 4, priors, 0.5, 0, VARIANCES), 3.0)
    assert ours["loc"].item() == pytest.approx(ref["bbox_regression"].item(), rel=1e-5)
    assert ours["cls"].item() == pytest.approx(ref["classification"].item(), rel=1e-5)


def test_hard_negatives_are_three_per_positive_and_guarded():
    priors = torch.tensor([[0.1 * i + 0.05, 0.5, 0.1, 0.5] for i in range(10)])
    logits = torch.zeros(1, 10, 3)
    logits[0, :, 1] = torch.arange(10.0)  # negatives' loss grows with the index
    loc = torch.zeros(1, 10, 4, requires_grad=True)
    targets = torch.tensor([[0, 0, 0.05, 0.5, 0.1, 0.5]])  # one truth on prior 0
    matched = build_targets(targets, 1, priors, 0.5, 0, VARIANCES)
    assert matched.positive[0].tolist() == [True] + [False] * 9
    parts = multibox_loss(loc, logits, matched, 3.0)
    ce = torch.nn.functional.cross_entropy(logits[0], matched.classes[0], reduction="none")
    expected = ce[0] + ce[7:].sum()  # the positive and the three hardest negatives
    assert parts["cls"].item() == pytest.approx(expected.item(), rel=1e-6)

    empty = build_targets(torch.zeros((0, 6)), 2, priors, 0.5, 0, VARIANCES)
    logits2 = torch.randn(2, 10, 3, requires_grad=True)
    parts = multibox_loss(loc.expand(2, -1, -1), logits2, empty, 3.0)
    assert parts["loc"].item() == 0 and parts["cls"].item() == 0
    (parts["loc"] + parts["cls"]).backward()
    assert torch.isfinite(logits2.grad).all()
