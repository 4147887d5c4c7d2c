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
    evaluate_detections,
    evaluate_voc,
    format_report,
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


def hand_made_case():
    """Class 0: 3 truths in 2 images; ranked TP (IoU 1), FP, TP at IoU 0.73 (a hit at IoU
    0.50..0.70, a miss at 0.75..0.95), one truth never found. Class 1: one truth; a TP and an FP
    of equal score, then a hit on a difficult truth (ignored)."""
    a = truth([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0], [70, 70, 80, 80, 1]], [False, False, True])
    b = truth([[0, 0, 10, 10, 0], [40, 40, 60, 60, 1]])
    detections = [dets([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [70, 70, 80, 80, 0.5, 1]]),
                  dets([[0, 0, 10, 7.3, 0.7, 0], [40, 40, 60, 60, 0.6, 1], [0, 50, 10, 60, 0.6, 1]])]
    return detections, [a, b]


def test_per_class_p_r_ap50_and_ap50_95_hand_computed():
    detections, truths = hand_made_case()
    report = evaluate_detections(detections, truths)
    c0, c1, overall = report.classes[0], report.classes[1], report.overall
    # class 0: precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3; F1 .5, .4, 2/3 -> the third (score .7)
    assert (c0.images, c0.instances) == (2, 3)
    assert (c0.precision, c0.recall, c0.score) == pytest.approx((2 / 3, 2 / 3, 0.7))
    assert c0.ap == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)       # 5/9 at IoU 0.50..0.70
    assert c0.ap07 == pytest.approx((4 * 1 + 3 * 2 / 3) / 11)
    assert c0.ap50_95 == pytest.approx((5 * 5 / 9 + 5 * 1 / 3) / 10)  # 1/3 at IoU 0.75..0.95
    # class 1: the tie at .6 cannot be split by a threshold, so F1 is 2/3 (P .5, R 1), not 1
    assert (c1.images, c1.instances) == (1, 1)                 # the difficult box is not counted
    assert (c1.precision, c1.recall, c1.score) == pytest.approx((0.5, 1.0, 0.6))
    assert (c1.ap, c1.ap07, c1.ap50_95) == pytest.approx((1.0, 1.0, 1.0))
    # all: class means, images and instances in total
    assert (overall.images, overall.instances) == (2, 4)
    assert (overall.precision, overall.recall) == pytest.approx((7 / 12, 5 / 6))
    assert (overall.ap, overall.ap07, overall.ap50_95) == pytest.approx((7 / 9, 17 / 22, 13 / 18))
    # the same curves and AP as evaluate_voc, which the plots and the training loop use
    voc = evaluate_voc(detections, truths)
    assert report.voc.ap == pytest.approx(voc.ap)
    assert all((report.voc.precision[c] == voc.precision[c]).all() for c in voc.ap)


def test_eval_table_layout():
    detections, truths = hand_made_case()
    lines = format_report(evaluate_detections(detections, truths), ["cat", "dog"])
    assert lines[0].startswith("P, R: at the score of each class's best F1 (IoU 0.5)")
    assert lines[1].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95", "VOC07"]
    assert lines[2].split() == ["all", "2", "4", "0.5833", "0.8333", "0.7778", "0.7222", "0.7727"]
    assert lines[3].split() == ["cat", "2", "3", "0.6667", "0.6667", "0.5556", "0.4444", "0.5455"]
    assert lines[4].split() == ["dog", "1", "1", "0.5000", "1.0000", "1.0000", "1.0000", "1.0000"]
    assert lines[5].split() == ["mAP@0.5", "0.7778", "AP50", "(AUC)", "0.7727", "AP50", "(VOC07)"]
    loose = format_report(evaluate_detections(detections, truths, iou_thresh=0.4))
    assert loose[1].split()[5] == "mAP40" and loose[-1].startswith("mAP@0.4 ")
    assert "AP40 (AUC)" in loose[-1]  # tests/test_trees.py and bench/ read this line


def test_ap50_95_close_to_pycocotools():
    """detkit's AP50-95 (VOC matching, area under the envelope) and pycocotools' AP (its own
    matching, 101-point precision) are different estimators of the same thing: within 0.01 here
    (the real-model case is in test_eval_cli_fast_path_scores_like_the_eager_model)."""
    detections, truths = random_case()
    ours = evaluate_detections(detections, truths).overall.ap50_95
    assert ours == pytest.approx(evaluate_coco(detections, truths, num_classes=3)["AP"], abs=0.01)


def random_case(seed: int = 0):
    rng = np.random.default_rng(seed)
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
    return detections, truths


def test_coco_metrics_equal_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections, truths = random_case()
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
        assert re.search(r"^Class\s+Images\s+Instances\s+P\s+R\s+mAP50\s+mAP50-95\s+VOC07$", run.stdout, re.M)
        row = r"^(\S+)\s+\d+\s+\d+\s+[0-9.]+\s+[0-9.]+\s+([0-9.]+)\s+([0-9.]+)\s+[0-9.]+$"
        rows = {name: (float(ap50), float(ap50_95)) for name, ap50, ap50_95 in re.findall(row, run.stdout, re.M)}
        table = {name: ap50 for name, (ap50, _) in rows.items()}  # per class and `all`
        table["mAP@0.5"] = float(re.search(r"^mAP@0.5\s+([0-9.]+) AP50 \(AUC\)", run.stdout, re.M).group(1))
        table["detections"] = int(re.search(r"(\d+) detections", run.stdout).group(1))
        # detkit's own AP50-95 (VOC matching, area under the envelope) against pycocotools' AP
        coco_ap = float(re.search(r"^COCO: AP ([0-9.]+)", run.stdout, re.M).group(1))
        assert rows["all"][1] == pytest.approx(coco_ap, abs=0.01), (rows["all"], coco_ap)
        assert table["all"] == pytest.approx(table["mAP@0.5"], abs=1e-4)
        return table

    fast, eager = evaluate(), evaluate("--no-fast")
    assert fast.keys() == eager.keys() and eager["mAP@0.5"] > 0.5
    for name in fast.keys() - {"detections"}:  # a candidate near --conf may round either way
        assert fast[name] == pytest.approx(eager[name], abs=2e-3), name
    assert evaluate("--tta")["mAP@0.5"] > 0.5  # the views' placement is tested in test_tta.py
    capped = evaluate("--max-det", "1")
    assert capped["detections"] == 6 < fast["detections"]
    assert capped["mAP@0.5"] < fast["mAP@0.5"]
