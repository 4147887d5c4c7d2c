"""Detection metrics: Pascal VOC mAP (2007 11-point and area under the curve), per-class
precision and recall at the best F1 and AP over IoU 0.50:0.95 (`detkit eval`'s table), and COCO
via pycocotools. Inputs are plain per-image arrays so any data set or model can be scored."""

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
    _check_lengths(detections, truths)
    result = VocResult()
    for cls in _truth_classes(truths):
        ranked = _match_class(detections, truths, cls, (iou_thresh,), pixel_offset)
        if ranked is None:
            continue
        precision, recall = ranked.curve(0)
        result.precision[cls], result.recall[cls] = precision, recall
        result.ap[cls] = voc_ap(recall, precision, use_07_metric) if len(recall) else 0.0
    return result


def _check_lengths(detections: list[ImageDetections], truths: list[ImageTruth]) -> None:
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")


def _truth_classes(truths: list[ImageTruth]) -> list[int]:
    return sorted({int(c) for t in truths for c in t.classes})


@dataclass
class _Ranked:
    """One class's detections by descending score, matched at T IoU thresholds at once."""

    scores: np.ndarray  # (K,)
    tp: np.ndarray      # (T, K) 1 where the detection is a true positive at that threshold
    fp: np.ndarray      # (T, K); a detection on a difficult truth is neither
    npos: int           # truths that count (not difficult)
    images: int         # images holding at least one of them

    def curve(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) after each detection, at threshold index t."""
        tp, fp = np.cumsum(self.tp[t]), np.cumsum(self.fp[t])
        return tp / np.maximum(tp + fp, np.finfo(np.float64).eps), tp / self.npos


def _match_class(detections, truths, cls: int, thresholds: Sequence[float],
                 pixel_offset: float) -> _Ranked | None:
    """voc_eval.py's matching for several IoU thresholds in one pass over the detections.

    The best-overlapping truth does not depend on the threshold, so each detection's overlaps
    are computed once; whether it hits, and which truths are taken, is kept per threshold.
    None when the class has no truth that counts.
    """
    thresholds = np.asarray(thresholds, np.float64)
    gt_boxes, gt_difficult, taken = [], [], []
    npos, images = 0, 0
    for truth in truths:
        mask = truth.classes == cls
        difficult = truth.difficult[mask] if truth.difficult is not None else np.zeros(mask.sum(), bool)
        difficult = difficult.astype(bool)
        gt_boxes.append(truth.boxes[mask])
        gt_difficult.append(difficult)
        taken.append(np.zeros((len(thresholds), int(mask.sum())), bool))
        npos += int((~difficult).sum())
        images += bool((~difficult).any())
    if npos == 0:
        return None
    image_of, scores, boxes = [], [], []
    for i, det in enumerate(detections):
        mask = det.classes == cls
        image_of += [i] * int(mask.sum())
        scores.append(det.scores[mask])
        boxes.append(det.boxes[mask])
    scores = np.concatenate(scores) if scores else np.zeros(0)
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros((len(thresholds), len(order)))
    fp = np.zeros((len(thresholds), len(order)))
    for rank, d in enumerate(order):
        img = image_of[d]
        if len(gt_boxes[img]) == 0:
            fp[:, rank] = 1
            continue
        overlaps = box_iou_np(boxes[d], gt_boxes[img], pixel_offset)
        best = int(overlaps.argmax())
        hit = overlaps[best] > thresholds
        if gt_difficult[img][best]:
            fp[~hit, rank] = 1  # a hit on a difficult truth is ignored
            continue
        new = hit & ~taken[img][:, best]
        taken[img][new, best] = True
        tp[new, rank] = 1
        fp[~new, rank] = 1
    return _Ranked(scores[order], tp, fp, npos, images)


COCO_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95


@dataclass
class ClassMetrics:
    """One row of `detkit eval`'s table (ultralytics val's columns, plus VOC07)."""

    images: int              # images holding at least one scored truth of the class
    instances: int           # scored truths (difficult / crowd boxes left out)
    precision: float         # at `score`, the threshold of the best F1
    recall: float
    score: float | None      # None: no detection of the class
    ap: float                # AP at the evaluation IoU: area under the precision envelope
    ap07: float              # the same, VOC2007 11-point
    ap50_95: float           # mean of `ap`'s kind over IoU 0.50:0.05:0.95


@dataclass
class EvalReport:
    """Per-class metrics at one IoU (with COCO's IoU range beside), and the VOC curves."""

    iou_thresh: float
    images: int
    classes: dict[int, ClassMetrics]
    voc: VocResult           # precision/recall curves and AP at iou_thresh (plots)

    def _mean(self, name: str) -> float:
        values = [getattr(m, name) for m in self.classes.values()]
        return float(np.mean(values)) if values else 0.0

    @property
    def overall(self) -> ClassMetrics:
        """The `all` row: class means (as ultralytics), images and instances in total."""
        return ClassMetrics(self.images, sum(m.instances for m in self.classes.values()),
                            self._mean("precision"), self._mean("recall"), None,
                            self._mean("ap"), self._mean("ap07"), self._mean("ap50_95"))


def best_f1_point(scores: np.ndarray, precision: np.ndarray, recall: np.ndarray
                  ) -> tuple[float, float, float | None]:
    """(precision, recall, score) where F1 is highest along a ranked curve.

    Only a place a score threshold can stop at counts: after the last of detections with equal
    scores. A tie of F1 goes to the higher threshold. (ultralytics instead takes one threshold
    for all classes, from the smoothed mean F1 on a 1000-point grid; per class and exact keeps
    each class at its own best and the figures checkable by hand.)
    """
    if len(scores) == 0:
        return 0.0, 0.0, None
    stops = np.append(scores[1:] != scores[:-1], True)
    total = precision + recall
    f1 = np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)
    k = int(np.argmax(np.where(stops, f1, -1.0)))
    return float(precision[k]), float(recall[k]), float(scores[k])


def evaluate_detections(detections: list[ImageDetections], truths: list[ImageTruth],
                        iou_thresh: float = 0.5, pixel_offset: float = 0.0) -> EvalReport:
    """Everything `detkit eval` prints per class, from one matching pass per class.

    AP at `iou_thresh` (area under the curve and 11-point, as evaluate_voc), AP over COCO's IoU
    range with the same VOC matching and envelope area, and P and R at the best F1 at
    `iou_thresh`. pycocotools' overall AP differs slightly (its own matching, 101-point
    precision), see tests/test_evaluate.py for by how much.
    """
    _check_lengths(detections, truths)
    thresholds = (iou_thresh, *COCO_IOUS)
    voc, classes = VocResult(), {}
    for cls in _truth_classes(truths):
        ranked = _match_class(detections, truths, cls, thresholds, pixel_offset)
        if ranked is None:
            continue
        curves = [ranked.curve(t) for t in range(len(thresholds))]
        aps = [voc_ap(r, p) if len(r) else 0.0 for p, r in curves]
        precision, recall = curves[0]
        voc.precision[cls], voc.recall[cls], voc.ap[cls] = precision, recall, aps[0]
        p, r, score = best_f1_point(ranked.scores, precision, recall)
        ap07 = voc_ap(recall, precision, use_07_metric=True) if len(recall) else 0.0
        classes[cls] = ClassMetrics(ranked.images, ranked.npos, p, r, score, aps[0], ap07,
                                    float(np.mean(aps[1:])))
    return EvalReport(iou_thresh, len(truths), classes, voc)


def format_report(report: EvalReport, names: Sequence[str] | Mapping[int, str] | None = None
                  ) -> list[str]:
    """`detkit eval`'s table: a note on how P, R and AP are taken, the columns of ultralytics'
    val (Class, Images, Instances, P, R, mAP50, mAP50-95; an `all` row first) plus VOC07, and
    darknet's closing mAP@ line, which scripts read."""
    iou = report.iou_thresh
    ap_name = f"AP{round(iou * 100):d}"
    lines = [f"P, R: at the score of each class's best F1 (IoU {iou:g}); m{ap_name}: area under "
             f"the precision envelope; mAP50-95: its mean over IoU 0.50:0.05:0.95; VOC07: "
             f"{ap_name} 11-point",
             f"{'Class':20s} {'Images':>7s} {'Instances':>9s} {'P':>7s} {'R':>7s} "
             f"{'m' + ap_name:>7s} {'mAP50-95':>8s} {'VOC07':>7s}"]
    rows = [("all", report.overall)]
    rows += [(label, report.classes[cls]) for cls, label in report.voc.labels(names).items()]
    for label, m in rows:
        lines.append(f"{label:20s} {m.images:7d} {m.instances:9d} {m.precision:7.4f} "
                     f"{m.recall:7.4f} {m.ap:7.4f} {m.ap50_95:8.4f} {m.ap07:7.4f}")
    overall = report.overall
    lines.append(f"{'mAP@' + format(iou, 'g'):20s} {overall.ap:.4f} {ap_name} (AUC)  "
                 f"{overall.ap07:.4f} {ap_name} (VOC07)")
    return lines


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
