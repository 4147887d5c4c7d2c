"""SSD augmentation: boxes keep describing the pixels they were drawn on through expand, crop,
flip and the final warp; crops honour their minimum IoU; photometric changes only colours."""

from __future__ import annotations

import numpy as np
import pytest

from detkit.data.ssd_augment import SSDAugment, _iou_one, sample_crop, ssd_augment

COLOURS = {0: (255, 255, 255), 1: (0, 0, 255)}  # BGR white and red on black


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 200x320 black image with a white and a red rectangle; boxes cx, cy, w, h normalised."""
    image = np.zeros((200, 320, 3), np.uint8)
    rects = {0: (40, 30, 140, 120), 1: (180, 90, 300, 180)}  # x1, y1, x2, y2
    boxes = []
    for label, (x1, y1, x2, y2) in rects.items():
        image[y1:y2, x1:x2] = COLOURS[label]
        boxes.append([(x1 + x2) / 2 / 320, (y1 + y2) / 2 / 200, (x2 - x1) / 320, (y2 - y1) / 200])
    return image, np.array(boxes, np.float32), np.array([0, 1])


def colour_fraction(image: np.ndarray, box: np.ndarray, colour, inset: int = 3) -> float:
    """Share of the pixels inside the box (inset against resize blur) that have the colour."""
    h, w = image.shape[:2]
    x1, y1 = int(box[0] * w - box[2] * w / 2) + inset, int(box[1] * h - box[3] * h / 2) + inset
    x2, y2 = int(box[0] * w + box[2] * w / 2) - inset, int(box[1] * h + box[3] * h / 2) - inset
    if x2 <= x1 or y2 <= y1:
        return 1.0  # too thin to judge after the warp
    patch = image[y1:y2, x1:x2].astype(int)
    return float(np.mean(np.all(np.abs(patch - colour) < 40, axis=2)))


def colour_box(image: np.ndarray, colour) -> np.ndarray:
    """x1, y1, x2, y2 (normalised) of the pixels with the colour."""
    ys, xs = np.nonzero(np.all(np.abs(image.astype(int) - colour) < 40, axis=2))
    h, w = image.shape[:2]
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])


def test_evaluation_is_a_plain_warp():
    image, boxes, classes = scene()
    out, out_boxes, out_classes = ssd_augment(image, boxes, classes, 300, 300, None, None)
    assert out.shape == (300, 300, 3) and out.dtype == np.uint8
    assert np.allclose(out_boxes, boxes, atol=1e-6) and out_classes.tolist() == [0, 1]


def test_boxes_follow_expand_crop_and_flip():
    image, boxes, classes = scene()
    settings = SSDAugment(photometric=False)
    seen = {"expanded": 0, "cropped": 0, "dropped": 0}
    for seed in range(40):
        rng = np.random.default_rng(seed)
        out, out_boxes, out_classes = ssd_augment(image, boxes, classes, 300, 300, settings, rng)
        assert out.shape == (300, 300, 3)
        assert np.all(out_boxes[:, 2:] > 0) and np.all(out_boxes[:, :2] - out_boxes[:, 2:] / 2 >= -1e-6)
        seen["expanded"] += bool(np.any(np.all(np.abs(out.astype(int) - (104, 117, 123)) < 3, axis=2)))
        seen["dropped"] += len(out_boxes) < 2
        for box, label in zip(out_boxes, out_classes, strict=True):
            assert colour_fraction(out, box, COLOURS[label]) > 0.95, (seed, label)
            xyxy = np.concatenate([box[:2] - box[2:] / 2, box[:2] + box[2:] / 2])
            found = colour_box(out, COLOURS[label])
            seen["cropped"] += bool(found[2] - found[0] > 0.5)
            assert _iou_one(found.astype(np.float32), xyxy[None].astype(np.float32))[0] > 0.85, (seed, label)
    assert min(seen.values()) > 0, seen


def test_photometric_changes_colours_only():
    image, boxes, classes = scene()
    settings = SSDAugment(expand_prob=0.0, crop=False, flip_prob=0.0)
    changed = 0
    for seed in range(10):
        out, out_boxes, _ = ssd_augment(image, boxes, classes, 320, 200, settings,
                                        np.random.default_rng(seed))
        assert np.allclose(out_boxes, boxes, atol=1e-6)
        changed += not np.array_equal(out, image)
    assert changed > 0


@pytest.mark.parametrize("min_iou", [0.1, 0.5, 0.9])
def test_crops_overlap_a_truth_by_their_minimum_iou(min_iou):
    boxes = np.array([[40, 30, 140, 120], [30, 20, 290, 180]], np.float32)
    settings = SSDAugment()
    found = 0
    for seed in range(20):
        rect = sample_crop(320, 200, boxes, min_iou, settings, np.random.default_rng(seed))
        if rect is None:
            continue
        found += 1
        assert _iou_one(rect, boxes).max() >= min_iou
        w, h = rect[2] - rect[0], rect[3] - rect[1]
        assert w >= 0.3 * 320 - 1 and h >= 0.3 * 200 - 1 and 0.5 <= h / w <= 2.0 + 0.05
    assert found > 0


def test_images_without_truths_pass():
    image = np.zeros((100, 120, 3), np.uint8)
    for seed in range(5):
        out, boxes, classes = ssd_augment(image, np.zeros((0, 4), np.float32), np.zeros(0, int),
                                          300, 300, SSDAugment(), np.random.default_rng(seed))
        assert out.shape == (300, 300, 3) and boxes.shape == (0, 4) and classes.shape == (0,)
