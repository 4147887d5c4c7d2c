"""The CUDA path against the CPU's float32: detections, CUDA graphs, device NMS, video, AMP
training with save/resume, DDP. Marked `gpu` (skipped without CUDA); `make gpu-check` runs them
on a lent GPU machine and times the same networks (bench/gpu_check.py).

The references are the CPU's float32 detections, which are proven equal to darknet's elsewhere
(test_parity_darknet.py, test_fast.py). What runs here without CUDA is the CPU half: the
references exist and hold boxes to compare, and the matching rule catches what it must.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import DARKNET_DATA, REPO, TINY_WEIGHTS, randomize_model
from torchvision.ops import box_iou

import detkit
from detkit.boxes import postprocess
from detkit.engine.letterbox import letterbox_batch
from detkit.engine.predict import Detector

sys.path.insert(0, str(REPO / "bench"))
from squares import square_images  # noqa: E402

PHOTOS = ("dog", "horses", "person", "eagle", "giraffe", "kite")
PHOTO_DIR = Path(os.environ.get("DETKIT_PHOTOS", DARKNET_DATA))  # the GPU machine has no darknet
VIDEO = REPO / "assets" / "video" / "bikes.mp4"
CONF = 0.25
IOU_MIN, SCORE_TOL = 0.9, 0.05
# A box this close to the threshold may fall either side of it in fp16; only boxes clear of it
# must be found on the other side.
MARGIN = 0.05
NETWORKS = {  # name -> (cfg, weights: None = random with calibrated batch norm, seeded)
    "yolov3-tiny": ("cfg/yolov3-tiny.cfg", TINY_WEIGHTS),
    "yolov3": ("cfg/yolov3.cfg", None),
    "yolov2-voc": ("cfg/yolov2-voc.cfg", None),
    "ssd300": ("cfg/ssd300.cfg", None),
}
cuda = pytest.mark.gpu


def photos() -> list[np.ndarray]:
    images = [cv2.imread(str(PHOTO_DIR / f"{name}.jpg")) for name in PHOTOS]
    if any(image is None for image in images):
        pytest.skip(f"darknet's sample photos not in {PHOTO_DIR} (apt-get install darknet, or "
                    "DETKIT_PHOTOS=folder)")
    return images


# -- the matching rule -------------------------------------------------------------------------

def mismatches(reference: torch.Tensor, other: torch.Tensor, conf: float = CONF) -> list[str]:
    """Rows (x1, y1, x2, y2, score, class) clear of the threshold on one side with no partner on
    the other: same class, IoU at least IOU_MIN, score within SCORE_TOL. Empty when equal."""
    problems = []
    for label, mine, theirs in (("lost", reference, other), ("added", other, reference)):
        for row in mine[mine[:, 4] >= conf + MARGIN]:
            same_class = theirs[theirs[:, 5] == row[5]]
            close = (box_iou(row[None, :4], same_class[:, :4])[0] >= IOU_MIN) & \
                    ((same_class[:, 4] - row[4]).abs() <= SCORE_TOL)
            if not bool(close.any()):
                problems.append(f"{label}: class {int(row[5])} score {float(row[4]):.3f} "
                                f"box {[round(v) for v in row[:4].tolist()]}")
    return problems


def assert_same_detections(reference: list[torch.Tensor], other: list[torch.Tensor],
                           what: str) -> None:
    assert len(reference) == len(other)
    problems = [f"image {i}: {p}" for i, (r, o) in enumerate(zip(reference, other, strict=True))
                for p in mismatches(r, o)]
    assert problems == [], f"{what}: {len(problems)} mismatches; first: {problems[:5]}"


def rows(*boxes) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 6)


def test_the_rule_accepts_equal_and_slightly_moved_boxes():
    ref = rows([10, 10, 110, 110, 0.9, 1], [200, 200, 260, 280, 0.5, 3])
    moved = rows([11, 10, 111, 111, 0.88, 1], [200, 201, 260, 280, 0.53, 3])
    assert mismatches(ref, ref) == [] and mismatches(ref, moved) == []


def test_the_rule_catches_lost_added_moved_rescored_and_reclassed_boxes():
    ref = rows([10, 10, 110, 110, 0.9, 1])
    assert mismatches(ref, rows()) == ["lost: class 1 score 0.900 box [10, 10, 110, 110]"]
    assert mismatches(rows(), ref) == ["added: class 1 score 0.900 box [10, 10, 110, 110]"]
    assert len(mismatches(ref, rows([20, 10, 120, 110, 0.9, 1]))) == 2      # IoU 0.82
    assert len(mismatches(ref, rows([10, 10, 110, 110, 0.8, 1]))) == 2      # score off by 0.1
    assert len(mismatches(ref, rows([10, 10, 110, 110, 0.9, 2]))) == 2      # another class


def test_the_rule_lets_boxes_at_the_threshold_come_and_go():
    ref = rows([10, 10, 110, 110, 0.9, 1], [300, 300, 340, 350, CONF + 0.02, 0])
    assert mismatches(ref, ref[:1]) == []


# -- the networks and their CPU float32 references ---------------------------------------------

def network_files(name: str, folder: Path) -> tuple[Path, Path]:
    """cfg and weights of a network; random ones saved as a detkit .pt, the same on every
    device (seeded, batch norm calibrated on the photos so activations stay of order 1)."""
    cfg, weights = NETWORKS[name]
    cfg = REPO / cfg
    if weights is not None:
        if not weights.exists():
            pytest.skip(f"{weights} missing: run `make assets`")
        return cfg, weights
    path = folder / f"{name}.random.pt"
    if not path.exists():
        model = detkit.load_model(cfg)
        batch, _ = letterbox_batch(photos(), model.input_size, "cpu", True)
        randomize_model(model, seed=0, calibrate=batch)
        torch.save(model.state_dict(), path)
    return cfg, path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-networks")


_cpu_references: dict[str, list[torch.Tensor]] = {}


def cpu_reference(name: str, folder: Path) -> list[torch.Tensor]:
    """CPU float32 detections of the eager model (no fast path: the plainest reference)."""
    if name not in _cpu_references:
        cfg, weights = network_files(name, folder)
        detector = Detector(cfg, weights, device="cpu", fast=False, conf_thresh=CONF)
        _cpu_references[name] = detector.predict_arrays(photos())
    return _cpu_references[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(NETWORKS))
def test_the_cpu_references_hold_boxes_to_compare(name, weights_dir):
    """Without boxes clear of the threshold the CUDA comparisons below could not fail."""
    reference = cpu_reference(name, weights_dir)
    clear = sum(int((r[:, 4] >= CONF + MARGIN).sum()) for r in reference)
    assert clear >= 6, f"{name}: only {clear} boxes clear of the threshold on the six photos"


# -- CUDA ----------------------------------------------------------------------------------------

def cuda_detector(name: str, folder: Path, precision: str, cuda_graphs: bool | None = None,
                  ) -> Detector:
    from detkit.fast import optimize_for_inference

    cfg, weights = network_files(name, folder)
    detector = Detector(cfg, weights, device="cuda", conf_thresh=CONF, fast=False)
    detector.model = optimize_for_inference(detector.model, "cuda", half=precision == "fp16",
                                            bf16=precision == "bf16", cuda_graphs=cuda_graphs,
                                            size=detector.input_size)
    return detector


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_cuda_detections_equal_the_cpu_float32_ones(name, precision, weights_dir):
    got = cuda_detector(name, weights_dir, precision).predict_arrays(photos())
    assert_same_detections(cpu_reference(name, weights_dir), got, f"{name} {precision} on CUDA")


@cuda
def test_the_detector_half_option_runs_fp16_on_cuda(weights_dir):
    cfg, weights = network_files("yolov3-tiny", weights_dir)
    detector = Detector(cfg, weights, device="cuda", half=True, conf_thresh=CONF)
    assert detector.model.fast_options.cuda_graphs
    got = detector.predict_arrays(photos())
    assert_same_detections(cpu_reference("yolov3-tiny", weights_dir), got, "Detector(half=True)")


@cuda
@pytest.mark.parametrize("name", ["yolov3-tiny", "ssd300"])
def test_cuda_graphs_on_and_off_give_the_same_detections(name, weights_dir):
    images = photos()
    graphed = cuda_detector(name, weights_dir, "fp16", cuda_graphs=True)
    plain = cuda_detector(name, weights_dir, "fp16", cuda_graphs=False)
    assert graphed.model.fast_options.cuda_graphs and not plain.model.fast_options.cuda_graphs
    for batch in (images, images[:1], images):      # capture, another shape, replay
        a, b = graphed.predict_arrays(batch), plain.predict_arrays(batch)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=0.05, rtol=0)


@cuda
@pytest.mark.parametrize("name", ["yolov3-tiny", "yolov2-voc", "ssd300"])
def test_decode_and_nms_on_the_device_equal_the_cpus(name, weights_dir):
    """The same raw predictions through postprocess on CUDA and on the CPU."""
    cfg, weights = network_files(name, weights_dir)
    model = detkit.load_model(cfg, weights, device="cuda")
    batch, _ = letterbox_batch(photos(), model.input_size, "cuda", True)
    with torch.inference_mode():
        preds = model(batch).float()
    on_device = postprocess(preds, CONF, 0.45, 300)
    on_cpu = postprocess(preds.cpu(), CONF, 0.45, 300)
    assert all(d.device.type == "cuda" for d in on_device)
    for d, c in zip(on_device, on_cpu, strict=True):
        assert d.shape == c.shape
        torch.testing.assert_close(d.cpu(), c, atol=1e-3, rtol=1e-5)


@cuda
def test_the_video_pipeline_on_cuda_gives_the_cpus_boxes_frame_by_frame(tmp_path):
    from detkit.engine.run import DetectSettings, run_detect
    from detkit.engine.sources import resolve_sources

    if not VIDEO.exists():
        pytest.skip(f"{VIDEO} missing: run `make assets`")
    cfg, weights = network_files("yolov3-tiny", tmp_path)
    per_device = {}
    for device, half in (("cpu", False), ("cuda", True)):
        frames: dict[int, torch.Tensor] = {}

        def record(result, frames=frames):
            frames[result.frame.frame_index] = torch.tensor(
                [[*d.box, d.score, d.class_id] for d in result.detections]).reshape(-1, 6)

        detector = Detector(cfg, weights, device=device, half=half, conf_thresh=CONF)
        settings = DetectSettings(out_dir=tmp_path / device, batch=8, progress=False)
        summary = run_detect(detector, resolve_sources([str(VIDEO)]), settings, on_result=record)
        assert summary.frames == 250 and len(frames) == 250
        per_device[device] = [frames[i] for i in sorted(frames)]
    assert_same_detections(per_device["cpu"], per_device["cuda"], "bikes.mp4 on CUDA, fp16")
    assert sum(len(f) for f in per_device["cpu"]) > 250    # the video has people and bikes


# -- training on CUDA ----------------------------------------------------------------------------

def one_class_cfg(name: str, folder: Path, size: int) -> Path:
    """yolov3-tiny for one class (the trees cfg) or SSD300 cut to one class, at `size`."""
    import re

    if name == "yolov3-tiny":
        text = (REPO / "cfg" / "yolov3-tiny-trees.cfg").read_text()
    else:
        text = (REPO / "cfg" / "ssd300.cfg").read_text().replace("classes=20", "classes=1")
    text = re.sub(r"(?m)^(width|height)=\d+", rf"\g<1>={size}", text)
    path = folder / f"{name}-1class-{size}.cfg"
    path.write_text(text)
    return path


def train_options(cfg: Path, data: Path, out: Path, iterations: int, device: str, amp: str,
                  **overrides):
    from detkit.cli_train import load_split
    from detkit.engine.train import TrainOptions

    items, _ = load_split(data, "train")
    settings = dict(cfg=cfg, train=items, val=[], out=out, device=device, amp=amp,
                    max_batches=iterations, batch=8, learning_rate=1e-3, burn_in=0,
                    eval_interval=10**9, checkpoint_interval=10, workers=2, augment=False,
                    multiscale=False, quiet=True, seed=0)
    return TrainOptions(**{**settings, **overrides})


def check_training_lowers_the_loss_and_resumes(name: str, tmp_path: Path, device: str,
                                                amp: str, size: int) -> None:
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.train import Trainer

    data = square_images(tmp_path / "squares", 32, 256, seed=0)
    cfg, out = one_class_cfg(name, tmp_path, size), tmp_path / "run"
    result = Trainer(train_options(cfg, data, out, 20, device, amp)).train()
    history = [step["loss"] for step in result.history]
    assert result.iterations == 20 and len(history) == 20 and all(np.isfinite(history))
    assert np.mean(history[-4:]) < 0.8 * np.mean(history[:4]), history
    assert load_checkpoint(out / "last.pt")["iteration"] == 20
    resumed = Trainer(train_options(cfg, data, out, 24, device, amp, resume=True)).train()
    assert resumed.iterations == 24
    assert load_checkpoint(out / "last.pt")["iteration"] == 24


@pytest.mark.slow
def test_the_training_check_passes_on_the_cpu_in_float32(tmp_path):
    """The CPU half of the AMP check: the same recipe lowers the loss and resumes."""
    check_training_lowers_the_loss_and_resumes("yolov3-tiny", tmp_path, "cpu", "none", 160)


@cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("name", ["yolov3-tiny", "ssd300"])
def test_amp_training_on_cuda_lowers_the_loss_and_resumes(name, amp, tmp_path):
    check_training_lowers_the_loss_and_resumes(name, tmp_path, "cuda", amp,
                                               416 if name == "yolov3-tiny" else 300)


@cuda
def test_ddp_on_one_gpu_with_torchrun(tmp_path):
    from detkit.engine.checkpoint import load_checkpoint

    data = square_images(tmp_path / "squares", 16, 128, seed=1)
    out = tmp_path / "ddp"
    cfg = one_class_cfg("yolov3-tiny", tmp_path, 416)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "1", "-m", "detkit", "train", "--data", str(data), "--cfg", str(cfg), "--out",
               str(out), "--device", "cuda", "--amp", "fp16", "--max-batches", "5", "--batch", "8",
               "--burn-in", "0", "--eval-interval", "0", "--workers", "2", "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(out / "last.pt")["iteration"] == 5
