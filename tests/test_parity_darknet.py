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
from detkit.boxes import cxcywh_to_xyxy
from detkit.model import model_from_cfg
from detkit.weights import save_darknet_weights

# (cfg, input size). Sizes are reduced where darknet's CPU path would make CI slow.
CASES = [
    ("yolov3-tiny", 416), ("yolov2-tiny", 416), ("yolov2-tiny-voc", 416), ("yolov2-voc", 320),
    ("yolov2", 320), ("yolov3", 256), ("yolov3-voc", 256), ("yolov3-spp", 256),
    ("yolov3-openimages", 256), ("darknet19", 256), ("darknet53", 256),
]
# Detections are compared for every cfg with a detection layer at both thresholds, except
# openimages at 0.005: its 601 classes give 1.3M candidates and 0.9M kept rows there, a minute of
# comparison (and 2 GB) for the same code path as yolov3's; it is compared at 0.25. (Run once, it
# passes: 14 one-sided rows, 7 threshold, 6 order, 1 knock-on.)
DETECTION_CASES = [(name, size, thresh) for name, size in CASES if not name.startswith("darknet")
                   for thresh in (0.25, 0.005) if not (name == "yolov3-openimages" and thresh == 0.005)]
WORST = {}
NMS = 0.45  # darknet's detector and valid/map


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
            # before (nms=0: get_network_boxes alone) and after do_nms_sort
            dets = {t: (net.detections(size, size, t, nms=0), net.detections(size, size, t, nms=NMS))
                    for t in (0.25, 0.005)} if model.head_indices else {}
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


# Detections. Rows are compared by identity, not by nearest neighbour: the same (head, anchor,
# cell, class) on both sides. Tolerances are per row, propagated from the head input's element-wise
# differences (which the layer test bounds): a box's width is anchor * e^t, so its corners move by
# w/2 * dt (a 1,427 px box of yolov2-voc differs by 0.034 px, beyond a flat 1e-4 * size), and a
# score obj * p moves by about s * dt (0.01 scores differ by 1e-7, not the 1e-4 a flat bound
# allows). Greedy NMS then amplifies rounding only through three flips, each checked for: a score
# straddling the threshold, an IoU straddling the NMS threshold, and two overlapping boxes whose
# scores swap order (yolov3 class 50: 0.02411926 > 0.02411872 in darknet, 0.02411896 < 0.0241192 in
# detkit, IoU 0.477: each side keeps the other box), plus what such a flip knocks on.

# Float32 rounding allowance, relative, for what the first-order bounds below leave out: the
# rounding of each side's sigmoid/softmax and product (a few ulps of 2^-24 each; measured at most
# 6.5 * 2^-24 over the first-order term) and second-order terms (dt^2 / 8 <= 1e-7).
ROUNDING = 2.0**-19
IOU_SLACK = 1e-6  # darknet's box_iou (float32, centre format) vs the float64 IoU of the rows


def head_rows(model, maps: list) -> np.ndarray:
    """Per-head (A*(5+C), H, W) maps as (A*H*W, 5+C) rows, heads concatenated in cfg order: the
    rows of detkit's predictions (anchor-major, darknet's entry order)."""
    rows = []
    for head, m in zip(model.heads, maps, strict=True):
        m = np.asarray(m, np.float32).reshape(head.num_anchors, head.classes + 5, -1)
        rows.append(m.transpose(0, 2, 1).reshape(-1, head.classes + 5))
    return np.concatenate(rows)


def head_geometry(model, ours: list, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prediction row: its head's stride (x, y) in pixels and whether its classes are a softmax."""
    stride, softmax = [], []
    for head in model.heads:
        h, w = ours[head.index].shape[-2:]
        stride.append(np.tile([size / w, size / h], (head.num_anchors * h * w, 1)))
        softmax.append(np.full(head.num_anchors * h * w, bool(getattr(head, "softmax", False))))
    return np.concatenate(stride), np.concatenate(softmax)


def darknet_row_index(model, theirs: list, thresh: float) -> np.ndarray:
    """The prediction row (head, anchor, cell) of each detection get_network_boxes returns.

    A [yolo] layer lists, cell by cell and within a cell anchor by anchor, those with objectness
    > thresh (yolo_layer.c get_yolo_detections l.322-328); a [region] layer lists every anchor of
    every cell, at index n*w*h + i (region_layer.c get_region_detections l.395).
    """
    index, offset = [], 0
    for head in model.heads:
        out = theirs[head.index]
        cells = out.shape[-1] * out.shape[-2]
        out = out.reshape(head.num_anchors, head.classes + 5, cells)
        if head.kind == "yolo":
            cell, anchor = np.nonzero(out[:, 4].T > np.float32(thresh))
            index.append(offset + anchor * cells + cell)
        else:
            index.append(offset + np.arange(head.num_anchors * cells))
        offset += head.num_anchors * cells
    return np.concatenate(index)


class Candidates:
    """One side's (prediction row, class) pairs above the threshold, before and after NMS.

    `key` = row * classes + class (the same key on both sides names the same anchor of the same
    cell and class); `box` corners in input pixels; `score`; `kept` by NMS.
    """

    def __init__(self, key, box, score, kept):
        order = np.argsort(key)
        self.key, self.box, self.score, self.kept = key[order], box[order], score[order], kept[order]
        assert len(np.unique(self.key)) == len(self.key)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key, -1 where it is not a candidate."""
        if len(self.key) == 0:
            return np.full(len(keys), -1)
        pos = np.searchsorted(self.key, keys).clip(0, len(self.key) - 1)
        return np.where(self.key[pos] == keys, pos, -1)


def darknet_candidates(pre: list[dict], post: list[dict], rows: np.ndarray, classes: int,
                       size: int) -> Candidates:
    assert len(rows) == len(pre), "darknet's detections do not follow its layers' loop order"
    box = np.array([[d["x"], d["y"], d["w"], d["h"]] for d in pre], np.float64).reshape(-1, 4) * size
    prob = np.stack([d["prob"] for d in pre]) if pre else np.zeros((0, classes), np.float32)
    # do_nms_sort reorders the detections (qsort) and zeroes suppressed probabilities, nothing
    # else: find each post-NMS detection's pre-NMS position by its box and objectness.
    where = {(d["x"], d["y"], d["w"], d["h"], d["objectness"]): i for i, d in enumerate(pre)}
    assert len(where) == len(pre)
    kept = np.zeros(prob.shape, bool)
    for d in post:
        i = where[(d["x"], d["y"], d["w"], d["h"], d["objectness"])]
        kept[i] = d["prob"] > 0
        assert np.all((d["prob"] == 0) | (d["prob"] == prob[i]))
    det, cls = np.nonzero(prob > 0)
    x, y, w, h = box[det].T
    corners = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)
    return Candidates(rows[det] * classes + cls, corners, prob[det, cls].astype(np.float64), kept[det, cls])


def detkit_candidates(preds: torch.Tensor, thresh: float) -> Candidates:
    """postprocess's candidates (the same float32 operations) and which of them it keeps."""
    p = preds[0]
    classes = p.shape[1] - 5
    rows = (p[:, 4] > thresh).nonzero()[:, 0]
    scores = p[rows, 4:5] * p[rows, 5:]
    r, cls = (scores > thresh).nonzero(as_tuple=True)
    box, score = cxcywh_to_xyxy(p[rows[r], :4]), scores[r, cls]
    where = {tuple(v): i for i, v in enumerate(torch.cat([box, score[:, None], cls[:, None].to(box.dtype)], 1).tolist())}
    kept = np.zeros(len(r), bool)
    for v in detkit.postprocess(preds, conf_thresh=thresh, nms_thresh=NMS, max_det=10**9)[0].tolist():
        kept[where[tuple(v)]] = True
    return Candidates((rows[r] * classes + cls).numpy(), box.double().numpy(), score.double().numpy(), kept)


def scores_of(act: np.ndarray, keys: np.ndarray, classes: int) -> np.ndarray:
    """objectness * p(class) in float32, as get_yolo/region_detections and postprocess compute it."""
    row, k = keys // classes, keys % classes
    return (act[row, 4] * act[row, 5 + k]).astype(np.float64)


def score_tolerance(act, delta, softmax, keys, classes, score) -> np.ndarray:
    """First-order bound on |detkit - darknet| of objectness * p(class), from the head input's
    element-wise differences `delta` (the logits; `act` their activations).

    d log sigmoid(o) = (1 - sigmoid(o)) do; a logistic class likewise; a softmax class
    d log p_k = dc_k - sum_j p_j dc_j, at most (1 - 2 p_k)|dc_k| + sum_j p_j |dc_j|.
    """
    row, k = keys // classes, keys % classes
    p_k, d_k = act[row, 5 + k], delta[row, 5 + k]
    spread = (act[:, 5:] * delta[:, 5:]).sum(1)[row]  # sum_j p_j |dc_j| of each key's row
    cls = np.where(softmax[row], spread + (1 - 2 * p_k) * d_k, (1 - p_k) * d_k)
    rel = (1 - act[row, 4]) * delta[row, 4] + cls
    return score * (np.expm1(rel) + ROUNDING)


def box_tolerance(act, delta, stride, keys, classes, wh, size) -> np.ndarray:
    """First-order bound on a corner's |detkit - darknet| (x1, y1, x2, y2), in pixels.

    Centre (cell + sigmoid(t)) * stride moves by stride * sigmoid'(t) dt; size anchor * e^t by
    size * (e^dt - 1); a corner by the first plus half the second.
    """
    row = keys // classes
    a, d = act[row, :4], delta[row, :4]
    centre = stride[row] * a[:, 0:2] * (1 - a[:, 0:2]) * d[:, 0:2]
    half = wh * np.expm1(d[:, 2:4]) / 2
    tol = centre + half + ROUNDING * (size + wh)
    return np.concatenate([tol, tol], 1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def why_one_sided(key: int, side: Candidates, other: Candidates, score_side, score_other,
                  classes: int) -> str | None:
    """Why a (row, class) NMS kept on `side` only: the rounding-level flip it follows from.

    "threshold": not a candidate on `other` (its score straddles the threshold, checked apart).
    On `other` NMS suppressed it, so some q kept there outranks it with IoU > NMS (greedy NMS,
    box.c do_nms_sort l.76-86; ties in score, which darknet's qsort orders arbitrarily, count as
    outranking). On `side` q did not suppress it, because
      "order": q does not outrank it there (their scores swap within rounding);
      "iou": their IoU is <= NMS there (it straddles the NMS threshold);
      "knock-on": q is not kept on `side` (suppressed or below the threshold there), so q is a
        one-sided row itself, explained in turn (the chain climbs in score on both sides, so it
        ends at a flip above).
    None: no such q, or every q would have suppressed it on `side` too: not rounding.
    """
    i = other.find(np.array([key]))[0]
    if i < 0:
        return "threshold"
    suppressors = np.nonzero((other.key % classes == key % classes) & other.kept)[0]
    suppressors = suppressors[score_other(other.key[suppressors]) >= score_other(np.array([key]))[0]]
    suppressors = suppressors[iou(other.box[i], other.box[suppressors]) > NMS - IOU_SLACK]
    mine = side.find(np.array([key]))[0]
    found = None
    for q in suppressors:
        there = side.find(other.key[q:q + 1])[0]
        if there >= 0 and score_side(side.key[there:there + 1])[0] <= score_side(np.array([key]))[0]:
            return "order"
        if there >= 0 and iou(side.box[mine], side.box[there:there + 1])[0] <= NMS + IOU_SLACK:
            return "iou"
        if there < 0 or not side.kept[there]:
            found = "knock-on"
    return found


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("name,size,thresh", DETECTION_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in DETECTION_CASES])
def test_detections_match_darknet(runs, name, size, thresh):
    """darknet's get_network_boxes + do_nms_sort vs detkit's decode + postprocess.

    Every (anchor, cell, class) above the threshold on either side is named by the same key on
    both: boxes and scores must agree within their first-order bounds from the head input's
    element-wise differences (plus float32 rounding); a pair above the threshold on one side only
    must straddle it; every row NMS keeps on one side only must follow from such a flip
    (see why_one_sided). No row is left unexplained.
    """
    model, ours, theirs, preds, dets = runs(name, size)
    pre, post = dets[thresh]
    classes = model.heads[-1].classes
    for head in model.heads:  # the head inputs pass the layer test's bound
        inp = theirs[head.index - 1].reshape(ours[head.index - 1].shape)
        assert np.abs(ours[head.index - 1] - inp).max() <= tolerance(inp)
    act_dk = head_rows(model, [ours[h.index] for h in model.heads])
    act_dn = head_rows(model, [theirs[h.index] for h in model.heads])
    delta = np.abs(head_rows(model, [ours[h.index - 1] for h in model.heads])
                   - head_rows(model, [theirs[h.index - 1] for h in model.heads])).astype(np.float64)
    stride, softmax = head_geometry(model, ours, size)
    dn = darknet_candidates(pre, post, darknet_row_index(model, theirs, thresh), classes, size)
    dk = detkit_candidates(preds, thresh)
    score_dn = lambda keys: scores_of(act_dn, keys, classes)  # noqa: E731
    score_dk = lambda keys: scores_of(preds[0].numpy(), keys, classes)  # noqa: E731
    assert len(dn.key) > 0
    assert np.array_equal(dn.score, score_dn(dn.key)), "darknet's detections are not its l.output"
    assert np.array_equal(dk.score, score_dk(dk.key))

    # scores of every candidate of either side; boxes of the pairs on both
    keys = np.union1d(dn.key, dk.key)
    s_dn, s_dk = score_dn(keys), score_dk(keys)
    score_err = np.abs(s_dn - s_dk) / score_tolerance(act_dk, delta, softmax, keys, classes, np.maximum(s_dn, s_dk))
    assert score_err.max() <= 1, f"score error {score_err.max():.2f}x its bound at {keys[score_err.argmax()]}"
    both = np.intersect1d(dn.key, dk.key)
    box_dn, box_dk = dn.box[dn.find(both)], dk.box[dk.find(both)]
    wh = np.maximum(box_dn[:, 2:] - box_dn[:, :2], box_dk[:, 2:] - box_dk[:, :2])
    box_err = np.abs(box_dn - box_dk) / box_tolerance(act_dk, delta, stride, both, classes, wh, size)
    assert box_err.max() <= 1, f"box error {box_err.max():.2f}x its bound at {both[box_err.argmax() // 4]}"
    for key in np.setxor1d(dn.key, dk.key):  # above the threshold on one side only
        s = np.array([score_dn(np.array([key]))[0], score_dk(np.array([key]))[0]])
        assert s.min() <= thresh < s.max(), f"{key} is one-sided without straddling the threshold: {s}"

    # rows NMS keeps on one side only
    why = {}
    for side, other, s_side, s_other in ((dn, dk, score_dn, score_dk), (dk, dn, score_dk, score_dn)):
        for key in side.key[side.kept]:
            i = other.find(np.array([key]))[0]
            if i < 0 or not other.kept[i]:
                why[int(key)] = why_one_sided(key, side, other, s_side, s_other, classes)
    counts = {c: sum(v == c for v in why.values()) for c in ("threshold", "order", "iou", "knock-on")}
    print(f"\n{name}@{size} thresh {thresh}: {len(keys)} candidates ({len(np.setxor1d(dn.key, dk.key))} "
          f"one-sided), {dn.kept.sum()} darknet / {dk.kept.sum()} detkit rows kept, one-sided {counts}; "
          f"worst box {np.abs(box_dn - box_dk).max() / size:.1e}*size ({box_err.max():.3f} of its bound), "
          f"score {np.abs(s_dn - s_dk).max():.1e} ({score_err.max():.3f} of its bound)")
    bad = [k for k, v in why.items() if v is None]
    assert not bad, f"{len(bad)} one-sided rows no rounding flip explains: keys {bad[:5]}"
    assert len(why) <= max(2, 1e-3 * dn.kept.sum()), f"{len(why)} one-sided rows of {dn.kept.sum()}"
