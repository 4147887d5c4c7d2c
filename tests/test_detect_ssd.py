"""Issue #5: detection feeds each model the input geometry it was trained on (SSD: a stretch,
YOLO: darknet's letterbox), maps boxes back in both, and names torchvision's COCO SSD classes.

Tiny random networks keep these tests quick; a stub in place of the network fixes its output so
the mapping of boxes back to the image can be checked exactly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import detkit
from detkit.cfg import CfgWarning
from detkit.engine.letterbox import GRAY, default_letterbox, letterbox_batch
from detkit.engine.predict import resolve_names
from detkit.errors import CfgError, DetkitError
from detkit.model import model_from_cfg, model_from_text
from detkit.weights import save_darknet_weights

REPO = Path(__file__).resolve().parents[1]

TINY_SSD = """[net]
width=64
height=64
channels=3
{net_extra}
[convolutional]
filters=8
size=3
stride=4
pad=1
activation=relu
[l2norm]
[route]
layers=-2
[convolutional]
filters=16
size=3
stride=2
pad=1
activation=relu
[ssd]
layers=1,3
classes=3
aspect_ratios=2;2,3
scales=0.2,0.5,0.9
"""

TINY_YOLO = """[net]
width=64
height=64
channels=3
{net_extra}
[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky
[convolutional]
filters=24
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1,2
anchors=10,14,23,27,37,58
classes=3
num=3
"""

# A 128x48 image (w x h) in a 64x64 input: letterbox gives 64x24 at dy=20, a stretch the whole
# input. A 16x16 box at the input's centre lands at different image rows in the two modes.
IMAGE_W, IMAGE_H = 128, 48
STUB_BOX = (32.0, 32.0, 16.0, 16.0)  # cx, cy, w, h in input pixels
STRETCHED = (48.0, 18.0, 80.0, 30.0)  # x * 128/64, y * 48/64
LETTERBOXED = (48.0, 8.0, 80.0, 40.0)  # x * 2, (y - 20) * 2


class StubNet(torch.nn.Module):
    """Stands in for the network: records its input, answers one sure box of class 1."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        row = torch.zeros(5 + self.classes)
        row[:4] = torch.tensor(STUB_BOX)
        row[4] = 1.0
        row[5 + 1] = 1.0
        return row.expand(x.shape[0], 1, -1).clone()


def write_net(tmp_path: Path, template: str, name: str, net_extra: str = "") -> tuple[Path, Path]:
    """A cfg file and random darknet .weights for it."""
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(template.format(net_extra=net_extra))
    weights = tmp_path / f"{name}.weights"
    torch.manual_seed(0)
    save_darknet_weights(model_from_cfg(cfg), weights)
    return cfg, weights


def stub_detector(cfg: Path, weights: Path, **kwargs) -> tuple[detkit.Detector, StubNet]:
    detector = detkit.Detector(cfg, weights, device="cpu", fast=False, conf_thresh=0.5, **kwargs)
    stub = StubNet(detector.num_classes)
    detector.model = stub
    return detector, stub


def flat_image() -> np.ndarray:
    """One colour everywhere: a stretched input is that colour everywhere, a letterboxed one has
    0.5 gray bars above and below."""
    return np.full((IMAGE_H, IMAGE_W, 3), 40, np.uint8)


def has_gray_bars(batch: torch.Tensor) -> bool:
    return bool(torch.all(batch[0, :, :20] == GRAY) and torch.all(batch[0, :, -20:] == GRAY))


@pytest.fixture
def ssd_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_net(tmp_path, TINY_SSD, "ssd")


@pytest.fixture
def yolo_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_net(tmp_path, TINY_YOLO, "yolo")


# --------------------------------------------------------------------------- default_letterbox


def test_default_letterbox_stretches_ssd_and_letterboxes_yolo():
    assert default_letterbox(model_from_text(TINY_SSD.format(net_extra=""))) is False
    assert default_letterbox(model_from_text(TINY_YOLO.format(net_extra=""))) is True
    assert default_letterbox(model_from_cfg(REPO / "cfg" / "ssd300-coco.cfg")) is False
    assert default_letterbox(model_from_cfg(REPO / "cfg" / "yolov2-tiny.cfg")) is True  # [region]


def test_letter_box_key_overrides_the_head_and_is_not_an_unused_field():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CfgWarning)
        ssd = model_from_text(TINY_SSD.format(net_extra="letter_box=1"))
        yolo = model_from_text(TINY_YOLO.format(net_extra="letter_box=0"))
    assert default_letterbox(ssd) is True
    assert default_letterbox(yolo) is False
    bad = model_from_text(TINY_SSD.format(net_extra="letter_box=2"), path="bad.cfg")
    with pytest.raises(CfgError, match=r"bad.cfg:5: .*letter_box=2"):
        default_letterbox(bad)


# --------------------------------------------------------------------------- Detector


def test_ssd_detector_stretches_by_default_and_maps_boxes_back(ssd_files, one_torch_thread):
    detector, stub = stub_detector(*ssd_files)
    assert detector.letterbox is False
    image = flat_image()
    (det,) = detector.detect(image)
    assert det.box == pytest.approx(STRETCHED)
    assert det.class_name == "1"
    fed = stub.inputs[0]
    assert not has_gray_bars(fed) and torch.allclose(fed, torch.full_like(fed, 40 / 255))
    expected, _ = letterbox_batch([image], (64, 64), "cpu", letterbox=False)
    assert torch.equal(fed, expected)


def test_yolo_detector_still_letterboxes_and_maps_boxes_back(yolo_files, one_torch_thread):
    detector, stub = stub_detector(*yolo_files)
    assert detector.letterbox is True
    (det,) = detector.detect(flat_image())
    assert det.box == pytest.approx(LETTERBOXED)
    assert has_gray_bars(stub.inputs[0])


def test_explicit_letterbox_overrides_the_models_choice(ssd_files, yolo_files, one_torch_thread):
    ssd, ssd_stub = stub_detector(*ssd_files, letterbox=True)
    yolo, yolo_stub = stub_detector(*yolo_files, letterbox=False)
    assert ssd.letterbox is True and yolo.letterbox is False
    assert ssd.detect(flat_image())[0].box == pytest.approx(LETTERBOXED)
    assert yolo.detect(flat_image())[0].box == pytest.approx(STRETCHED)
    assert has_gray_bars(ssd_stub.inputs[0]) and not has_gray_bars(yolo_stub.inputs[0])


def test_cfg_letter_box_key_reaches_the_detector(tmp_path, one_torch_thread):
    detector, _ = stub_detector(*write_net(tmp_path, TINY_SSD, "boxed", "letter_box=1"))
    assert detector.letterbox is True
    assert detector.detect(flat_image())[0].box == pytest.approx(LETTERBOXED)


def test_real_ssd_detector_runs_on_a_non_square_image(ssd_files, one_torch_thread):
    """The whole default path (fast copy of the network included) on an SSD, boxes in the image."""
    detector = detkit.Detector(*ssd_files, device="cpu", conf_thresh=0.0, max_det=50)
    assert detector.letterbox is False
    rows = detector.predict_arrays([np.random.default_rng(0).integers(0, 255, (IMAGE_H, IMAGE_W, 3),
                                                                      dtype=np.uint8)])[0]
    assert len(rows) > 0
    assert rows[:, [0, 2]].min() >= 0 and rows[:, [0, 2]].max() <= IMAGE_W
    assert rows[:, [1, 3]].min() >= 0 and rows[:, [1, 3]].max() <= IMAGE_H


# --------------------------------------------------------------------------- CLI and benchmark


@pytest.mark.parametrize(("flag", "expected"), [(None, None), ("--letterbox", True),
                                                ("--no-letterbox", False)])
def test_cli_letterbox_defaults_to_the_models_choice(tmp_path, monkeypatch, flag, expected):
    import cv2

    from detkit.cli import app
    from detkit.engine import predict

    seen: dict = {}

    def fake_detector(*args, **kwargs):
        seen.update(kwargs)
        raise DetkitError("stop before any work")

    monkeypatch.setattr(predict, "Detector", fake_detector)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), flat_image())
    cfg, weights = tmp_path / "x.cfg", tmp_path / "x.weights"
    cfg.write_text("[net]\n")
    weights.write_bytes(b"")
    args = ["detect", str(image), "--cfg", str(cfg), "--weights", str(weights),
            "--out", str(tmp_path / "out"), *([flag] if flag else [])]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, DetkitError)
    assert "letterbox" in seen and seen["letterbox"] is expected


def test_benchmark_end_to_end_stretches_an_ssd(monkeypatch, one_torch_thread):
    from detkit.bench import run_benchmark
    from detkit.engine import letterbox as letterbox_module

    modes: list[bool] = []
    real = letterbox_module.letterbox_batch

    def spy(images, size, device, letterbox=True, dtype=torch.float32):
        modes.append(letterbox)
        return real(images, size, device, letterbox, dtype)

    monkeypatch.setattr(letterbox_module, "letterbox_batch", spy)
    model = model_from_text(TINY_SSD.format(net_extra="")).eval()
    run_benchmark(model, "tiny-ssd", (64, 64), [1], device="cpu", fast=False, warmup=0, iters=1,
                  progress=False)
    assert modes and not any(modes)


# --------------------------------------------------------------------------- names


def test_90_classes_get_torchvisions_coco_names():
    from torchvision.models.detection import SSD300_VGG16_Weights

    categories = SSD300_VGG16_Weights.COCO_V1.meta["categories"]
    names = resolve_names(None, 90)
    # detkit's SSD class c is torchvision's label c + 1 (docs/cfg-ssd.md): no background line
    assert categories[0] == "__background__" and names == categories[1:]
    assert names[0] == "person" and names[categories.index("toothbrush") - 1] == "toothbrush"
    assert names.count("N/A") == 10
    assert resolve_names(None, 80)[:2] == ["person", "bicycle"] and len(resolve_names(None, 80)) == 80
    assert resolve_names(None, 20)[0] == "aeroplane"
