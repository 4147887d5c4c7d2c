"""[region] loss: gradient parity with libdarknet's l.delta (after its GPU backward's sigmoid').

Darknet's region delta for x, y and objectness is taken w.r.t. their sigmoid outputs; its GPU
backward multiplies those entries by y(1 - y) (the CPU backward is commented out), and leaves
w, h and the class entries as they are. That product is the true -dL/dz detkit must reproduce.
The [region] section of the real cfg runs in darknet as a one-layer network whose input is the
head input; region anchors are in grid cells, so the geometry is exactly the real one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_yolo_loss import (
    TOL,
    boxes_like_predictions,
    darknet_delta,
    detkit_grad,
    hand_truths,
    head_sections,
    one_layer_cfg,
    random_logits,
    to_targets,
)
from test_yolo_loss import detkit_head as build_head

WORST: dict[str, float] = {}


def true_gradient(delta: np.ndarray, output: np.ndarray, anchors: int) -> np.ndarray:
    """darknet's delta times sigmoid' on x, y, objectness: backward_region_layer_gpu."""
    b, _, h, w = delta.shape
    d = delta.reshape(b, anchors, -1, h, w).copy()
    y = output.reshape(b, anchors, -1, h, w)
    for entry in (0, 1, 4):
        d[:, :, entry] *= y[:, :, entry] * (1 - y[:, :, entry])
    return d.reshape(delta.shape)


def region_case(tmp_path, seed: int, seen: int, grid: tuple[int, int] = (13, 13),
                **overrides) -> float:
    rng = np.random.default_rng(seed)
    section = head_sections("yolov2-voc", "region")[0]
    head = build_head(section, 125, **overrides)
    z = random_logits(rng, 3, head.num_anchors, head.classes, *grid)
    anchors_rel = head.anchors.numpy() / np.array([grid[1], grid[0]])
    truths = hand_truths(rng, head.classes)
    truths[0] = truths[0] + boxes_like_predictions(rng, z, anchors_rel, 0, 6, head.classes)
    truths[1] = truths[1] + boxes_like_predictions(rng, z, anchors_rel, 1, 4, head.classes)
    text = one_layer_cfg(section, grid, z.shape[1], **overrides)
    delta, output = darknet_delta(text, tmp_path, z, truths, seen=seen)
    grad, parts = detkit_grad(head, z, truths, (grid[0] * 32, grid[1] * 32), seen)
    assert set(parts) == {"xy", "wh", "obj", "noobj", "cls"}
    return float(np.abs(-grad - true_gradient(delta, output, head.num_anchors)).max())


@pytest.mark.reference
@pytest.mark.parametrize("seen", [0, 12799, 12800])
def test_yolov2_voc_gradient_matches_darknet(seen, tmp_path):
    """yolov2-voc as shipped: bias_match=1, softmax=1, rescore=1, object_scale=5, thresh=.6."""
    diff = region_case(tmp_path, seed=5 + seen, seen=seen)
    WORST[f"yolov2-voc seen={seen}"] = diff
    assert diff <= TOL


@pytest.mark.reference
def test_other_region_branches_match_darknet(tmp_path):
    """bias_match=0 (anchor chosen by the predicted shape), logistic classes (OR-ed by colliding
    truths), rescore=0, other scales and thresh; on a non-square 11x9 grid."""
    diff = region_case(tmp_path, seed=9, seen=100, grid=(9, 11), bias_match=0, softmax=0, rescore=0,
                       thresh=0.3, coord_scale=2, class_scale=1.5, noobject_scale=0.7)
    WORST["yolov2-voc bias_match=0 softmax=0 rescore=0"] = diff
    assert diff <= TOL


def test_prior_pull_only_before_12800_images():
    section = head_sections("yolov2-voc", "region")[0]
    head = build_head(section, 125)
    raw = torch.randn(1, 125, 5, 5, generator=torch.Generator().manual_seed(0))
    none = torch.zeros((0, 6))
    early, late = head.loss(raw, none, (160, 160), 12799), head.loss(raw, none, (160, 160), 12800)
    assert early["xy"] > 0 and early["wh"] > 0
    assert float(late["xy"]) == 0 and float(late["wh"]) == 0
    assert torch.equal(early["noobj"], late["noobj"])


def test_at_most_30_truths_per_image():
    """darknet's region layer reads 30 truths per image whatever `max` says."""
    section = head_sections("yolov2-voc", "region")[0]
    head = build_head(section, 125, max=100)
    raw = torch.randn(1, 125, 13, 13, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    rows = [[0, 1, *rng.uniform(0.05, 0.95, 2), 0.05, 0.05] for _ in range(30)]
    base = head.loss(raw, torch.tensor(rows, dtype=torch.float32), (416, 416), 20000)
    extra = torch.tensor(rows + [[0, 2, 0.5, 0.5, 0.6, 0.6]], dtype=torch.float32)
    more = head.loss(raw, extra, (416, 416), 20000)
    assert all(torch.allclose(base[k], more[k], rtol=1e-6) for k in base)


def test_model_train_forward_region():
    import warnings

    from conftest import DARKNET_CFG

    from detkit.model import model_from_cfg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_from_cfg(DARKNET_CFG / "yolov2-tiny-voc.cfg").train()
    model.seen = 64
    total, parts = model(torch.rand(2, 3, 96, 96), to_targets([[[0.5, 0.5, 0.3, 0.3, 4]], []]))
    assert torch.allclose(total, sum(parts.values())) and parts["obj"] > 0
    total.backward()


def teardown_module(module):
    if WORST:
        print("\nworst |(-grad) - darknet delta*sigmoid'|:", {k: f"{v:.2e}" for k, v in WORST.items()})
