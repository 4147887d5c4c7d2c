"""bench/box_fit.py tells a biased box from a scattered one (issue 20's localisation check)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def box_fit():
    spec = importlib.util.spec_from_file_location("box_fit", REPO / "bench" / "box_fit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["box_fit"] = module
    spec.loader.exec_module(module)
    return module


def crowns(rng, count: int) -> np.ndarray:
    centres = rng.uniform(50, 350, (count, 2))
    sides = rng.uniform(20, 70, (count, 1))
    return np.hstack([centres - sides / 2, centres + sides / 2])


def test_boxes_a_tenth_too_wide_and_shifted_show_as_bias(box_fit):
    rng = np.random.default_rng(0)
    truth = crowns(rng, 40)
    width = truth[:, 2] - truth[:, 0]
    centre_x = (truth[:, 0] + truth[:, 2]) / 2 + 0.05 * width  # shifted right by 5 % of the width
    detected = np.stack([centre_x - 0.55 * width, truth[:, 1], centre_x + 0.55 * width, truth[:, 3]], 1)
    fit = box_fit.box_fit([detected[:20], detected[20:]], [truth[:20], truth[20:]])
    assert fit.matched == fit.detections == fit.truths == 40
    assert fit.log_width_ratio == pytest.approx(np.log(1.1), abs=1e-9)
    assert fit.log_height_ratio == pytest.approx(0.0, abs=1e-9)
    assert fit.centre_x_error == pytest.approx(0.05, abs=1e-9)
    assert fit.log_size_sd == pytest.approx(0.0, abs=1e-9) and fit.share_iou_50 == 1.0


def test_sizes_pulled_to_the_mean_show_by_crown_size_and_far_boxes_are_left_out(box_fit):
    rng = np.random.default_rng(1)
    truth = crowns(rng, 200)
    centre = (truth[:, :2] + truth[:, 2:]) / 2
    side = truth[:, 2:3] - truth[:, 0:1]
    pulled = 0.5 * side + 0.5 * 45  # every size halfway to 45 px
    detected = np.hstack([centre - pulled / 2, centre + pulled / 2])
    stray = np.array([[900.0, 900, 950, 950]])  # overlaps nothing: not matched
    fit = box_fit.box_fit([np.vstack([detected, stray])], [truth])
    assert (fit.matched, fit.detections) == (200, 201)
    assert fit.by_size["0-30"]["log_width_ratio"] > 0.1 > 0 > -0.1 > fit.by_size["60-10000"]["log_width_ratio"]
    assert 0 < fit.share_iou_75 < 1 and 0 < fit.log_size_sd


def test_no_overlap_at_all_is_an_error(box_fit):
    with pytest.raises(ValueError, match="no detection"):
        box_fit.box_fit([np.array([[0.0, 0, 10, 10]])], [np.array([[50.0, 50, 60, 60]])])
