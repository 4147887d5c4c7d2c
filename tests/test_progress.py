"""No progress-bar spam in logs (issue 25): where stderr is not a terminal (a pipe, a file, CI,
CliRunner), `detkit anchors` and `detkit detect` on a video draw no tqdm bar, whose \\r-redrawn
lines would fill a log; on a terminal the bar is kept (tqdm's disable=None decides)."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from detkit.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_anchors import clustered, make_darknet_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
BAR_MARKS = ("\r", "it/s", "frame/s", "s/it", "s/frame", "%|")


def assert_no_bar(text: str) -> None:
    marks = [mark for mark in BAR_MARKS if mark in text]
    assert not marks, f"progress bar in captured output ({marks}):\n{text!r}"


def test_anchors_draws_no_bar_into_a_pipe(tmp_path):
    rng = np.random.default_rng(1)
    data = make_darknet_data(tmp_path, clustered(rng, 40) / np.array([416, 416]), rng)
    result = CliRunner().invoke(app, ["anchors", "--data", str(data), "--num", "4", "--restarts", "2"])
    assert result.exit_code == 0, result.output
    assert "anchors = " in result.output
    assert_no_bar(result.output)


def test_detect_on_a_video_draws_no_bar_into_a_pipe(tmp_path):
    if not TINY_WEIGHTS.is_file():
        pytest.skip("official yolov3-tiny weights not fetched (make assets)")
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (96, 64))
    for i in range(6):
        writer.write(np.full((64, 96, 3), 40 * i, np.uint8))
    writer.release()
    result = CliRunner().invoke(app, ["detect", str(clip), "--cfg", str(REPO / "cfg" / "yolov3-tiny.cfg"),
                                      "--weights", str(TINY_WEIGHTS), "--device", "cpu", "--img-size", "160",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "6 video frames" in result.output
    assert_no_bar(result.output)
