"""AlexeyAB's [yolo] loss keys: iou_thresh (multi-anchor assignment), iou_loss (IoU, GIoU, DIoU,
CIoU), and the iou/obj/cls normalizers.

The reference darknet here is pjreddie's, which has none of these keys, so the box losses are
checked against the formulas of the papers written out independently in numpy, the assignment
against hand-worked anchor shapes, and the defaults against the unchanged darknet-parity loss.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from test_targets import assign, build_head

from detkit.errors import CfgError, CfgWarning
from detkit.heads.yolo_loss import box_iou_loss
from detkit.model import model_from_text

# yolov3 anchors (pixels): 0 10x13, 1 16x30, 2 33x23, 3 30x61, 4 62x45, 5 59x119, 6 116x90,
# 7 156x198, 8 373x326; layer 94 (26x26) has mask 3,4,5.


def test_without_iou_thresh_a_truth_trains_only_its_best_anchor():
    head = build_head("yolov3", "yolo", 1)
    a = assign(head, [[0, 0, 0.5, 0.5, 62 / 416, 45 / 416]])
    assert a.position.tolist() == [1]


def test_iou_thresh_also_trains_other_anchors_of_the_layer_above_it():
    """60x60 px: best anchor 4 (62x45, shape IoU 0.73); anchor 3 (30x61) has IoU 0.496, anchor 5
    (59x119) 0.4999; with iou_thresh 0.45 all three positions train, with 0.6 only the best."""
    box = [0, 0, 0.5, 0.5, 60 / 416, 60 / 416]
    loose = assign(build_head("yolov3", "yolo", 1, iou_thresh=0.45), [box])
    assert loose.position.tolist() == [0, 1, 2]
    assert loose.anchor.tolist() == [4, 4, 4]
    assert len(set(loose.slot.tolist())) == 3
    strict = assign(build_head("yolov3", "yolo", 1, iou_thresh=0.6), [box])
    assert strict.position.tolist() == [-1, 1, -1]


def test_iou_thresh_trains_a_layer_whose_anchor_is_not_the_best():
    """A 110x90 box's best anchor is 6 (layer 82), but layer 94's anchor 4 (62x45) has shape
    IoU 0.28 and anchor 5 (59x119) 0.46 (anchor 3, 30x61: 0.18): they train there when iou_thresh
    is below that."""
    box = [0, 0, 0.5, 0.5, 110 / 416, 90 / 416]
    assert assign(build_head("yolov3", "yolo", 1), [box]).position.tolist() == [-1]
    rows = assign(build_head("yolov3", "yolo", 1, iou_thresh=0.25), [box])
    assert rows.position.tolist() == [-1, 1, 2]
    assert rows.anchor.tolist() == [6, 6, 6]
    assert assign(build_head("yolov3", "yolo", 1, iou_thresh=0.3), [box]).position.tolist() == [-1, -1, 2]


def test_iou_thresh_keeps_the_first_position_of_a_repeated_anchor():
    head = build_head("yolov3", "yolo", 0, mask="6,6,7", iou_thresh=0.1)
    a = assign(head, [[0, 0, 0.5, 0.5, 116 / 416, 90 / 416]])
    assert a.position.tolist() == [0, -1, 2]


def test_iou_thresh_later_truth_still_wins_a_shared_slot():
    """Two truths in one cell trained at the same extra anchor: the later one's box is the
    target there (darknet's overwrite order is kept by truth-major rows)."""
    head = build_head("yolov3", "yolo", 1, iou_thresh=0.3)
    first = [0, 1, 0.40, 0.40, 60 / 416, 60 / 416]
    second = [0, 2, 0.41, 0.405, 58 / 416, 62 / 416]
    raw = torch.randn(1, 255, 26, 26, generator=torch.Generator().manual_seed(1))
    both = head.loss(raw, torch.tensor([first, second]), (416, 416))
    last = head.loss(raw, torch.tensor([second]), (416, 416))
    for part in ("xy", "wh", "obj"):
        assert torch.allclose(both[part], last[part])


def ciou_numpy(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    """1 - IoU/GIoU/DIoU/CIoU of two cx, cy, w, h boxes (Rezatofighi 2019; Zheng 2020)."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    iou = inter / union
    cw, ch = max(ax2, bx2) - min(ax1, bx1), max(ay2, by2) - min(ay1, by1)
    if kind == "iou":
        return 1 - iou
    if kind == "giou":
        return 1 - (iou - (cw * ch - union) / (cw * ch))
    distance = ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) / (cw ** 2 + ch ** 2)
    if kind == "diou":
        return 1 - iou + distance
    v = 4 / math.pi ** 2 * (math.atan(b[2] / b[3]) - math.atan(a[2] / a[3])) ** 2
    alpha = v / (1 - iou + v)
    return 1 - iou + distance + alpha * v


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_box_iou_loss_matches_the_papers_formulas(kind):
    rng = np.random.default_rng(3)
    pred = np.column_stack([rng.uniform(20, 80, 50), rng.uniform(20, 80, 50),
                            rng.uniform(5, 60, 50), rng.uniform(5, 60, 50)])
    truth = pred + np.column_stack([rng.normal(0, 15, (50, 2)), rng.normal(0, 8, (50, 2))])
    truth[:, 2:] = np.abs(truth[:, 2:]) + 2
    ours = box_iou_loss(torch.tensor(pred), torch.tensor(truth), kind).numpy()
    expected = [ciou_numpy(p, t, kind) for p, t in zip(pred, truth, strict=True)]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def one_truth_case(kind: str, **keys):
    head = build_head("yolov3", "yolo", 1, iou_loss=kind, **keys)
    truth = [0, 3, 0.43, 0.57, 60 / 416, 45 / 416]
    raw = torch.randn(1, 255, 26, 26, generator=torch.Generator().manual_seed(2)) * 0.5
    return head, truth, raw


@pytest.mark.parametrize("kind", ["giou", "ciou"])
def test_box_part_is_the_iou_loss_of_the_decoded_box_at_the_truth_slot(kind):
    head, truth, raw = one_truth_case(kind, iou_normalizer=0.5)
    raw.requires_grad_(True)
    parts = head.loss(raw, torch.tensor([truth]), (416, 416))
    assert set(parts) == {"box", "obj", "noobj", "cls"}
    a = assign(head, [truth])
    z = raw.detach().view(1, 3, 85, 26, 26)[0, a.position[0], :4, a.row[0], a.col[0]].double()
    anchor = head.anchors[a.position[0]].double()
    pred = np.array([(a.col[0] + torch.sigmoid(z[0])) * 16, (a.row[0] + torch.sigmoid(z[1])) * 16,
                     torch.exp(z[2]) * anchor[0], torch.exp(z[3]) * anchor[1]], dtype=float)
    expected = 0.5 * ciou_numpy(pred, np.array(truth[2:]) * 416, kind)
    assert float(parts["box"].detach()) == pytest.approx(expected, rel=1e-5)
    parts["box"].backward()
    grad = raw.grad.view(1, 3, 85, 26, 26)
    touched = grad.abs().sum(2).nonzero().tolist()
    assert touched == [[0, int(a.position[0]), int(a.row[0]), int(a.col[0])]]
    assert grad[0, a.position[0], 4:].abs().sum() == 0  # the box term moves only x, y, w, h


def test_normalizers_scale_their_parts():
    head, truth, raw = one_truth_case("mse")
    targets = torch.tensor([truth])
    plain = head.loss(raw, targets, (416, 416))
    head.iou_normalizer, head.obj_normalizer, head.cls_normalizer = 0.07, 0.5, 2.0
    scaled = head.loss(raw, targets, (416, 416))
    for part, factor in (("xy", 0.07), ("wh", 0.07), ("obj", 0.5), ("noobj", 0.5), ("cls", 2.0)):
        assert torch.allclose(scaled[part], factor * plain[part])


def test_untrained_slots_with_huge_logits_leave_the_iou_gradient_finite():
    head, truth, raw = one_truth_case("ciou")
    raw = raw.clone()
    raw.view(1, 3, 85, 26, 26)[:, :, 2:4, :5] = 200.0  # exp overflows far from the truth
    raw.requires_grad_(True)
    parts = head.loss(raw, torch.tensor([truth]), (416, 416))
    parts["box"].backward()
    assert torch.isfinite(parts["box"]) and torch.isfinite(raw.grad).all()


def yolo_text(extra: str) -> str:
    return ("[net]\nwidth=8\nheight=8\nchannels=18\n\n[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\n"
            f"classes=1\nnum=3\n{extra}")


def test_unknown_iou_loss_is_a_cfg_error():
    with pytest.raises(CfgError, match="iou_loss=eiou is not one of mse, iou, giou, diou, ciou"):
        model_from_text(yolo_text("iou_loss=eiou\n"))


def test_alexeyab_loss_keys_are_read_and_the_rest_still_warn():
    text = yolo_text("iou_loss=CIoU\niou_normalizer=0.07\ncls_normalizer=1.0\nobj_normalizer=2\n"
                     "iou_thresh=0.213\nmax_delta=5\n")
    with pytest.warns(CfgWarning) as record:
        head = model_from_text(text).layers[0]
    messages = " ".join(str(w.message) for w in record)
    assert "max_delta" in messages
    assert not any(k in messages for k in ("iou_loss", "normalizer", "iou_thresh"))
    assert (head.iou_loss, head.iou_normalizer, head.obj_normalizer, head.iou_thresh) == \
        ("ciou", 0.07, 2.0, 0.213)


def test_a_cfg_with_ciou_and_iou_thresh_trains():
    """A whole model with the new keys takes optimiser steps and its box loss goes down."""
    text = ("[net]\nwidth=64\nheight=64\nchannels=3\n\n"
            "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=leaky\n\n"
            "[convolutional]\nfilters=18\nsize=1\nstride=1\npad=1\nactivation=linear\n\n"
            + yolo_text("iou_loss=ciou\niou_normalizer=2\niou_thresh=0.2\n").split("\n\n", 1)[1]
            .replace("anchors=1,2,3,4,5,6", "anchors=10,12,16,16,20,14"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_from_text(text).train()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 0, 0.3, 0.4, 0.25, 0.2], [1, 0, 0.6, 0.5, 0.3, 0.3]])
    optimiser = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    losses = []
    for _ in range(60):
        optimiser.zero_grad()
        loss, parts = model(x, targets)
        loss.backward()
        optimiser.step()
        losses.append(float(parts["box"].detach()))
    assert losses[-1] < 0.6 * losses[0], losses
