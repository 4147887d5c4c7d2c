"""Boxes stay on their objects through every darknet transform."""

from __future__ import annotations

import numpy as np

from detkit.data.augment import DarknetAugment, augment, move_boxes, place, rotate90


def painted(w=200, h=120):
    """A gray image with two white rectangles, and their boxes (cx, cy, w, h normalised)."""
    image = np.full((h, w, 3), 60, np.uint8)
    rects = [(20, 30, 70, 90), (120, 10, 190, 50)]
    for x1, y1, x2, y2 in rects:
        image[y1:y2, x1:x2] = 255
    boxes = np.array([[(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
                      for x1, y1, x2, y2 in rects], np.float32)
    return image, boxes


def box_mean(canvas, box, size):
    cx, cy, w, h = box * np.array([size, size, size, size])
    x1, y1, x2, y2 = int(cx - w / 2 + 2), int(cy - h / 2 + 2), int(cx + w / 2 - 2), int(cy + h / 2 - 2)
    return canvas[y1:y2, x1:x2].mean()


def test_boxes_follow_objects_under_jitter_flip_and_placement():
    image, boxes = painted()
    settings = DarknetAugment(jitter=0.3, hue=0.0, saturation=1.0, exposure=1.0)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        canvas, moved, classes = augment(image, boxes, np.array([0, 1]), 128, 128, settings, rng)
        assert len(moved) == 2 and classes.tolist() == [0, 1]
        for box in moved:
            assert box_mean(canvas, box, 128) > 240  # the box still covers white paint


def test_eval_placement_is_centred_letterbox():
    image, boxes = painted(200, 100)
    canvas, placement = place(image, 100, 100, 0.0, None)
    assert placement == (0.0, 25.0, 100.0, 50.0)
    assert (canvas[:25] == 127).all() and (canvas[75:] == 127).all()
    moved = move_boxes(boxes, placement, 100, 100, False, 0.0)
    np.testing.assert_allclose(moved[:, 0], boxes[:, 0], atol=1e-6)
    np.testing.assert_allclose(moved[:, 1], 0.25 + boxes[:, 1] * 0.5, atol=1e-6)


def test_boxes_outside_are_clipped_and_tiny_ones_dropped():
    boxes = np.array([[0.0, 0.5, 0.4, 0.2], [0.5, 0.5, 0.0005, 0.3]], np.float32)
    image = np.zeros((100, 100, 3), np.uint8)
    _, moved, classes = augment(image, boxes, np.array([3, 4]), 100, 100, DarknetAugment(), None)
    assert classes.tolist() == [3]
    np.testing.assert_allclose(moved[0], [0.1, 0.5, 0.2, 0.2], atol=1e-6)


def test_hsv_keeps_gray_and_shape():
    image, boxes = painted()
    settings = DarknetAugment(jitter=0.0, hue=0.1, saturation=1.5, exposure=1.5, flip=False)
    canvas, moved, _ = augment(image, boxes, np.array([0, 1]), 96, 64, settings, np.random.default_rng(1))
    assert canvas.shape == (64, 96, 3) and canvas.dtype == np.uint8
    assert len(moved) == 2


def test_quarter_turns_move_boxes_with_the_paint():
    image, boxes = painted()
    for turns in range(4):
        turned, moved = rotate90(image, boxes, turns)
        size = np.array(turned.shape[1::-1] * 2, np.float32)  # (w, h, w, h) of the turned image
        for box in moved * size:
            x1, y1 = int(box[0] - box[2] / 2) + 1, int(box[1] - box[3] / 2) + 1
            x2, y2 = int(box[0] + box[2] / 2) - 1, int(box[1] + box[3] / 2) - 1
            assert turned[y1:y2, x1:x2].min() == 255  # the box still lies on white paint only
        expected_shape = image.shape if turns % 2 == 0 else (image.shape[1], image.shape[0], 3)
        assert turned.shape == expected_shape
    np.testing.assert_allclose(rotate90(image, boxes, 4)[1], boxes)


def test_rot90_setting_turns_samples_and_keeps_boxes_on_objects():
    image, boxes = painted(120, 120)
    settings = DarknetAugment(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0, flip=False, rot90=True)
    orientations = set()
    for seed in range(12):
        canvas, moved, _ = augment(image, boxes, np.array([0, 1]), 120, 120, settings, np.random.default_rng(seed))
        for box in moved:
            assert box_mean(canvas, box, 120) > 240
        orientations.add(tuple(np.round(moved[0], 3)))
    assert len(orientations) == 4  # every quarter turn occurs
