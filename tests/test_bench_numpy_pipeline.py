"""bench/numpy_pipeline.py, the end-to-end peers' pre- and post-processing, is detkit's own."""

from __future__ import annotations

import importlib.util
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import DARKNET_DATA, REPO

from detkit.boxes import postprocess
from detkit.engine.letterbox import correct_boxes, letterbox_batch, placement


def load_pipeline():
    spec = importlib.util.spec_from_file_location("numpy_pipeline",
                                                  REPO / "bench" / "numpy_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("shape", "net", "boxed"), [
    ((576, 768), (416, 416), True), ((333, 517), (416, 416), True), ((640, 480), (320, 416), True),
    ((577, 769), (300, 300), False), ((416, 416), (416, 416), True)])
def test_letterbox_equals_detkits(shape, net, boxed):
    pipeline = load_pipeline()
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected, places = letterbox_batch([image], net, "cpu", boxed)
    got, place = pipeline.letterbox(image, net, boxed)
    assert got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy()).max() <= 1e-6
    assert vars(place) == vars(places[0])


def crowded_candidates() -> torch.Tensor:
    """(1, 600, 9) head output: many overlapping candidates of four classes."""
    gen = torch.Generator().manual_seed(0)
    n, classes = 600, 4
    centres = torch.rand(n, 2, generator=gen) * 200 + 100
    sizes = torch.rand(n, 2, generator=gen) * 80 + 20
    objectness = torch.rand(n, 1, generator=gen)
    probs = torch.rand(n, classes, generator=gen)
    return torch.cat([centres, sizes, objectness, probs], 1)[None]


def test_postprocess_equals_detkits_on_crowded_candidates():
    """The same boxes, in the same order."""
    pipeline = load_pipeline()
    preds = crowded_candidates()
    expected = postprocess(preds, 0.25, 0.45, 300)[0]
    got = pipeline.postprocess(preds[0].numpy(), 0.25, 0.45, 300)
    assert len(expected) > 20
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


def test_correct_boxes_equals_detkits():
    pipeline = load_pipeline()
    dets = torch.tensor([[10.0, 60.0, 200.0, 300.0, 0.9, 1.0], [-5.0, 40.0, 430.0, 420.0, 0.5, 0.0]])
    place = placement(768, 576, 416, 416)
    expected = correct_boxes(dets, place, (416, 416))
    got = pipeline.correct_boxes(dets.numpy(), pipeline.placement(768, 576, 416, 416, True),
                                 (416, 416))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-4)


def test_postprocess_keeps_detkits_best_candidates_past_the_nms_cap(monkeypatch):
    """Past MAX_NMS candidates both keep the same best ones (the cap lowered to 50 here)."""
    pipeline = load_pipeline()
    monkeypatch.setattr(pipeline, "MAX_NMS", 50)
    preds = crowded_candidates()
    expected = postprocess(preds, 0.25, 0.45, 300, max_nms=50)[0]
    assert len(expected) < len(postprocess(preds, 0.25, 0.45, 300)[0])
    np.testing.assert_allclose(pipeline.postprocess(preds[0].numpy(), 0.25, 0.45, 300),
                               expected.numpy(), rtol=0, atol=1e-4)


@pytest.mark.reference
def test_pipeline_finds_the_detectors_boxes_on_a_photo(tiny_weights):
    """Around the same network, the NumPy pipeline gives detect's boxes on darknet's dog.jpg."""
    import detkit

    pipeline = load_pipeline()
    image = cv2.imread(str(DARKNET_DATA / "dog.jpg"))
    detector = detkit.Detector(REPO / "cfg" / "yolov3-tiny.cfg", tiny_weights, device="cpu",
                               precision="fp32")
    expected = detector.predict_arrays([image])[0].numpy()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return detector.model(torch.from_numpy(x)).numpy()

    got = pipeline.detect(forward, image, detector.input_size, detector.letterbox)
    assert len(expected) >= 3   # dog, bicycle, truck (and more)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
