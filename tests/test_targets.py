"""Target assignment on hand-made cases: which layer, which anchor, which cell, which truth wins."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DARKNET_CFG

from detkit.cfg import Section, parse_cfg, write_cfg
from detkit.heads.region_loss import region_assign
from detkit.heads.yolo_loss import yolo_assign
from detkit.model import model_from_text

# yolov3 anchors (pixels): 0 10x13, 1 16x30, 2 33x23, 3 30x61, 4 62x45, 5 59x119, 6 116x90,
# 7 156x198, 8 373x326; layer 82 (13x13) has mask 6,7,8, layer 94 (26x26) 3,4,5, 106 (52x52) 0,1,2.
GRIDS = {82: 13, 94: 26, 106: 52}


def build_head(cfg: str, kind: str, which: int, **overrides):
    """One head of a real cfg as a one-layer model ([net] channels = its input filters)."""
    sections = parse_cfg(DARKNET_CFG / f"{cfg}.cfg")
    section = [s for s in sections if s.kind == kind][which]
    head = Section(kind=section.kind, line=section.line, options=dict(section.options))
    for key, value in overrides.items():
        head.options[key] = (str(value), 0)
    classes = int(head.options["classes"][0])
    anchors = len(head.options["mask"][0].split(",")) if kind == "yolo" else int(head.options["num"][0])
    text = f"[net]\nwidth=8\nheight=8\nchannels={anchors * (classes + 5)}\n\n" + write_cfg([head])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = model_from_text(text).layers[0]
    layer.index = section.index
    return layer


@pytest.fixture(scope="module")
def yolov3_heads():
    return {index: build_head("yolov3", "yolo", k) for k, index in enumerate((82, 94, 106))}


def assign(head, rows, batch=1, net=416):
    grid = GRIDS[head.index] * net // 416
    targets = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return yolo_assign(head, targets, batch, (grid, grid), (net, net))


def test_each_truth_trains_the_layer_of_its_best_anchor(yolov3_heads):
    rows = [[0, 1, 0.5, 0.5, 116 / 416, 90 / 416],    # exactly anchor 6 -> layer 82, position 0
            [0, 2, 0.3, 0.7, 10 / 416, 13 / 416],     # anchor 0 -> layer 106, position 0
            [0, 3, 0.1, 0.2, 60 / 416, 45 / 416],     # anchor 4 -> layer 94, position 1
            [0, 4, 0.9, 0.6, 0.99, 0.9]]              # huge: anchor 8 -> layer 82, position 2
    expected_layer = [82, 106, 94, 82]
    expected_anchor = [6, 0, 4, 8]
    for index, head in yolov3_heads.items():
        a = assign(head, rows)
        assert a.anchor.tolist() == expected_anchor  # best over all nine, whatever the layer
        for k, layer in enumerate(expected_layer):
            if layer == index:
                assert a.position[k] == expected_anchor[k] - head.mask[0]
                assert a.slot[k] < 3 * GRIDS[index] ** 2
            else:
                assert a.position[k] == -1 and a.slot[k] == 3 * GRIDS[index] ** 2


def test_cell_is_the_one_holding_the_centre(yolov3_heads):
    head = yolov3_heads[106]
    a = assign(head, [[0, 0, 0.3, 0.7, 10 / 416, 13 / 416], [1, 0, 0.5, 0.25, 0.02, 0.03]], batch=2)
    assert (a.col.tolist(), a.row.tolist()) == ([15, 26], [36, 13])   # int(0.3*52), int(0.7*52)...
    # slot = ((image * A + position) * H + row) * W + col
    assert a.slot.tolist() == [(0 * 3 + 0) * 52 * 52 + 36 * 52 + 15, (1 * 3 + 0) * 52 * 52 + 13 * 52 + 26]


def test_centre_on_the_far_edge_stays_on_the_grid(yolov3_heads):
    """x = 1.0 would make darknet write past the row; detkit keeps the last cell."""
    a = assign(yolov3_heads[82], [[0, 0, 1.0, 1.0, 0.3, 0.2]])
    assert (a.col.item(), a.row.item()) == (12, 12)


def test_network_size_changes_the_anchor(yolov3_heads):
    """The same normalised box is 104 px at 416 (anchor 6) but 152 px at 608 (anchor 7)."""
    head = yolov3_heads[82]
    box = [[0, 0, 0.5, 0.5, 0.25, 0.25]]
    assert assign(head, box, net=416).anchor.item() == 6
    assert assign(head, box, net=608).anchor.item() == 7


def test_max_boxes_counts_per_image():
    head = build_head("yolov3", "yolo", 0, max=2)
    big = [0.2, 0.2, 0.5, 0.5]
    rows = [[0, 0, *big], [0, 1, *big], [0, 2, *big], [1, 3, *big], [1, 4, *big]]
    a = yolo_assign(head, torch.tensor(rows), 2, (13, 13), (416, 416))
    assert (a.position >= 0).tolist() == [True, True, False, True, True]


def test_colliding_truths_last_box_wins_classes_accumulate(yolov3_heads):
    """Two truths in one cell with the same best anchor: darknet's later truth overwrites the box
    and objectness deltas, but delta_yolo_class only adds the second truth's class."""
    head = yolov3_heads[94]
    first = [0, 5, 0.40, 0.40, 62 / 416, 45 / 416]
    second = [0, 9, 0.41, 0.405, 60 / 416, 48 / 416]
    a = assign(head, [first, second])
    assert a.slot[0] == a.slot[1] >= 0 and a.position[0] == 1
    raw = torch.randn(1, 255, 26, 26, generator=torch.Generator().manual_seed(0))
    both = head.loss(raw, torch.tensor([first, second]), (416, 416))
    last = head.loss(raw, torch.tensor([second]), (416, 416))
    for part in ("xy", "wh", "obj"):
        assert torch.allclose(both[part], last[part])
    logits = raw.view(1, 3, 85, 26, 26)[0, 1, 5:, a.row[0], a.col[0]]
    two_hot = F.one_hot(torch.tensor([5, 9]), 80).sum(0).float()
    assert torch.allclose(both["cls"], F.binary_cross_entropy_with_logits(logits, two_hot, reduction="sum"))


def test_only_the_first_position_of_a_repeated_mask_anchor_trains():
    head = build_head("yolov3", "yolo", 0, mask="6,6,7")
    a = yolo_assign(head, torch.tensor([[0, 0, 0.5, 0.5, 116 / 416, 90 / 416]]), 1, (13, 13), (416, 416))
    assert a.position.item() == 0


def test_region_bias_match_uses_anchor_shapes_else_predicted_shapes():
    """yolov2-voc anchors (grid cells): 0 1.32x1.73, 1 3.19x4.01, 2 5.06x8.10, 3 9.47x4.84,
    4 11.24x10.01. The truth has anchor 0's shape; with bias_match=0 anchor 3 is made to predict
    exactly that shape and every other anchor a tiny one, so darknet would pick anchor 3."""
    truth = torch.tensor([[0, 1, 0.52, 0.33, 1.3221 / 13, 1.73145 / 13]])
    raw = torch.full((1, 5, 25, 13, 13), -5.0)
    row, col = int(0.33 * 13), int(0.52 * 13)
    raw[0, 3, 2, row, col] = torch.log(torch.tensor(1.3221 / 9.47112))
    raw[0, 3, 3, row, col] = torch.log(torch.tensor(1.73145 / 4.84053))
    raw = raw.view(1, 125, 13, 13)
    matched = region_assign(build_head("yolov2-voc", "region", 0), raw, truth)
    predicted = region_assign(build_head("yolov2-voc", "region", 0, bias_match=0), raw, truth)
    assert matched.anchor.item() == 0 and predicted.anchor.item() == 3
    assert (matched.row.item(), matched.col.item()) == (row, col)


def test_region_softmax_class_is_overwritten_by_the_later_truth():
    head = build_head("yolov2-voc", "region", 0)
    raw = torch.randn(1, 125, 13, 13, generator=torch.Generator().manual_seed(1))
    first = [0, 3, 0.5, 0.5, 0.2, 0.25]
    second = [0, 7, 0.51, 0.505, 0.21, 0.26]
    a = region_assign(head, raw, torch.tensor([first, second]))
    assert a.slot[0] == a.slot[1]
    both = head.loss(raw, torch.tensor([first, second]), (416, 416), 20000)
    last = head.loss(raw, torch.tensor([second]), (416, 416), 20000)
    assert torch.allclose(both["cls"], last["cls"])
