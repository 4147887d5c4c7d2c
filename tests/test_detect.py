"""Detector, darknet preprocessing, sources, outputs and the pipeline (library level).

The parity tests run the reference darknet (libdarknet through tests/darknet_ref.py) on its own
sample photos with the official yolov3-tiny weights and compare detections one by one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detkit
from detkit.engine.draw import class_color, draw_detections, text_color
from detkit.engine.letterbox import Placement, correct_boxes, letterbox_batch, placement
from detkit.engine.outputs import (
    COCO_IDS,
    CocoJsonWriter,
    check_writable_dir,
    image_id_for,
    next_run_dir,
    yolo_label_lines,
)
from detkit.engine.pipeline import Frame
from detkit.engine.predict import Detection, parse_classes, resolve_names
from detkit.engine.run import DetectSettings, format_result_line, group_jobs, run_detect
from detkit.engine.sources import Source, SourceWarning, resolve_sources
from detkit.engine.video import VideoFrames, VideoInfo
from detkit.errors import DetkitError, SourceError

try:
    import darknet_ref
except ImportError:  # run without tests/conftest.py on sys.path
    from tests import darknet_ref

REPO = Path(__file__).resolve().parents[1]
DARKNET_DATA = Path("/usr/share/darknet/data")
PHOTOS = ["dog", "horses", "person", "eagle", "giraffe", "kite", "scream"]
TINY_CFG = REPO / "cfg" / "yolov3-tiny.cfg"
TINY_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
REQUIRE_REFERENCE = os.environ.get("DETKIT_REQUIRE_REFERENCE") == "1"


def need_darknet() -> None:
    """Skip without the reference darknet, or fail when CI requires it."""
    if darknet_ref.darknet_available() and (DARKNET_DATA / "dog.jpg").is_file():
        return
    if REQUIRE_REFERENCE:
        pytest.fail("reference darknet (libdarknet, its sample photos) is required but missing")
    pytest.skip("reference darknet not installed")


@pytest.fixture(scope="module")
def official_weights() -> Path:
    if not (TINY_WEIGHTS.is_file() and TINY_CFG.is_file()):
        if REQUIRE_REFERENCE:
            pytest.fail(f"{TINY_WEIGHTS} missing: run `make assets`")
        pytest.skip("official yolov3-tiny weights not fetched (make assets)")
    return TINY_WEIGHTS


@pytest.fixture(scope="module")
def detector(official_weights: Path) -> detkit.Detector:
    """fp32: darknet parity is a float32 property (bf16 moves scores by up to 0.04, test_bf16)."""
    return detkit.Detector(TINY_CFG, official_weights, device="cpu", conf_thresh=0.25,
                           precision="fp32")


def photo(name: str) -> Path:
    path = DARKNET_DATA / f"{name}.jpg"
    if not path.is_file():
        pytest.skip(f"{path} missing (apt-get install darknet)")
    return path


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.reference
@pytest.mark.parametrize("net_size", [(416, 416), (320, 608)])
def test_letterbox_matches_darknet_letterbox_image(net_size):
    """Same pixels as darknet's load_image_color + letterbox_image, its resize quirks included
    (scream.jpg at 416 hits the nearly black last row of darknet's resize_image)."""
    need_darknet()
    w, h = net_size
    names = PHOTOS
    images = [cv2.imread(str(photo(n))) for n in names]
    batch, places = letterbox_batch(images, (w, h), "cpu")  # mixed sizes in one batch
    for i, name in enumerate(names):
        ref = darknet_ref.darknet_letterbox(darknet_ref.darknet_load_image(photo(name)), w, h)
        np.testing.assert_allclose(batch[i].numpy(), ref, rtol=0, atol=1e-6, err_msg=name)
        assert places[i].new_w <= w and places[i].new_h <= h


@pytest.mark.reference
def test_stretch_matches_darknet_resize_image():
    need_darknet()
    image = cv2.imread(str(photo("kite")))
    batch, places = letterbox_batch([image], (416, 416), "cpu", letterbox=False)
    ref = darknet_ref.darknet_resize_image(darknet_ref.darknet_load_image(photo("kite")), 416, 416)
    np.testing.assert_allclose(batch[0].numpy(), ref, rtol=0, atol=1e-6)
    assert places[0] == Placement(1352, 900, 416, 416, 0, 0)


def test_placement_uses_darknet_integer_arithmetic():
    # 768x576 into 416x416: new_h = (576*416)/768 = 312, placed at (0, 52)
    assert placement(768, 576, 416, 416) == Placement(768, 576, 416, 312, 0, 52)
    # portrait 352x448: new_w = (352*416)/448 = 326 (326.86 truncated), dx = 45
    assert placement(352, 448, 416, 416) == Placement(352, 448, 326, 416, 45, 0)
    assert placement(640, 272, 416, 416, letterbox=False) == Placement(640, 272, 416, 416, 0, 0)


def test_correct_boxes_is_darknet_correct_yolo_boxes():
    """Pixels version of correct_yolo_boxes: the float half-padding offset, then scale."""
    place = placement(352, 448, 416, 416)  # new_w 326: padding 90, offset 45.0
    dets = torch.tensor([[45.0, 0.0, 371.0, 416.0, 0.9, 3.0], [100.0, 50.0, 200.0, 150.0, 0.5, 1.0]])
    out = correct_boxes(dets, place, (416, 416), clip=False)
    scale_x, scale_y = 352 / 326, 448 / 416
    expected = torch.tensor([[0.0, 0.0, 326 * scale_x, 448.0, 0.9, 3.0],
                             [55 * scale_x, 50 * scale_y, 155 * scale_x, 150 * scale_y, 0.5, 1.0]])
    torch.testing.assert_close(out, expected)
    clipped = correct_boxes(torch.tensor([[0.0, -10.0, 416.0, 500.0, 0.5, 0.0]]), place, (416, 416))
    assert clipped[0, :4].tolist() == [0.0, 0.0, 352.0, 448.0]


# --------------------------------------------------------------------------- parity on photos


def darknet_detections(net, image_path: Path, thresholds) -> dict[float, list]:
    """darknet's own pipeline: load_image_color, letterbox_image, network_predict, then per
    threshold get_network_boxes + do_nms_sort; one (class, score, xyxy pixels, clipped like
    darknet's draw_detections) per class whose prob > thresh."""
    image = darknet_ref.darknet_load_image(image_path)
    _, h, w = image.shape
    net.forward(darknet_ref.darknet_letterbox(image, net.width, net.height)[None], layers=[])
    found: dict[float, list] = {}
    for thresh in thresholds:
        found[thresh] = []
        for d in net.detections(w, h, thresh, nms=0.45, relative=1):
            x1 = max(0.0, (d["x"] - d["w"] / 2) * w)
            x2 = min(float(w), (d["x"] + d["w"] / 2) * w)
            y1 = max(0.0, (d["y"] - d["h"] / 2) * h)
            y2 = min(float(h), (d["y"] + d["h"] / 2) * h)
            for cls in np.nonzero(d["prob"] > thresh)[0]:
                found[thresh].append((int(cls), float(d["prob"][cls]), (x1, y1, x2, y2)))
    return found


@pytest.mark.reference
def test_same_detections_as_darknet_on_its_photos(detector):
    """Every darknet detection has a detkit twin (same class, IoU >= 0.9, score within 0.03),
    and nothing more, at thresh 0.5 and 0.25."""
    need_darknet()
    thresholds = (0.5, 0.25)
    paths = [photo(name) for name in PHOTOS]
    with darknet_ref.DarknetNet(TINY_CFG, TINY_WEIGHTS, batch=1) as net:
        reference = [darknet_detections(net, path, thresholds) for path in paths]
    try:
        for thresh in thresholds:
            detector.conf_thresh = thresh
            for name, ref, mine in zip(PHOTOS, reference, detector.detect_batch(paths), strict=True):
                label = f"{name} @ {thresh}"
                ref = ref[thresh]
                assert sorted(c for c, _, _ in ref) == sorted(d.class_id for d in mine), label
                unused = list(mine)
                for cls, score, box in ref:
                    twins = [d for d in unused if d.class_id == cls]
                    best = max(twins, key=lambda d: iou(d.box, box))
                    assert iou(best.box, box) >= 0.9, label
                    assert abs(best.score - score) <= 0.03, label
                    unused.remove(best)
    finally:
        detector.conf_thresh = 0.25


def test_dog_detections(detector):
    """The answer the asset notes give for darknet: dog .56, bicycle .59, car .62, truck .55."""
    detector.conf_thresh = 0.5
    found = {(d.class_name, round(d.score, 2)) for d in detector.detect(photo("dog"))}
    detector.conf_thresh = 0.25
    assert {("dog", 0.56), ("bicycle", 0.59), ("car", 0.62), ("truck", 0.55)} <= found


# --------------------------------------------------------------------------- Detector API


def test_detect_accepts_paths_arrays_and_batches(detector):
    paths = [photo("dog"), photo("giraffe")]  # two sizes in one batch
    arrays = [cv2.imread(str(p)) for p in paths]
    one_by_one = [detector.detect(p) for p in paths]
    batched = detector.detect_batch(arrays)
    assert len(batched) == 2
    for single, batch in zip(one_by_one, batched, strict=True):
        assert [d.class_id for d in single] == [d.class_id for d in batch]
        for a, b in zip(single, batch, strict=True):
            assert np.allclose(a.box, b.box, atol=1e-3) and abs(a.score - b.score) < 1e-5
    dets = one_by_one[0]
    assert all(isinstance(d, Detection) for d in dets)
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    h, w = arrays[0].shape[:2]
    for d in dets:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert d.class_name == detector.names[d.class_id]
    gray = cv2.cvtColor(arrays[0], cv2.COLOR_BGR2GRAY)
    assert detector.detect(gray)  # gray input is converted, not rejected


def test_detector_class_filter_and_errors(official_weights):
    only = detkit.Detector(TINY_CFG, official_weights, device="cpu", classes="dog,2")
    assert only.classes == [2, 16]
    assert {d.class_name for d in only.detect(photo("dog"))} == {"dog", "car"}
    with pytest.raises(SourceError, match="not found"):
        only.detect("/nonexistent/image.jpg")
    with pytest.raises(DetkitError, match="multiples of 32"):
        detkit.Detector(TINY_CFG, official_weights, device="cpu", img_size=(400, 416))
    with pytest.raises(DetkitError, match="unknown class"):
        detkit.Detector(TINY_CFG, official_weights, device="cpu", classes="unicorn")


def test_names_and_classes_parsing(tmp_path):
    assert resolve_names(None, 3) == ["0", "1", "2"]
    assert resolve_names(None, 80)[:3] == ["person", "bicycle", "car"]
    names_file = tmp_path / "my.names"
    names_file.write_text("cat\ndog\n\n")
    assert resolve_names(names_file, 2) == ["cat", "dog"]
    with pytest.raises(DetkitError, match="has 2 names but the model has 3"):
        resolve_names(names_file, 3)
    assert parse_classes("dog, 0", ["cat", "dog"]) == [0, 1]
    assert parse_classes(None, ["cat"]) is None
    with pytest.raises(DetkitError, match="outside"):
        parse_classes("5", ["cat", "dog"])


def test_default_model_missing_weights_says_make_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETKIT_HOME", str(tmp_path))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "yolov3-tiny.cfg").write_text("[net]\nwidth=32\nheight=32\nchannels=3\n")
    with pytest.raises(detkit.WeightsError, match="make assets"):
        detkit.Detector()


# --------------------------------------------------------------------------- sources


def test_sources_folder_glob_list_and_errors(tmp_path):
    for rel in ["b.jpg", "a.png", "notes.md", "sub/c.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = [Path(s.location).name for s in resolve_sources([str(tmp_path)])]
    assert names == ["a.png", "b.jpg"]
    names = [Path(s.location).name for s in resolve_sources([str(tmp_path)], recursive=True)]
    assert names == ["a.png", "b.jpg", "c.jpg"]
    assert [Path(s.location).name for s in resolve_sources([str(tmp_path / "*.jpg")])] == ["b.jpg"]
    listing = tmp_path / "sub" / "list.txt"
    listing.write_text(f"c.jpg\n../b.jpg\n\n{tmp_path / 'a.png'}\n")
    listed = resolve_sources([str(listing)])
    assert [Path(s.location).resolve() for s in listed] == [
        (tmp_path / n).resolve() for n in ("sub/c.jpg", "b.jpg", "a.png")]
    assert all(s.kind == "image" for s in listed)
    listing.write_text("c.jpg\nmissing.jpg\n")
    with pytest.raises(SourceError, match=r"list.txt:2: image 'missing.jpg' not found"):
        resolve_sources([str(listing)])
    with pytest.raises(SourceError, match="source 'nope.jpg' not found"):
        resolve_sources([str(tmp_path / "a.png"), "nope.jpg"])
    with pytest.raises(SourceError, match="unknown extension"):
        resolve_sources([str(tmp_path / "notes.md")])
    with pytest.raises(SourceError, match="no images or videos match"):
        resolve_sources([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images in folder"):
        resolve_sources([str(tmp_path / "empty")])


def test_camera_that_does_not_exist_is_a_source_error():
    with pytest.raises(SourceError, match="cannot open camera '97'"):
        resolve_sources(["97"])


def test_group_jobs_keeps_order_and_batches_images():
    img, vid = Source("image", "a.jpg"), Source("video", "v.mp4")
    jobs = group_jobs([img, img, vid, img, vid, vid])
    assert [[s.kind for s in job] for job in jobs] == [
        ["image", "image"], ["video"], ["image"], ["video"], ["video"]]


class FakeCapture:
    """read() results in order: True = a frame, False = a failed read."""

    def __init__(self, pattern: list[bool]) -> None:
        self.pattern = list(pattern)

    def read(self):
        if not self.pattern:
            return False, None
        ok = self.pattern.pop(0)
        return (True, np.zeros((4, 4, 3), np.uint8)) if ok else (False, None)


def test_video_frames_skip_and_count_unreadable_frames():
    info = VideoInfo(4, 4, 25.0, frame_count=6)
    frames = VideoFrames(Source("video", "v.mp4"), info, FakeCapture([1, 0, 1, 0, 1, 1]), "v.mp4", "v")
    with pytest.warns(SourceWarning, match="v.mp4: 2 unreadable frame"):
        got = [f.frame_index for f in frames]
    assert got == [0, 2, 4, 5] and frames.read == 4 and frames.unreadable == 2
    # a stream ends at its first failed read, nothing counted
    stream = VideoFrames(Source("stream", "rtsp://x"), VideoInfo(4, 4, 25.0, 0),
                         FakeCapture([1, 1, 0, 1]), "rtsp://x", "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(stream)) == 2 and stream.unreadable == 0


# --------------------------------------------------------------------------- outputs


def test_run_folders_are_numbered_and_never_reused(tmp_path):
    base = tmp_path / "runs" / "detect"
    assert next_run_dir(base).name == "exp"
    assert next_run_dir(base).name == "exp2"
    (base / "exp7").mkdir()
    assert next_run_dir(base).name == "exp8"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DetkitError, match="not writable"):
        check_writable_dir(blocker / "out")


def test_coco_json_and_yolo_labels(tmp_path):
    assert len(COCO_IDS) == 80 and len(set(COCO_IDS)) == 80 and COCO_IDS[-1] == 90
    assert image_id_for("000000397133", 5) == 397133 and image_id_for("dog", 5) == 5
    det = Detection((10.0, 20.0, 50.0, 100.0), 0.75, 16, "dog")
    writer = CocoJsonWriter(tmp_path / "r.json", num_classes=80)
    writer.add(7, [det])
    writer.close()
    assert json.loads((tmp_path / "r.json").read_text()) == [
        {"image_id": 7, "category_id": 18, "bbox": [10.0, 20.0, 40.0, 80.0], "score": 0.75}]
    assert CocoJsonWriter(tmp_path / "v.json", num_classes=20).category_id(16) == 16
    names91 = (REPO / "data" / "coco91.names").read_text().splitlines()  # torchvision's SSD classes
    ssd = CocoJsonWriter(tmp_path / "s.json", num_classes=90)
    assert ssd.category_id(names91.index("dog")) == 18 and ssd.category_id(0) == 1
    line = yolo_label_lines([det], img_w=100, img_h=200).split()  # ultralytics: 5 columns
    assert line[0] == "16" and [float(v) for v in line[1:]] == [0.3, 0.3, 0.4, 0.4]
    line = yolo_label_lines([det], img_w=100, img_h=200, save_conf=True).split()  # --save-conf
    assert line[0] == "16" and [float(v) for v in line[1:]] == [0.3, 0.3, 0.4, 0.4, 0.75]


def test_drawing_colours_and_result_line():
    assert class_color(16, 80) == class_color(16, 80) and class_color(16, 80) != class_color(2, 80)
    assert text_color((255, 255, 255)) == (0, 0, 0) and text_color((0, 0, 0)) == (255, 255, 255)
    image = np.zeros((60, 80, 3), np.uint8)
    dets = [Detection((5.0, 30.0, 70.0, 59.0), 0.81, 16, "dog")]
    draw_detections(image, dets, 80)
    assert image.any()
    frame = Frame(image, "dog.jpg", "dog")
    from detkit.engine.pipeline import FrameResult

    assert format_result_line(FrameResult(frame, dets, 4.06)) == "dog.jpg: dog 0.81 (4.1 ms)"


# --------------------------------------------------------------------------- pipeline


def write_clip(path: Path, frames: int, size=(160, 96), fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    dog = cv2.resize(cv2.imread(str(photo("dog"))), size)
    for i in range(frames):
        writer.write(np.roll(dog, 3 * i, axis=1))
    writer.release()
    return path


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_ctrl_c_leaves_a_playable_video(detector, tmp_path):
    """KeyboardInterrupt mid-video: the run stops, reports it, and the mp4 is finalised with
    every frame that was counted."""
    clip = write_clip(tmp_path / "clip.mp4", 24)
    out = tmp_path / "out"
    out.mkdir()
    seen = []

    def interrupt_after_five(result) -> None:
        seen.append(result.frame.frame_index)
        if len(seen) == 5:
            raise KeyboardInterrupt

    sources = resolve_sources([str(clip)])
    summary = run_detect(detector, sources, DetectSettings(out, batch=2, progress=False),
                         interrupt_after_five)
    assert summary.interrupted and summary.frames == 5
    assert summary.videos == [out / "clip.mp4"]
    assert count_frames(out / "clip.mp4") == 5
