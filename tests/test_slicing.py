"""Sliced inference (`detect --tile`, `eval --tile`): windows, the cut-box rule, the merge, and
the Detector on a real photo placed in a large canvas."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import REPO, REQUIRE_REFERENCE

from detkit.engine.slicing import Window, merge_windows, predict_sliced, windows
from detkit.errors import DetkitError

DARKNET_PHOTOS = "/usr/share/darknet/data"
TINY_CFG = REPO / "cfg" / "yolov3-tiny.cfg"


def test_windows_cover_the_photo_with_equal_windows_ending_at_its_edges():
    got = windows(1000, 700, tile=416, overlap=0.25)  # stride 312
    assert {(w.x0, w.y0) for w in got} == {(x, y) for x in (0, 312, 584) for y in (0, 284)}
    assert {(w.width, w.height) for w in got} == {(416, 416)}
    covered = np.zeros((700, 1000), bool)
    for w in got:
        covered[w.y0:w.y0 + w.height, w.x0:w.x0 + w.width] = True
    assert covered.all()


def test_cores_split_each_overlap_down_the_middle():
    inf = float("inf")
    got = {(w.x0, w.y0): w.core for w in windows(1000, 700, tile=416, overlap=0.25)}
    # x overlaps 312-416 and 584-728 (the last window moved back to end at 1000); y 284-416
    assert got[(0, 0)] == (-inf, -inf, 364.0, 350.0)
    assert got[(312, 0)] == (364.0, -inf, 656.0, 350.0)
    assert got[(584, 284)] == (656.0, 350.0, inf, inf)


def test_a_photo_within_one_tile_is_one_window_of_its_own_size():
    inf = float("inf")
    assert windows(400, 300, tile=416, overlap=0.25) == [Window(0, 0, 400, 300, (-inf, -inf, inf, inf))]
    assert [w.y0 for w in windows(416, 1000, tile=416, overlap=0.5)] == [0, 208, 416, 584]


def rows(*boxes) -> torch.Tensor:
    return torch.tensor([[*box, 0.9, 0] for box in boxes], dtype=torch.float32).reshape(-1, 6)


def test_merge_shifts_to_photo_pixels_and_keeps_each_object_from_the_window_owning_its_centre():
    left, right = windows(728, 416, tile=416, overlap=0.25)  # overlap 312-416, split at 364
    assert (left.x0, right.x0) == (0, 312)
    merged = merge_windows([
        rows((380, 100, 416, 140),   # a crown at 380-420 cut by the left window: centre 398, the right's
             (10, 10, 50, 50),       # the left window's own
             (330, 200, 390, 240)),  # whole in both windows, centre 360: the left's
        rows((68, 100, 108, 140),    # the crown whole, centre 400 in photo pixels: kept
             (18, 200, 78, 240),     # the left window's object again (a bit off): centre 360, dropped
             (0, 300, 30, 330)),     # cut by the right window's left edge, centre 327: dropped
    ], [left, right], nms_thresh=0.45)
    assert sorted(merged[:, :4].tolist()) == [[10, 10, 50, 50], [330, 200, 390, 240], [380, 100, 420, 140]]


def blobs_photo(width: int, height: int, boxes: np.ndarray) -> np.ndarray:
    photo = np.zeros((height, width, 3), np.uint8)
    for x1, y1, x2, y2 in boxes.astype(int):
        photo[y1:y2, x1:x2] = 200
    return photo


def perfect_detector(images: list[np.ndarray]) -> list[torch.Tensor]:
    """Boxes of the bright blobs each window shows, cut where the window cuts them."""
    out = []
    for image in images:
        count, _, stats, _ = cv2.connectedComponentsWithStats((image[..., 0] > 0).astype(np.uint8))
        found = [(x, y, x + w, y + h) for x, y, w, h, _ in stats[1:count]]
        out.append(rows(*found))
    return out


def test_sliced_perfect_detector_finds_every_object_once_in_photo_pixels():
    rng = np.random.default_rng(0)
    boxes = []
    while len(boxes) < 60:  # 20-60 px objects, apart from each other, anywhere in the photo
        x, y = rng.integers(0, 1250 - 60), rng.integers(0, 1000 - 60)
        box = np.array([x, y, x + rng.integers(20, 60), y + rng.integers(20, 60)])
        if all(box[0] > b[2] + 2 or b[0] > box[2] + 2 or box[1] > b[3] + 2 or b[1] > box[3] + 2 for b in boxes):
            boxes.append(box)
    truth = np.array(boxes, np.float32)
    photo = blobs_photo(1250, 1000, truth)
    found = predict_sliced(photo, 416, 0.25, perfect_detector, nms_thresh=0.45)
    assert len(found) == len(truth)
    assert sorted(found[:, :4].tolist()) == sorted(truth.tolist())
    # a photo that fits in one window goes to the detector as it is
    small = blobs_photo(400, 300, truth[:1] % 200)
    assert predict_sliced(small, 416, 0.25, perfect_detector, 0.45).tolist() == perfect_detector([small])[0].tolist()


def test_bad_tiling_is_a_clear_error():
    from detkit.engine.slicing import check_tiling

    with pytest.raises(DetkitError, match="--tile 16"):
        check_tiling(16, 0.25)
    with pytest.raises(DetkitError, match="--tile-overlap 0.9 must be between 0 and 0.75"):
        check_tiling(416, 0.9)  # 12,321 windows on a 5000x5000 photo
    with pytest.raises(DetkitError, match="--eval-tile 8"):
        check_tiling(8, 0.25, "--eval-tile")
    check_tiling(None, 0.75)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture
def dog(tiny_weights):
    import detkit

    path = f"{DARKNET_PHOTOS}/dog.jpg"
    image = cv2.imread(path)
    if image is None:
        if REQUIRE_REFERENCE:
            pytest.fail(f"{path} missing (apt-get install darknet)")
        pytest.skip(f"{path} missing (apt-get install darknet)")
    return image, detkit.Detector(TINY_CFG, tiny_weights, device="cpu", conf_thresh=0.25)


def test_detector_tile_at_least_the_photo_changes_nothing(dog, tiny_weights):
    import detkit

    image, plain = dog
    tiled = detkit.Detector(TINY_CFG, tiny_weights, device="cpu", conf_thresh=0.25, tile=800)
    # close, not equal: each fast-path copy picks its convolution kernels by timing them
    torch.testing.assert_close(tiled.predict_arrays([image])[0], plain.predict_arrays([image])[0],
                               atol=1e-3, rtol=1e-4)


def test_detector_finds_a_photo_inside_a_large_canvas_where_it_is(dog, tiny_weights):
    """dog.jpg (768x576) pasted into a 2400x1800 gray canvas: letterboxed whole, the canvas
    shrinks the dog, bicycle and truck to a third; in 768 px windows (the photo's own scale in
    the network) each is found where it is, inside the gray around it."""
    import detkit

    image, plain = dog
    canvas = np.full((1800, 2400, 3), 127, np.uint8)
    x0, y0 = 1632, 1128  # inside the last window, (1632, 1032): windows start every 576 px
    canvas[y0:y0 + image.shape[0], x0:x0 + image.shape[1]] = image
    alone = plain.predict_arrays([image])[0]
    assert len(alone) >= 3  # dog, bicycle, truck
    tiled = detkit.Detector(TINY_CFG, tiny_weights, device="cpu", conf_thresh=0.25, tile=768)
    found = tiled.predict_arrays([canvas])[0]
    for x1, y1, x2, y2, _, cls in alone.tolist():
        shifted = (x1 + x0, y1 + y0, x2 + x0, y2 + y0)
        best = max((box_iou(shifted, row[:4]) for row in found.tolist() if row[5] == cls), default=0.0)
        # > 0.8, not equal: the window above also shows the truck whole, in other surroundings,
        # and its box (IoU 0.87 with the photo's own) may win the NMS
        assert best > 0.8, (cls, shifted, found)


def test_tiled_detector_keeps_the_class_filter_and_runs_tta_per_window(dog, tiny_weights):
    import detkit

    image, _ = dog
    canvas = np.full((1800, 2400, 3), 127, np.uint8)
    canvas[1128:1704, 1632:2400] = image
    only_dogs = detkit.Detector(TINY_CFG, tiny_weights, device="cpu", classes="dog", tile=768)
    found = only_dogs.predict_arrays([canvas])[0]
    assert len(found) >= 1 and set(found[:, 5].tolist()) == {16.0}
    with_tta = detkit.Detector(TINY_CFG, tiny_weights, device="cpu", classes="dog", tile=768, tta=True)
    (x1, y1, x2, y2, _, _), = with_tta.predict_arrays([canvas])[0].tolist()
    # the plain pass's dog box, moved into the canvas; TTA's merged box differs a little (0.79)
    assert box_iou((x1, y1, x2, y2), (1632 + 129, 1128 + 187, 1632 + 369, 1128 + 518)) > 0.7


def run_detect(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detkit", "detect", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_detect_cli_tile_finds_the_dog_in_a_large_canvas(dog, tiny_weights, tmp_path):
    """`detkit detect --tile`: the labels it writes place the dog where it is in the canvas,
    which the whole canvas letterboxed into 416x416 does not find at all."""
    image, _ = dog
    canvas = np.full((1800, 2400, 3), 127, np.uint8)
    canvas[1128:1704, 1632:2400] = image
    cv2.imwrite(str(tmp_path / "canvas.png"), canvas)
    common = ("canvas.png", "--cfg", str(TINY_CFG), "--weights", str(tiny_weights), "--device", "cpu",
              "--save-txt", "--quiet")
    tiled = run_detect(*common, "--tile", "768", "--out", "tiled", cwd=tmp_path)
    whole = run_detect(*common, "--out", "whole", cwd=tmp_path)
    assert tiled.returncode == 0 and whole.returncode == 0, tiled.stderr + whole.stderr

    def dogs(run: str) -> list[tuple[float, float]]:
        lines = (tmp_path / run / "labels" / "canvas.txt").read_text().split("\n")
        return [(float(f[1]) * 2400, float(f[2]) * 1800) for f in map(str.split, lines) if f and f[0] == "16"]

    assert dogs("whole") == []
    (cx, cy), = dogs("tiled")  # the dog of dog.jpg, centre about (249, 352) in the photo
    assert abs(cx - (1632 + 249)) < 15 and abs(cy - (1128 + 352)) < 15


def test_detect_cli_bad_tile_is_one_error_line(tiny_weights, tmp_path):
    result = run_detect(f"{DARKNET_PHOTOS}/dog.jpg", "--cfg", str(TINY_CFG), "--weights", str(tiny_weights),
                        "--tile", "16", "--out", "x", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --tile 16: windows must be at least 32 px"], result.stderr
