"""Anchor k-means (distance 1 - IoU) and the `detkit anchors` command."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from detkit.anchors import kmeans_anchors, mean_best_iou, wh_iou
from detkit.cli import app
from detkit.errors import DataError

CENTRES = np.array([[12.0, 16.0], [40.0, 90.0], [95.0, 50.0], [210.0, 180.0]])  # network pixels


def clustered(rng, per_cluster: int = 150, spread: float = 0.04) -> np.ndarray:
    """Box shapes in tight multiplicative clouds around CENTRES."""
    clouds = [c * np.exp(rng.normal(0, spread, (per_cluster, 2))) for c in CENTRES]
    return np.concatenate(clouds)


def test_wh_iou_by_hand():
    iou = wh_iou(np.array([[10.0, 20.0]]), np.array([[10.0, 20.0], [20.0, 10.0], [5.0, 5.0]]))
    np.testing.assert_allclose(iou[0], [1.0, 100 / 300, 25 / 200])


def test_known_clusters_are_recovered():
    wh = clustered(np.random.default_rng(0))
    result = kmeans_anchors(wh, 4, restarts=5, seed=1)
    np.testing.assert_allclose(result.anchors, CENTRES, rtol=0.02)  # sorted by area, as CENTRES
    assert result.mean_iou > 0.9
    assert result.mean_iou == pytest.approx(mean_best_iou(wh, result.anchors))


def test_sorted_by_area_and_reproducible():
    wh = np.random.default_rng(2).uniform(5, 300, (500, 2))
    a = kmeans_anchors(wh, 9, restarts=3, seed=7)
    b = kmeans_anchors(wh, 9, restarts=3, seed=7)
    areas = a.anchors.prod(1)
    assert (np.diff(areas) >= 0).all() and np.array_equal(a.anchors, b.anchors)
    assert a.line().startswith("anchors = ") and a.line().count(",  ") == 8


def test_more_restarts_never_worse():
    wh = np.random.default_rng(3).lognormal(3.5, 0.8, (400, 2))
    one = kmeans_anchors(wh, 6, restarts=1, seed=0).mean_iou
    many = kmeans_anchors(wh, 6, restarts=8, seed=0).mean_iou  # the first run is the same one
    assert many >= one


def test_too_few_shapes_and_empty_boxes():
    with pytest.raises(DataError, match="only 2 distinct box shapes"):
        kmeans_anchors(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 3.0]]), 3)
    result = kmeans_anchors(np.array([[1.0, 2.0], [0.0, 3.0], [3.0, 3.0]]), 2)
    assert result.skipped == 1 and len(result.wh) == 2


def make_darknet_data(root: Path, wh_norm: np.ndarray, rng) -> Path:
    """A darknet .data with one label file per 20 boxes, random centres and classes."""
    lines = []
    for k in range(0, len(wh_norm), 20):
        name = f"img{k // 20:03d}"
        rows = [f"{rng.integers(3)} {rng.uniform(0.2, 0.8):.6f} {rng.uniform(0.2, 0.8):.6f} "
                f"{w:.6f} {h:.6f}" for w, h in wh_norm[k:k + 20]]
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{name}.txt").write_text("\n".join(rows) + "\n")
        lines.append(f"images/{name}.jpg")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "my.data").write_text("classes = 3\ntrain = train.txt\n")
    return root / "my.data"


def parse_output(text: str) -> tuple[np.ndarray, float]:
    line = next(x for x in text.splitlines() if x.startswith("anchors = "))
    values = [float(v) for v in line[len("anchors = "):].replace(" ", "").split(",")]
    iou = float(re.search(r"best anchor: ([0-9.]+)", text).group(1))
    return np.array(values).reshape(-1, 2), iou


def direct_best_iou(boxes: list[tuple[float, float]], anchors: np.ndarray) -> float:
    """Plain-Python mean IoU of each box with its best anchor (independent of detkit)."""
    total = 0.0
    for bw, bh in boxes:
        best = 0.0
        for aw, ah in anchors:
            inter = min(bw, aw) * min(bh, ah)
            best = max(best, inter / (bw * bh + aw * ah - inter))
        total += best
    return total / len(boxes)


def test_cli_on_darknet_labels_agrees_with_direct_computation(tmp_path):
    rng = np.random.default_rng(5)
    size = np.array([416, 320])
    data = make_darknet_data(tmp_path, clustered(rng, 60) / size, rng)
    result = CliRunner().invoke(app, ["anchors", "--data", str(data), "--num", "4",
                                      "--img-size", "416x320", "--restarts", "3"])
    assert result.exit_code == 0, result.output
    anchors, printed_iou = parse_output(result.output)
    # Direct computation: every label line of every label file, w * 416, h * 320.
    boxes = []
    for label in sorted((tmp_path / "labels").glob("*.txt")):
        for line in label.read_text().split("\n"):
            if line:
                _, _, _, w, h = (float(v) for v in line.split())
                boxes.append((w * 416, h * 320))
    assert f"{len(boxes)} boxes from 12 images at 416x320" in result.output
    np.testing.assert_allclose(anchors, CENTRES, rtol=0.03, atol=0.5)
    assert printed_iou == pytest.approx(direct_best_iou(boxes, anchors), abs=1e-4)
    assert (np.diff(anchors.prod(1)) > 0).all()


def test_cli_region_units_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    data = make_darknet_data(tmp_path, clustered(rng, 30) / 416, rng)
    runner = CliRunner()
    grid = runner.invoke(app, ["anchors", "--data", str(data), "--num", "4", "--stride", "32"])
    assert grid.exit_code == 0, grid.output
    anchors, _ = parse_output(grid.output)
    np.testing.assert_allclose(anchors, CENTRES / 32, rtol=0.03, atol=0.01)
    bad = runner.invoke(app, ["anchors", "--data", str(tmp_path / "none.data")])
    assert bad.exit_code != 0


def test_cli_on_pascal_voc_tree_crowns():
    """Real Pascal VOC labels (DeepForest tree crowns): 951 boxes, 9 anchors sorted by area; the
    printed mean IoU is that of the printed anchors."""
    from conftest import REPO

    from detkit.anchors import dataset_anchors
    from detkit.data import read_dataset

    folder = REPO / "assets" / "deepforest"
    result = CliRunner().invoke(app, ["anchors", "--data", str(folder), "--num", "9"])
    assert result.exit_code == 0, result.output
    assert "951 boxes from 4 images at 416x416" in result.output
    anchors, printed_iou = parse_output(result.output)
    assert anchors.shape == (9, 2) and (np.diff(anchors.prod(1)) >= 0).all()
    wh = read_dataset(folder).boxes()[:, 2:4] * 416
    assert printed_iou == pytest.approx(mean_best_iou(wh, anchors), abs=1e-4)
    direct = dataset_anchors(read_dataset(folder), 9, (416, 416))
    np.testing.assert_allclose(np.maximum(np.round(direct.anchors), 1), anchors)
