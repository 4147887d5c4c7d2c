"""detkit's detection pipeline around the network, in NumPy only: for the end-to-end peers.

bench/peers.py --end-to-end times each peer from a BGR uint8 photo to boxes in its pixels. The
ONNX peers (OpenVINO, onnxruntime) run in a venv without torch, so their pre- and
post-processing is this module; detkit's forward passes (detkit-auto, -fast, -bf16, -ort) are
timed inside it too, so that those peers differ only in the network's runtime, and detkit's own
torch pipeline (`detkit-detector`: Detector.predict_arrays) is timed as what a detkit user gets.

Every step is detkit's, ported: darknet's letterbox (resize_image's taps, 0.5 gray canvas),
the candidate rule of detkit.boxes.postprocess (objectness > conf, then objectness * p(class) >
conf), greedy NMS per class (torchvision's batched_nms: IoU > nms_thresh suppresses, no +1),
at most `max_det` boxes, and darknet's correct_yolo_boxes back to the photo, clipped.
tests/test_bench_numpy_pipeline.py checks it against detkit on a real photo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRAY = np.float32(0.5)


@dataclass(frozen=True)
class Placement:
    """Where the photo sits in the network input (detkit.engine.letterbox.Placement)."""

    img_w: int
    img_h: int
    new_w: int
    new_h: int
    dx: int
    dy: int


def placement(img_w: int, img_h: int, net_w: int, net_h: int, letterbox: bool) -> Placement:
    if not letterbox:
        return Placement(img_w, img_h, net_w, net_h, 0, 0)
    if np.float32(net_w) / np.float32(img_w) < np.float32(net_h) / np.float32(img_h):
        new_w, new_h = net_w, max(1, (img_h * net_w) // img_w)
    else:
        new_w, new_h = max(1, (img_w * net_h) // img_h), net_h
    return Placement(img_w, img_h, new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2)


def taps(src: int, dst: int, last_edge: bool) -> tuple[np.ndarray, ...]:
    """darknet resize_image's source indices and weights along one axis (detkit's _taps)."""
    scale = np.float32(src - 1) / np.float32(dst - 1) if dst > 1 else np.float32(0)
    pos = np.arange(dst, dtype=np.float32) * scale
    idx0 = np.minimum(pos.astype(np.int64), src - 1)
    frac = (pos - idx0.astype(np.float32)).astype(np.float32)
    w0, w1 = (np.float32(1) - frac).astype(np.float32), frac.copy()
    if last_edge:
        idx0[-1], w0[-1], w1[-1] = src - 1, 1.0, 0.0
    else:
        w1[-1] = 0.0
    if src == 1:
        w0[:], w1[:] = 1.0, 0.0
    return idx0, np.minimum(idx0 + 1, src - 1), w0, w1


def letterbox(image_bgr: np.ndarray, net_size: tuple[int, int], boxed: bool = True
              ) -> tuple[np.ndarray, Placement]:
    """BGR uint8 (H, W, 3) -> (1, 3, net_h, net_w) float32 RGB in [0, 1], and its placement."""
    net_w, net_h = net_size
    h, w = image_bgr.shape[:2]
    place = placement(w, h, net_w, net_h, boxed)
    if (w, h) == (place.new_w, place.new_h):
        resized = image_bgr.astype(np.float32) / np.float32(255.0)
    else:
        c0, c1, cw0, cw1 = taps(w, place.new_w, last_edge=True)
        left = image_bgr[:, c0].astype(np.float32) / np.float32(255.0)
        right = image_bgr[:, c1].astype(np.float32) / np.float32(255.0)
        rows = left * cw0[:, None] + right * cw1[:, None]
        r0, r1, rw0, rw1 = taps(h, place.new_h, last_edge=False)
        resized = rows[r0] * rw0[:, None, None] + rows[r1] * rw1[:, None, None]
    batch = np.full((1, 3, net_h, net_w), GRAY, dtype=np.float32)
    batch[0, :, place.dy:place.dy + place.new_h, place.dx:place.dx + place.new_w] = \
        resized.transpose(2, 0, 1)[::-1]
    return batch, place


def box_iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of `others` (torchvision's box_iou: no +1)."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                  iou_thresh: float) -> np.ndarray:
    """Indices kept by greedy NMS within each class, best score first (batched_nms's answer):
    one vectorised IoU per kept box; a box of another class is never suppressed."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        best, order = order[0], order[1:]
        keep.append(best)
        suppressed = ((classes[order] == classes[best])
                      & (box_iou_one(boxes[best], boxes[order]) > iou_thresh))   # NaN: kept
        order = order[~suppressed]
    return np.asarray(keep, dtype=np.int64)


MAX_NMS = 30000   # detkit.boxes.MAX_NMS: at most this many best candidates enter NMS


def postprocess(preds: np.ndarray, conf_thresh: float, nms_thresh: float, max_det: int
                ) -> np.ndarray:
    """One image's (N, 5+C) head output (cx, cy, w, h, objectness, p(class)...) in input pixels
    -> (K, 6) x1, y1, x2, y2, score, class, sorted by score."""
    candidates = preds[preds[:, 4] > conf_thresh]
    scores = candidates[:, 4:5] * candidates[:, 5:]
    row, cls = np.nonzero(scores > conf_thresh)
    cx, cy, w, h = candidates[row, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    score = scores[row, cls]
    if len(score) > MAX_NMS:
        best = np.sort(np.argpartition(-score, MAX_NMS)[:MAX_NMS])
        boxes, score, cls = boxes[best], score[best], cls[best]
    keep = nms_per_class(boxes, score, cls, nms_thresh)[:max_det]
    return np.concatenate([boxes[keep], score[keep, None], cls[keep, None].astype(boxes.dtype)], 1)


def correct_boxes(dets: np.ndarray, place: Placement, net_size: tuple[int, int]) -> np.ndarray:
    """darknet's correct_yolo_boxes: input pixels -> photo pixels, clipped to the photo."""
    out = dets.copy()
    pad_x, pad_y = (net_size[0] - place.new_w) / 2.0, (net_size[1] - place.new_h) / 2.0
    out[:, [0, 2]] = np.clip((dets[:, [0, 2]] - pad_x) * (place.img_w / place.new_w), 0, place.img_w)
    out[:, [1, 3]] = np.clip((dets[:, [1, 3]] - pad_y) * (place.img_h / place.new_h), 0, place.img_h)
    return out


def detect(forward, image_bgr: np.ndarray, net_size: tuple[int, int], boxed: bool,
           conf_thresh: float = 0.25, nms_thresh: float = 0.45, max_det: int = 300) -> np.ndarray:
    """The whole pipeline around `forward` ((1, 3, H, W) float32 -> (1, N, 5+C) array):
    (K, 6) x1, y1, x2, y2, score, class in the photo's pixels (detkit detect's defaults)."""
    x, place = letterbox(image_bgr, net_size, boxed)
    preds = np.asarray(forward(x), dtype=np.float32)[0]
    return correct_boxes(postprocess(preds, conf_thresh, nms_thresh, max_det), place, net_size)
