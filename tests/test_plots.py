"""OpenCV charts: nice ticks, valid non-blank PNGs where the data says, robustness to empty/NaN
data, the trainer's metrics.csv as charts and per-class precision-recall curves."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from detkit.engine.evaluate import ImageDetections, ImageTruth, evaluate_voc
from detkit.engine.plots import (
    PALETTE,
    format_tick,
    latest_run,
    line_chart,
    loss_columns,
    nice_step,
    nice_ticks,
    padded_range,
    plot_pr_curves,
    plot_training,
    read_metrics,
    render_line_chart,
    series_color,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def colored(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 40) -> np.ndarray:
    """Mask of pixels within `tolerance` (sum of channel differences) of a BGR colour."""
    return np.abs(image.astype(int) - np.array(color)).sum(-1) < tolerance


def read_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (size[1], size[0], 3)
    return image


# -- ticks -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "step"), [(1, 1), (0.13, 0.2), (2.1, 5), (5, 5), (7, 10),
                                           (0.0003, 0.0005), (1234, 2000), (1e-9, 1e-9)])
def test_nice_step_rounds_up_to_1_2_5(raw, step):
    assert nice_step(raw) == pytest.approx(step)


@pytest.mark.parametrize("raw", [0, -1, math.nan, math.inf])
def test_nice_step_rejects_non_positive(raw):
    with pytest.raises(ValueError):
        nice_step(raw)


def test_nice_ticks_known_ranges():
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # exact floats, not 0.6000000001
    assert nice_ticks(0, 1000, 11) == [float(v) for v in range(0, 1001, 100)]
    assert nice_ticks(-3.3, 7.7, 5) == [-2.0, 0.0, 2.0, 4.0, 6.0]
    assert nice_ticks(0.0001, 0.00123) == [0.0002, 0.0004, 0.0006, 0.0008, 0.001, 0.0012]


def test_nice_ticks_properties_on_random_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scale = 10.0 ** rng.uniform(-8, 8)
        lo = rng.uniform(-1, 1) * scale
        hi = lo + rng.uniform(1e-3, 2) * scale
        max_ticks = int(rng.integers(6, 12))
        ticks = nice_ticks(lo, hi, max_ticks)
        assert 2 <= len(ticks) <= max_ticks
        assert all(lo - 1e-9 * scale <= t <= hi + 1e-9 * scale for t in ticks)
        step = ticks[1] - ticks[0]
        mantissa = step / 10.0 ** math.floor(math.log10(step) + 1e-9)
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6
        assert np.allclose(np.diff(ticks), step, rtol=1e-6)


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (2, 1), (math.nan, 1), (0, math.inf)])
def test_nice_ticks_empty_for_degenerate_ranges(lo, hi):
    assert nice_ticks(lo, hi) == []


@pytest.mark.parametrize(("value", "step", "text"), [
    (0.30000000000000004, 0.1, "0.3"), (1000.0, 200.0, "1000"), (0.0005, 0.0005, "0.0005"),
    (-0.0, 0.5, "0.0"), (-1e-17, 0.2, "0.0"), (2e-8, 2e-8, "2e-08"), (2.5e7, 5e6, "2.5e+07")])
def test_format_tick(value, step, text):
    assert format_tick(value, step) == text


def test_padded_range():
    assert padded_range(np.array([0.0, 10.0])) == pytest.approx((-0.5, 10.5))
    assert padded_range(np.array([5.0, 5.0])) == pytest.approx((4.5, 5.5))
    assert padded_range(np.array([0.0])) == (-1.0, 1.0)
    assert padded_range(np.array([])) == (0.0, 1.0)
    assert padded_range(np.array([math.nan, math.inf])) == (0.0, 1.0)
    assert padded_range(np.array([1.0, math.nan, 3.0]), 0.0) == (1.0, 3.0)


def test_series_colors_are_distinct_beyond_the_palette():
    assert series_color(0, 3) == PALETTE[0]
    assert len({series_color(i, 25) for i in range(25)}) == 25


# -- line charts -------------------------------------------------------------------------------
def test_rising_line_is_drawn_bottom_left_to_top_right(tmp_path):
    path = line_chart({"rise": (np.arange(50), np.arange(50) * 2.0)}, "Rising", "x", "y",
                      tmp_path / "rise.png", size=(640, 400))
    image = read_png(path, (640, 400))
    mask = colored(image, PALETTE[0])
    assert mask[200:, :320].any() and mask[:200, 320:].any()  # the line's two ends
    assert not mask[220:, 400:].any()  # nothing below the line on the right
    assert (image < 100).all(-1).sum() > 500  # axes, ticks and text are drawn in dark grey


def test_series_get_their_own_colours_and_the_legend_avoids_the_data(tmp_path):
    x = np.linspace(0, 1, 200)
    image = read_png(line_chart({"up": (x, x), "down": (x, 1 - x)}, "Cross", "x", "y",
                                tmp_path / "cross.png"), (800, 500))
    up, down = colored(image, PALETTE[0]), colored(image, PALETTE[1])
    assert up.sum() > 300 and down.sum() > 300
    # The lines fill all four corners of the plot area, so the legend lands on one of them;
    # with one line through it hidden there, both lines are still visible at both ends.
    assert up[:, :200].any() and up[:, 600:].any() and down[:, :200].any() and down[:, 600:].any()


def test_chart_size_and_suffix_independent_png(tmp_path):
    path = line_chart({"a": ([0, 1], [0, 1])}, "", "", "", tmp_path / "deep" / "dir" / "c.jpg",
                      size=(320, 240))
    read_png(path, (320, 240))  # PNG bytes despite the .jpg name, folders created


@pytest.mark.parametrize("series", [
    {},
    {"empty": ([], [])},
    {"one": ([5], [3])},
    {"nan": ([0, 1, 2], [math.nan, math.nan, math.nan])},
    {"inf": ([0, 1, 2], [1, math.inf, -math.inf])},
    {"constant": ([0, 1, 2, 3], [2, 2, 2, 2])},
    {"zeros": ([0, 0], [0, 0])},
    {"gap": ([0, 1, 2, 3, 4], [1, 2, math.nan, 4, 5]), "nan x": ([math.nan, 1], [1, 2])},
    {"huge": ([0, 1], [1e300, -1e300])},
    {"many": (np.arange(100_000), np.sin(np.arange(100_000) / 1000))},
])
def test_awkward_series_still_give_a_chart(tmp_path, series):
    image = read_png(line_chart(series, "Awkward", "x", "y", tmp_path / "a.png"), (800, 500))
    assert (image < 100).all(-1).any()


def test_single_point_and_nan_gaps_are_visible():
    image = render_line_chart({"one": ([5], [3])})
    assert colored(image, PALETTE[0]).sum() > 20  # a dot, not nothing
    xs = np.arange(200.0)
    ys = np.where((xs > 80) & (xs < 120), math.nan, xs)
    mask = colored(render_line_chart({"gap": (xs, ys)}, x_range=(0, 199), y_range=(0, 199)),
                   PALETTE[0])
    columns = np.flatnonzero(mask.any(0))
    assert np.diff(columns).max() > 100  # the NaN run leaves a hole in the line


def test_explicit_ranges_clip_the_data():
    image = render_line_chart({"a": ([0, 10], [0, 10])}, x_range=(0, 1), y_range=(0, 1))
    assert colored(image, PALETTE[0]).sum() > 50  # the in-range start is drawn, the rest clipped


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="x values"):
        line_chart({"a": ([0, 1, 2], [0, 1])}, "", "", "", tmp_path / "a.png")
    with pytest.raises(ValueError, match="size"):
        line_chart({"a": ([0, 1], [0, 1])}, "", "", "", tmp_path / "a.png", size=(100, 50))
    with pytest.raises(ValueError, match="axis range"):
        render_line_chart({"a": ([0, 1], [0, 1])}, y_range=(1, 1))


# -- training metrics --------------------------------------------------------------------------
def write_trainer_metrics(out: Path, rows: list[tuple[int, float, float]]) -> Path:
    """metrics.csv as the trainer itself writes it: Trainer._write_metrics on a stand-in."""
    from detkit.engine.train import Trainer

    for iteration, mean_ap, loss in rows:
        stand_in = SimpleNamespace(options=SimpleNamespace(out=out), iteration=iteration,
                                   model=SimpleNamespace(seen=iteration * 64),
                                   history=[{"loss": loss, "lr": 1e-3 * min(1, iteration / 300)}])
        Trainer._write_metrics(stand_in, mean_ap)
    return out / "metrics.csv"


def test_plot_training_from_the_trainers_csv(tmp_path):
    rows = [(i, 0.6 * i / 1000, 20 * math.exp(-i / 300) + 1) for i in range(100, 1001, 100)]
    csv_path = write_trainer_metrics(tmp_path, rows)
    written = plot_training(csv_path, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "map.png", "lr.png"]
    loss, mean_ap = (read_png(p, (800, 500)) for p in written[:2])
    falling, rising = colored(loss, PALETTE[0]), colored(mean_ap, PALETTE[0])
    assert falling[:250, :400].any() and falling[250:, 400:].any()
    assert rising[250:, :400].any() and rising[:250, 400:].any()


def test_loss_parts_are_plotted_with_the_loss(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("iteration,seen,map50,loss,lr,obj,loss_cls,img_s\n"
                        "100,6400,0.1,9,0.001,4,2,50\n200,12800,0.2,7,0.001,3,1.5,51\n")
    assert loss_columns(list(read_metrics(csv_path))) == ["loss", "obj", "loss_cls"]
    image = read_png(plot_training(csv_path, tmp_path)[0], (800, 500))
    for color in PALETTE[:3]:
        assert colored(image, color).sum() > 50
    assert not colored(image, PALETTE[3]).any()  # img_s is not a loss


def test_resumed_runs_keep_the_latest_rows():
    assert latest_run(np.array([100, 200, 300, 200, 300, 400.0])).tolist() == [0, 3, 4, 5]
    assert latest_run(np.array([math.nan, 1, 2])).tolist() == [1, 2]
    assert latest_run(np.array([])).tolist() == []


def test_plot_training_on_a_header_only_or_ragged_csv(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("iteration,seen,map50,loss,lr\n")
    assert [p.name for p in plot_training(csv_path, tmp_path)] == ["loss.png", "map.png", "lr.png"]
    csv_path.write_text("iteration,seen,map50,loss,lr\n100,1,0.1,nan,0.001\n200,2,,5\n300,x\n")
    for path in plot_training(csv_path, tmp_path):
        read_png(path, (800, 500))


# -- precision-recall --------------------------------------------------------------------------
def test_plot_pr_curves(tmp_path):
    recall = np.linspace(0.01, 0.9, 100)
    curves = {"good": (recall, 1 - 0.2 * recall), "poor": (recall * 0.5, 0.6 - 0.4 * recall),
              "none": (np.zeros(0), np.zeros(0))}
    image = read_png(plot_pr_curves(curves, tmp_path / "pr.png"), (800, 600))
    good, poor = colored(image, PALETTE[0]), colored(image, PALETTE[1])
    assert good[:250, 500:].any()  # high precision at high recall: top right
    assert poor[250:, :400].any()
    assert not poor[150:, 450:].any()  # recall stops at 0.45 (the legend's swatch is higher up)


def test_pr_curves_from_evaluate_voc(tmp_path):
    def dets(rows):
        rows = np.array(rows, np.float64).reshape(-1, 6)
        return ImageDetections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int))

    truth = ImageTruth(np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60.0]]),
                       np.array([0, 0, 2]))
    result = evaluate_voc([dets([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0],
                                 [20, 20, 30, 30, 0.7, 0], [50, 50, 60, 60, 0.6, 2]])], [truth])
    names = ["cat", "dog", "cow"]
    assert result.labels(names) == {0: "cat", 2: "cow"}
    assert result.labels({0: "a", 2: "a"}) == {0: "a", 2: "a (2)"}  # unique legend keys
    assert result.labels() == {0: "0", 2: "2"}
    curves = result.curves(names)
    assert curves["cat"][0] is result.recall[0] and curves["cat"][1] is result.precision[0]
    assert result.named_ap(names) == {"cat": result.ap[0], "cow": result.ap[2]}
    path = plot_pr_curves(curves, tmp_path / "pr.png", ap=result.named_ap(names))
    read_png(path, (800, 600))
