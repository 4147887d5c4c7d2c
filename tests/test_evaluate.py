"""VOC AP on hand-computed cases; COCO metrics equal pycocotools run directly."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from detkit.engine.evaluate import (
    ImageDetections,
    ImageTruth,
    coco_ground_truth,
    coco_json,
    evaluate_coco,
    evaluate_voc,
    voc_ap,
)


def dets(rows):
    rows = np.array(rows, np.float64).reshape(-1, 6)
    return ImageDetections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int))


def truth(rows, difficult=None):
    rows = np.array(rows, np.float64).reshape(-1, 5)
    return ImageTruth(rows[:, :4], rows[:, 4].astype(int),
                      None if difficult is None else np.array(difficult, bool), 100, 100)


def test_voc_ap_hand_computed():
    # 2 truths; detections ranked TP, FP, TP -> precision 1, .5, .667 at recall .5, .5, 1
    result = evaluate_voc(
        [dets([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [20, 20, 30, 30, 0.7, 0]])],
        [truth([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]])])
    # AUC: recall 0->.5 at precision 1, .5->1 at precision 2/3
    assert result.ap[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    result07 = evaluate_voc(
        [dets([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [20, 20, 30, 30, 0.7, 0]])],
        [truth([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]])], use_07_metric=True)
    assert result07.ap[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_iou_threshold_decides_a_loose_box():
    # [3, 0, 13, 10] against the truth [0, 0, 10, 10]: IoU 70 / 130 = 0.538, TP at 0.5, FP at 0.6
    truths = [truth([[0, 0, 10, 10, 0]])]
    loose = [dets([[3, 0, 13, 10, 0.9, 0]])]
    assert evaluate_voc(loose, truths, iou_thresh=0.5).ap[0] == pytest.approx(1.0)
    assert evaluate_voc(loose, truths, iou_thresh=0.6).ap[0] == pytest.approx(0.0)


def test_difficult_is_ignored_and_duplicates_are_false_positives():
    truths = [truth([[0, 0, 10, 10, 0], [40, 40, 50, 50, 0]], difficult=[False, True])]
    result = evaluate_voc([dets([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0],
                                 [40, 40, 50, 50, 0.95, 0]])], truths)
    # As voc_eval.py: the difficult hit keeps its rank with tp = fp = 0; TP at .9; the duplicate
    # at .8 is FP -> AP 1.0 (recall 1 is reached at precision 1)
    assert result.recall[0].tolist() == [0.0, 1.0, 1.0]
    assert result.precision[0].tolist() == [0.0, 1.0, 0.5]
    assert result.ap[0] == pytest.approx(1.0)


def test_ties_keep_input_order_and_missing_class_scores_zero():
    truths = [truth([[0, 0, 10, 10, 0]]), truth([[0, 0, 10, 10, 1]])]
    result = evaluate_voc([dets([[30, 30, 40, 40, 0.5, 0], [0, 0, 10, 10, 0.5, 0]]), dets([])], truths)
    assert result.precision[0].tolist() == [0.0, 0.5]  # stable: the FP ranks first
    assert result.ap[1] == 0.0 and result.map == pytest.approx((0.5 + 0.0) / 2)


def test_voc_ap_curve_functions():
    assert voc_ap(np.array([1.0]), np.array([1.0])) == 1.0
    assert voc_ap(np.array([0.5]), np.array([1.0]), use_07_metric=True) == pytest.approx(6 / 11)


def test_coco_metrics_equal_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    truths, detections = [], []
    for _ in range(6):
        xy = rng.uniform(0, 60, (5, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 40, (5, 2)), rng.integers(0, 3, (5, 1))], 1)
        truths.append(truth(gt))
        jitter = gt[:, :4] + rng.normal(0, 3, (5, 4))
        extra = np.concatenate([rng.uniform(0, 60, (3, 2)), rng.uniform(60, 99, (3, 2))], 1)
        boxes = np.concatenate([jitter, extra])
        detections.append(ImageDetections(boxes, rng.uniform(0.05, 1, 8),
                                          np.concatenate([gt[:, 4], rng.integers(0, 3, 3)]).astype(int)))
    ours = evaluate_coco(detections, truths, num_classes=3)
    ids = list(range(1, 7))
    gt = COCO()
    gt.dataset = coco_ground_truth(truths, ids, 3)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(coco_json(detections, ids)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert list(ours.values()) == pytest.approx(list(evaluator.stats))
    assert 0.0 < ours["AP50"] <= 1.0



def test_eval_cli_fast_path_scores_like_the_eager_model(tiny_weights, tmp_path):
    """`detkit eval` on darknet's photos, labelled with the eager model's own detections at 0.25
    (so the mAP is high, not a vacuous 0): the default fast path and --no-fast give the same table."""
    import re
    import subprocess
    import sys

    import cv2
    from conftest import DARKNET_DATA, REPO

    from detkit.engine.predict import Detector

    eager_detector = Detector(REPO / "cfg" / "yolov3-tiny.cfg", tiny_weights, device="cpu", fast=False)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    listing = []
    for name in ("dog", "horses", "person", "eagle", "giraffe", "kite"):
        photo = DARKNET_DATA / f"{name}.jpg"
        if not photo.exists():
            pytest.skip("darknet's sample photos are not installed")
        image = cv2.imread(str(photo))
        rows = eager_detector.predict_arrays([image])[0].numpy()
        h, w = image.shape[:2]
        lines = [f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                 for x1, y1, x2, y2, _, c in rows]
        (tmp_path / "labels" / f"{name}.txt").write_text("\n".join(lines) + "\n")
        (tmp_path / "images" / f"{name}.jpg").write_bytes(photo.read_bytes())
        listing.append(str(tmp_path / "images" / f"{name}.jpg"))
    (tmp_path / "photos.txt").write_text("\n".join(listing) + "\n")

    def evaluate(*extra: str) -> dict[str, float]:
        run = subprocess.run([sys.executable, "-m", "detkit", "eval", "--cfg", str(REPO / "cfg" / "yolov3-tiny.cfg"),
                              "--weights", str(tiny_weights), "--data", str(tmp_path / "photos.txt"),
                              "--device", "cpu", *extra], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "COCO: AP " in run.stdout
        table = {name: float(value) for name, value in re.findall(r"^(\S+)\s+([0-9.]+)\s+[0-9.]+$", run.stdout, re.M)}
        table["detections"] = int(re.search(r"(\d+) detections", run.stdout).group(1))
        return table

    fast, eager = evaluate(), evaluate("--no-fast")
    assert fast.keys() == eager.keys() and eager["mAP@0.5"] > 0.5
    for name in fast.keys() - {"detections"}:  # a candidate near --conf may round either way
        assert fast[name] == pytest.approx(eager[name], abs=2e-3), name
    assert evaluate("--tta")["mAP@0.5"] > 0.5  # the views' placement is tested in test_tta.py
    capped = evaluate("--max-det", "1")
    assert capped["detections"] == 6 < fast["detections"]
    assert capped["mAP@0.5"] < fast["mAP@0.5"]
