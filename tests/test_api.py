"""The Python API as a new user meets it (issue 25): what `import detkit` shows, Detector from
any directory, lists of images, drawing and saving results, the OpenMP policy on record."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO

import detkit


def test_dir_shows_the_api_not_the_imports():
    names = dir(detkit)
    for public in ("Detector", "Detection", "load_model", "model_from_cfg", "openmp_wait_policy"):
        assert public in names
    for private in ("os", "torch", "Path", "sys"):
        assert private not in names
    assert set(detkit.__all__) <= set(names)
    assert all(hasattr(detkit, name) for name in detkit.__all__)


@pytest.mark.parametrize("first, want", [("import detkit", "passive"),
                                         ("import torch, detkit", "default (torch was imported")])
def test_openmp_policy_reports_the_import_order(first, want):
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"{first}; print(detkit.openmp_wait_policy())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith(want)


def test_detector_finds_repo_paths_from_another_directory(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    detector = detkit.Detector("cfg/yolov3-tiny.cfg", "weights/yolov3-tiny.weights", device="cpu")
    assert detector.num_classes == 80


def test_detect_takes_a_list_and_results_draw_and_save(tiny_weights, tmp_path):
    detector = detkit.Detector(REPO / "cfg" / "yolov3-tiny.cfg", tiny_weights, device="cpu")
    gray = np.full((240, 320, 3), 128, np.uint8)
    dark = np.zeros((200, 200, 3), np.uint8)
    both = detector.detect([gray, dark])
    assert isinstance(both, list) and len(both) == 2
    assert both == detector.detect_batch([gray, dark])
    assert detector.detect(gray) == both[0]

    box = detkit.Detection((20.0, 30.0, 120.0, 150.0), 0.9, 16, "dog")
    drawn = detector.annotate(gray, [box])
    assert drawn.shape == gray.shape and not np.array_equal(drawn, gray)
    assert np.array_equal(gray, np.full_like(gray, 128))      # the caller's image is untouched
    saved = detector.save(gray, tmp_path / "out" / "gray.jpg", [box])
    assert cv2.imread(str(saved)).shape == gray.shape
    with pytest.raises(detkit.DetkitError, match="cannot write"):
        detector.save(gray, tmp_path / "gray.unknown", [box])
