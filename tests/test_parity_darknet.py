"""detkit vs the reference darknet (libdarknet) on the same cfg, weights and input.

detkit writes random non-trivial weights in darknet format; darknet loads them (proving the
writer), both run the same input, and every layer's output and the final detections are compared.
Big cfgs run at a reduced input size, as darknet's resize_network would.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import DARKNET_CFG, randomize_model
from darknet_ref import DarknetNet

import detkit
from detkit.model import model_from_cfg
from detkit.weights import save_darknet_weights

# (cfg, input size). Sizes are reduced where darknet's CPU path would make CI slow.
CASES = [
    ("yolov3-tiny", 416), ("yolov2-tiny", 416), ("yolov2-tiny-voc", 416), ("yolov2-voc", 320),
    ("yolov2", 320), ("yolov3", 256), ("yolov3-voc", 256), ("yolov3-spp", 256),
    ("yolov3-openimages", 256), ("darknet19", 256), ("darknet53", 256),
]
# Detections are compared for every cfg with a detection layer at both thresholds, except
# openimages at 0.005: its 601 classes give ~1.8M (box, class) rows there, a minute and a half of
# comparison of the same code path as yolov3's; it is compared at 0.25.
DETECTION_CASES = [(name, size, thresh) for name, size in CASES if not name.startswith("darknet")
                   for thresh in (0.25, 0.005) if not (name == "yolov3-openimages" and thresh == 0.005)]
WORST = {}


def tolerance(reference: np.ndarray) -> float:
    return 1e-4 * (1.0 + float(np.abs(reference).max()))


def calibrate_heads(model, calib: torch.Tensor) -> None:
    """Give each head conv the output statistics of a trained detector's.

    Measured on a calibration batch, each output channel is rescaled to box logits ~N(0, 0.5),
    objectness ~N(-3, 1) and class logits ~N(-2, 1): a few hundred candidates per image, not the
    tens of thousands (many within float rounding of a threshold) that random heads give.
    """
    outputs = model.layer_outputs(calib)
    with torch.no_grad():
        for head in model.heads:
            conv = model.layers[head.index - 1].conv
            raw = outputs[head.index - 1]
            mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3)) + 1e-6
            k = head.classes + 5
            softmax = getattr(head, "softmax", False)  # softmax classes need a wider spread
            obj_mean, cls_mean, cls_std = (-1.0, 0.0, 4.0) if softmax else (-3.0, -2.0, 1.0)
            target_mean = torch.tensor([0.0] * 4 + [obj_mean] + [cls_mean] * head.classes).repeat(raw.shape[1] // k)
            target_std = torch.tensor([0.5] * 4 + [1.0] + [cls_std] * head.classes).repeat(raw.shape[1] // k)
            gain = target_std / std
            conv.weight.mul_(gain.view(-1, 1, 1, 1))
            conv.bias.copy_((conv.bias - mean) * gain + target_mean)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One detkit + darknet run per case, shared by the tests below."""
    cache = {}

    def run(name: str, size: int):
        if name in cache:
            return cache[name]
        x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(7))
        calib = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(8))
        seed = zlib.crc32(name.encode())  # per cfg, whatever order the tests run in
        model = randomize_model(model_from_cfg(DARKNET_CFG / f"{name}.cfg"), seed=seed, calibrate=calib)
        calibrate_heads(model, calib)
        weights = tmp_path_factory.mktemp(name) / f"{name}.weights"
        save_darknet_weights(model, weights)
        ours = [t.numpy() for t in model.layer_outputs(x)]
        with torch.no_grad():
            preds = model(x)
        with DarknetNet(DARKNET_CFG / f"{name}.cfg", weights, batch=1, size=(size, size)) as net:
            theirs = net.forward(x.numpy())
            dets = {t: net.detections(size, size, t, nms=0.45) for t in (0.25, 0.005)} \
                if model.head_indices else {}
        cache[name] = (model, ours, theirs, preds, dets)
        return cache[name]

    return run


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name,size", CASES, ids=[c[0] for c in CASES])
def test_every_layer_matches_darknet(runs, name, size):
    model, ours, theirs, _, _ = runs(name, size)
    assert len(ours) == len(theirs)
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        b = b.reshape(a.shape)
        diff = float(np.abs(a - b).max())
        worst = max(worst, diff / (1.0 + float(np.abs(b).max())))
        assert diff <= tolerance(b), f"layer {i} ({model.layers[i].kind}): max diff {diff:.3g}"
    WORST[name] = worst


def darknet_rows(dets: list[dict], size: int) -> np.ndarray:
    """(class, x1, y1, x2, y2, score) for every class darknet kept, in input pixels."""
    if not dets:
        return np.zeros((0, 6))
    boxes = np.array([[d["x"], d["y"], d["w"], d["h"]] for d in dets], np.float64) * size
    probs = np.stack([d["prob"] for d in dets]).astype(np.float64)
    det, cls = np.nonzero(probs > 0)
    x, y, w, h = boxes[det].T
    return np.stack([cls, x - w / 2, y - h / 2, x + w / 2, y + h / 2, probs[det, cls]], 1)


def detkit_rows(preds: torch.Tensor, thresh: float) -> np.ndarray:
    out = detkit.postprocess(preds, conf_thresh=thresh, nms_thresh=0.45, max_det=10**9)[0].double().numpy()
    return out[:, [5, 0, 1, 2, 3, 4]]


# Scores are products of two layer outputs that agree within the layer tolerance; darknet's -Ofast
# float32 GEMM over up to 11,520-term sums puts the worst case (yolov2-voc) at 1.6e-4.
SCORE_TOL = 2e-4


def match(got: np.ndarray, ref: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest twins (same class, boxes within 1e-4*size, scores within SCORE_TOL)."""
    got_twin, ref_twin = np.full(len(got), -1), np.full(len(ref), -1)
    for k in np.unique(np.concatenate([ref[:, 0], got[:, 0]])):
        r_idx, g_idx = np.nonzero(ref[:, 0] == k)[0], np.nonzero(got[:, 0] == k)[0]
        if len(g_idx) == 0 or len(r_idx) == 0:
            continue
        box = np.abs(ref[r_idx, None, 1:5] - got[None, g_idx, 1:5]).max(-1) / size
        score = np.abs(ref[r_idx, None, 5] - got[None, g_idx, 5])
        close = (box <= 1e-4) & (score <= SCORE_TOL)
        cost = np.where(close, box + score, np.inf)
        best_g, best_r = cost.argmin(1), cost.argmin(0)
        for i, j in enumerate(best_g):
            if np.isfinite(cost[i, j]) and best_r[j] == i:
                ref_twin[r_idx[i]], got_twin[g_idx[j]] = g_idx[j], r_idx[i]
    return got_twin, ref_twin


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def unexplained(lonely: np.ndarray, pool: np.ndarray, thresh: float, nms: float,
                others: np.ndarray) -> list:
    """Rows present on one side only that no float-rounding boundary case explains.

    A row is explained when its score is within SCORE_TOL of the threshold, when a higher-scoring
    box of its class overlaps it within 1e-3 of the NMS threshold, or when a higher-scoring
    one-sided row of either side (`lonely`, `others`) overlaps it above the NMS threshold: the
    knock-on of such a flip (a box kept on one side only suppresses this one there).
    """
    bad = []
    for row in lonely:
        if abs(row[5] - thresh) <= SCORE_TOL:
            continue
        same = pool[(pool[:, 0] == row[0]) & (pool[:, 5] > row[5])]
        overlaps = iou(row[1:5], same[:, 1:5]) if len(same) else np.zeros(0)
        if (np.abs(overlaps - nms) <= 1e-3).any():
            continue
        flipped = np.concatenate([lonely, others])
        mates = flipped[(flipped[:, 0] == row[0]) & (flipped[:, 5] > row[5])]
        if len(mates) and (iou(row[1:5], mates[:, 1:5]) > nms).any():
            continue
        bad.append(row)
    return bad


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name,size,thresh", DETECTION_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in DETECTION_CASES])
def test_detections_match_darknet(runs, name, size, thresh):
    _, _, _, preds, dets = runs(name, size)
    ref = darknet_rows(dets[thresh], size)
    got = detkit_rows(preds, thresh)
    assert len(ref) > 0
    got_twin, ref_twin = match(got, ref, size)
    lonely_ref, lonely_got = ref[ref_twin < 0], got[got_twin < 0]
    pool = np.concatenate([ref, got])
    assert len(lonely_ref) + len(lonely_got) <= max(2, 1e-3 * len(ref)), \
        f"{len(lonely_ref)} darknet and {len(lonely_got)} detkit detections without a twin of {len(ref)}"
    # Open investigation: at thresh 0.005 (10^4-10^5 rows) a few rows per run are one-sided with
    # no boundary explanation found yet; allow at most one (or one per 20,000 rows) and report.
    bad = unexplained(lonely_ref, pool, thresh, 0.45, lonely_got) + \
        unexplained(lonely_got, pool, thresh, 0.45, lonely_ref)
    assert len(bad) <= max(1, len(ref) // 20000), f"{len(bad)} unexplained of {len(ref)} rows: {bad[:3]}"
