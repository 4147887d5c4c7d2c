"""Detection metrics: Pascal VOC mAP (2007 11-point and area under the curve) and COCO via
pycocotools. Inputs are plain per-image arrays so any data set or model can be scored."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageDetections:
    boxes: np.ndarray    # (K, 4) x1, y1, x2, y2 pixels
    scores: np.ndarray   # (K,)
    classes: np.ndarray  # (K,) int


@dataclass
class ImageTruth:
    boxes: np.ndarray                # (M, 4) x1, y1, x2, y2 pixels
    classes: np.ndarray              # (M,) int
    difficult: np.ndarray | None = None  # (M,) bool; VOC 'difficult' boxes are ignored
    width: int = 0
    height: int = 0


@dataclass
class VocResult:
    ap: dict[int, float] = field(default_factory=dict)       # per class with ground truth
    precision: dict[int, np.ndarray] = field(default_factory=dict)
    recall: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def map(self) -> float:
        return float(np.mean(list(self.ap.values()))) if self.ap else 0.0

    def labels(self, names: Sequence[str] | Mapping[int, str] | None = None) -> dict[int, str]:
        """A unique display name per scored class: `names[id]` where given, else the id.

        Plots and reports key their legends by name, so two classes that share a name (or a
        name that looks like another class's id) get their id appended instead of one hiding
        the other.
        """
        labels: dict[int, str] = {}
        for cls in sorted(self.ap):
            name = _class_name(cls, names)
            labels[cls] = name if name not in labels.values() else f"{name} ({cls})"
        return labels

    def curves(self, names: Sequence[str] | Mapping[int, str] | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(recall, precision) per scored class, keyed by `labels(names)`, in detection-rank order.

        This is the raw curve `voc_ap` integrates (not its precision envelope), the shape
        `plots.plot_pr_curves` takes.
        """
        return {label: (self.recall[cls], self.precision[cls])
                for cls, label in self.labels(names).items()}

    def named_ap(self, names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, float]:
        """AP per scored class keyed like `curves(names)`, for legends and reports."""
        return {label: self.ap[cls] for cls, label in self.labels(names).items()}


def _class_name(cls: int, names: Sequence[str] | Mapping[int, str] | None) -> str:
    if isinstance(names, Mapping):
        return str(names.get(cls, cls))
    if names is not None and 0 <= cls < len(names):
        return str(names[cls])
    return str(cls)


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP as the VOC devkit computes it: 11-point (VOC2007) or the area under the curve."""
    if use_07_metric:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0
                  for t in np.arange(0.0, 1.1, 0.1)]
        return float(np.mean(points))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def box_iou_np(box: np.ndarray, boxes: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    wh = np.clip(rb - lt + pixel_offset, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0] + pixel_offset) * (box[3] - box[1] + pixel_offset)
    areas = (boxes[:, 2] - boxes[:, 0] + pixel_offset) * (boxes[:, 3] - boxes[:, 1] + pixel_offset)
    return inter / np.maximum(area + areas - inter, 1e-12)


def evaluate_voc(detections: list[ImageDetections], truths: list[ImageTruth],
                 iou_thresh: float = 0.5, use_07_metric: bool = False,
                 pixel_offset: float = 0.0) -> VocResult:
    """Per-class AP with the VOC devkit's matching (voc_eval.py).

    Detections of a class are taken by descending score (stable for ties); each is a true
    positive if its best-overlapping truth (IoU > iou_thresh) is not difficult and not yet taken,
    ignored if that truth is difficult, else a false positive. `pixel_offset=1` reproduces the
    devkit's inclusive-pixel areas.
    """
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")
    result = VocResult()
    classes = sorted({int(c) for t in truths for c in t.classes})
    for cls in classes:
        precision, recall = _class_curve(detections, truths, cls, iou_thresh, pixel_offset)
        if precision is None:
            continue
        result.precision[cls], result.recall[cls] = precision, recall
        result.ap[cls] = voc_ap(recall, precision, use_07_metric) if len(recall) else 0.0
    return result


def _class_curve(detections, truths, cls, iou_thresh, pixel_offset):
    gt_boxes, gt_difficult, taken = [], [], []
    npos = 0
    for truth in truths:
        mask = truth.classes == cls
        difficult = truth.difficult[mask] if truth.difficult is not None else np.zeros(mask.sum(), bool)
        gt_boxes.append(truth.boxes[mask])
        gt_difficult.append(difficult.astype(bool))
        taken.append(np.zeros(mask.sum(), bool))
        npos += int((~difficult.astype(bool)).sum())
    if npos == 0:
        return None, None
    image_of, scores, boxes = [], [], []
    for i, det in enumerate(detections):
        mask = det.classes == cls
        image_of += [i] * int(mask.sum())
        scores.append(det.scores[mask])
        boxes.append(det.boxes[mask])
    scores = np.concatenate(scores) if scores else np.zeros(0)
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    order = np.argsort(-scores, kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, d in enumerate(order):
        img = image_of[d]
        if len(gt_boxes[img]) == 0:
            fp[rank] = 1
            continue
        overlaps = box_iou_np(boxes[d], gt_boxes[img], pixel_offset)
        best = int(overlaps.argmax())
        if overlaps[best] > iou_thresh:
            if gt_difficult[img][best]:
                continue
            if not taken[img][best]:
                tp[rank], taken[img][best] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return precision, recall


COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl",
                   "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def coco_json(detections: list[ImageDetections], image_ids: list[int],
              category_ids: list[int] | None = None) -> list[dict]:
    """Detections in the COCO results format (bbox as x, y, w, h)."""
    rows = []
    for det, image_id in zip(detections, image_ids, strict=True):
        for box, score, cls in zip(det.boxes, det.scores, det.classes, strict=True):
            category = category_ids[int(cls)] if category_ids else int(cls)
            rows.append({"image_id": int(image_id), "category_id": int(category),
                         "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                  float(box[3] - box[1])], "score": float(score)})
    return rows


def coco_ground_truth(truths: list[ImageTruth], image_ids: list[int], num_classes: int,
                      category_ids: list[int] | None = None) -> dict:
    images, annotations = [], []
    for truth, image_id in zip(truths, image_ids, strict=True):
        images.append({"id": int(image_id), "width": truth.width, "height": truth.height})
        difficult = truth.difficult if truth.difficult is not None else np.zeros(len(truth.classes), bool)
        for box, cls, hard in zip(truth.boxes, truth.classes, difficult, strict=True):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id),
                                "category_id": category_ids[int(cls)] if category_ids else int(cls),
                                "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h,
                                "iscrowd": int(bool(hard))})
    ids = category_ids or list(range(num_classes))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": int(c), "name": str(c)} for c in ids]}


def evaluate_coco(detections: list[ImageDetections], truths: list[ImageTruth],
                  num_classes: int) -> dict[str, float]:
    """The 12 COCO numbers from pycocotools' COCOeval (difficult boxes count as crowd)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = list(range(1, len(truths) + 1))
    gt = COCO()
    gt.dataset = coco_ground_truth(truths, image_ids, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = coco_json(detections, image_ids)
        if not results:
            return dict.fromkeys(COCO_STAT_NAMES, 0.0)
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(COCO_STAT_NAMES, (float(v) for v in evaluator.stats), strict=True))
