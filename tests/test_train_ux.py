"""Training UX (issue 25): the all-warm-up warning, one line per evaluation, the run folder's
pictures (results, confusion matrix, labels, first batch), the per-iteration record, and
best.weights beside best.pt. Tiny runs on the synthetic squares of test_train."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_train import CFG, make_data

import detkit
from detkit.engine import train as train_module
from detkit.engine.evaluate import ImageDetections, ImageTruth
from detkit.engine.plots import PALETTE, map_range, plot_training
from detkit.engine.train import Trainer, TrainOptions, confusion_matrix, match_one_to_one

LINE = re.compile(r"^iteration (\d+)/(\d+): mAP@0\.5 (\d\.\d{3}) \(best (\d\.\d{3})\) loss \S+$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares-ux")
    (root / "tiny.cfg").write_text(CFG.format(bn=1))
    return root, make_data(root / "train", 12, 0), make_data(root / "val", 4, 1)


def options(data, out: Path, **overrides) -> TrainOptions:
    root, train, val = data
    base = dict(cfg=root / "tiny.cfg", train=train, val=val, out=out, workers=0, eval_interval=0,
                checkpoint_interval=100, quiet=True, seed=3, names=["square"])
    base.update(overrides)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """4 iterations, evaluated at 2 and 4, with the mAP forced to 0.5 then 0.2: best.pt is
    iteration 2's and last.pt iteration 4's, so a best.weights written from the wrong model
    cannot pass for the right one."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ux") / "run"
    real = train_module.evaluate_voc
    forced = iter([0.5, 0.2])

    def scripted(detections, truths, **kwargs):
        result = real(detections, truths, **kwargs)
        result.ap = {0: next(forced)}
        return result

    reports = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "evaluate_voc", scripted)
        result = Trainer(options(data, out, max_batches=4, eval_interval=2,
                                 on_evaluate=reports.append)).train()
    return out, result, reports


def image(path: Path) -> np.ndarray:
    picture = cv2.imread(str(path))
    assert picture is not None, path
    return picture


# -- 1. a run that is all warm-up says so ----------------------------------------------------------
def test_a_run_no_longer_than_burn_in_warns(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="detkit"):
        Trainer(options(data, tmp_path / "short", max_batches=2)).train()  # the cfg's burn_in=2
    assert "max_batches 2 <= burn_in 2: the whole run is warm-up" in caplog.text
    assert "--burn-in N" in caplog.text


def test_a_run_past_burn_in_does_not_warn(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="detkit"):
        Trainer(options(data, tmp_path / "normal", max_batches=3)).train()
        Trainer(options(data, tmp_path / "no-warm-up", max_batches=1, burn_in=0)).train()
    assert "warm-up" not in caplog.text


# -- 2. one line per evaluation --------------------------------------------------------------------
def test_each_evaluation_is_reported_in_one_line(run):
    _, result, reports = run
    lines = [report.line() for report in reports]
    assert len(lines) == 2, lines
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.groups()[:4] for m in parsed] == [("2", "4", "0.500", "0.500"), ("4", "4", "0.200", "0.500")]
    assert all(np.isfinite(report.loss) for report in reports)
    assert result.best_map == 0.5 and result.last_map == pytest.approx(0.2)


def test_the_cli_prints_the_evaluation_lines_even_with_quiet(data, tmp_path):
    from typer.testing import CliRunner

    from detkit import cli

    root, train, _ = data
    listing, pictures = tmp_path / "train.txt", tmp_path / "pictures"
    pictures.mkdir()
    for sample in train[:6]:
        rows = [f"0 {' '.join(f'{v:.6f}' for v in box)}" for box in sample.boxes]
        (pictures / sample.image.name).write_bytes(sample.image.read_bytes())
        (pictures / sample.image.with_suffix(".txt").name).write_text("\n".join(rows) + "\n")
    listing.write_text("\n".join(str(pictures / s.image.name) for s in train[:6]) + "\n")
    result = CliRunner().invoke(cli.app, [
        "train", "--data", str(listing), "--val", str(listing), "--cfg", str(root / "tiny.cfg"),
        "--out", str(tmp_path / "cli"), "--max-batches", "2", "--eval-interval", "1",
        "--burn-in", "0", "--workers", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("iteration ")]
    assert [LINE.match(line).group(1) for line in lines] == ["1", "2"], result.output


# -- 3./4. the run folder ----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "min_size"), [
    ("loss.png", (300, 200)), ("map.png", (300, 200)), ("lr.png", (300, 200)), ("pr.png", (300, 200)),
    ("results.png", (800, 300)), ("confusion_matrix.png", (150, 150)), ("labels.jpg", (900, 300)),
])
def test_the_run_folder_holds_its_pictures(run, name, min_size):
    picture = image(run[0] / name)
    height, width = picture.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], picture.shape
    assert picture.std() > 0


def test_train_batch0_is_the_first_micro_batch_with_its_boxes(run):
    picture = image(run[0] / "train_batch0.jpg")
    # 4 images (batch 8 / subdivisions 2) of 64 px, 2 x 2, each enlarged to 160 px to be seen
    assert picture.shape == (320, 320, 3)
    box = np.abs(picture.astype(int) - PALETTE[0]).sum(-1) < 90  # class 0's colour
    assert box.sum() > 40


def test_iterations_csv_has_one_row_per_iteration(run):
    out = run[0]
    with (out / "iterations.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [1, 2, 3, 4]
    assert {"lr", "loss", "xy", "wh", "obj", "noobj", "cls"} <= set(rows[0])
    assert [float(row["lr"]) for row in rows] == [pytest.approx(h["lr"]) for h in run[1].history]
    with (out / "metrics.csv").open() as handle:
        assert [int(row["iteration"]) for row in csv.DictReader(handle)] == [2, 4]  # unchanged


def test_a_run_without_validation_still_draws_its_training_charts(data, tmp_path):
    out = tmp_path / "no-val"
    Trainer(options(data, out, val=[], max_batches=1)).train()
    for name in ("loss.png", "lr.png", "results.png", "labels.jpg", "train_batch0.jpg"):
        assert image(out / name).std() > 0, name
    assert not (out / "map.png").exists() and not (out / "best.weights").exists()


# -- 5. best.weights ----------------------------------------------------------------------------------
def float_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_best_weights_are_best_pt_in_darknet_format(run, data):
    out = run[0]
    cfg = data[0] / "tiny.cfg"
    assert torch.load(out / "best.pt", weights_only=True)["iteration"] == 2
    from_weights = float_state(detkit.load_model(cfg, out / "best.weights"))
    from_pt = float_state(detkit.load_model(cfg, out / "best.pt"))
    last = float_state(detkit.load_model(cfg, out / "last.weights"))
    assert from_weights.keys() == from_pt.keys()
    assert all(torch.equal(from_weights[k], from_pt[k]) for k in from_pt)
    assert any(not torch.equal(from_weights[k], last[k]) for k in last)  # not iteration 4's


# -- the charts' data ----------------------------------------------------------------------------------
def test_map_axis_starts_at_zero():
    assert map_range(np.array([0.40, 0.41])) == (0.0, pytest.approx(0.451))
    assert map_range(np.array([np.nan])) == (0.0, 1.0)
    assert map_range(np.array([1.0])) == (0.0, 1.05)


def test_loss_and_lr_charts_come_from_the_per_iteration_record(tmp_path):
    """metrics.csv's loss falls, iterations.csv's rises: the chart must show the rising one."""
    (tmp_path / "metrics.csv").write_text("iteration,map50,lr,loss\n50,0.1,0.001,10\n100,0.2,0.001,0\n")
    rows = "".join(f"{i},0.001,{i / 10}\n" for i in range(1, 101))
    (tmp_path / "iterations.csv").write_text("iteration,lr,loss\n" + rows)
    written = plot_training(tmp_path / "metrics.csv", tmp_path, iterations_csv=tmp_path / "iterations.csv")
    assert [p.name for p in written] == ["loss.png", "map.png", "lr.png"]
    line = np.abs(image(tmp_path / "loss.png").astype(int) - PALETTE[0]).sum(-1) < 40
    assert line[300:450, 60:300].any() and line[40:200, 550:780].any()  # bottom left to top right
    assert not line[300:450, 550:780].any()


# -- the confusion matrix --------------------------------------------------------------------------------
def boxes(*rows) -> np.ndarray:
    return np.array(rows, np.float64).reshape(-1, 4)


def test_confusion_matrix_counts_a_hit_a_false_alarm_and_a_miss():
    truth = ImageTruth(boxes([0, 0, 10, 10], [20, 20, 30, 30]), np.array([0, 1]))
    found = ImageDetections(boxes([0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]),
                            np.array([0.9, 0.8, 0.1]), np.array([0, 1, 1]))  # the last under 0.25
    matrix = confusion_matrix([found], [truth], num_classes=2)
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0] = 1  # class 0 found as class 0
    expected[1, 2] = 1  # a class-1 detection of nothing: background column
    expected[2, 1] = 1  # the class-1 label nothing matched: background row
    np.testing.assert_array_equal(matrix, expected)


def test_confusion_matrix_wrong_class_and_duplicates():
    truth = ImageTruth(boxes([0, 0, 10, 10], [40, 40, 50, 50]), np.array([0, 0]))
    found = ImageDetections(boxes([0, 0, 10, 10], [1, 1, 10, 10], [40, 40, 50, 50]),
                            np.array([0.5, 0.9, 0.6]), np.array([0, 0, 1]))
    matrix = confusion_matrix([found], [truth], num_classes=2)
    # the exact box wins the first label (higher IoU, whatever the score); its duplicate is a
    # false alarm; the second label is found with the wrong class
    np.testing.assert_array_equal(matrix, [[1, 0, 1], [1, 0, 0], [0, 0, 0]])
    iou = np.array([[0.9, 0.6], [0.7, 0.0]])
    assert match_one_to_one(iou, 0.5).tolist() == [[0, 0]]  # detection 0 is taken once
