"""Boxes stay on their objects through every darknet transform."""

from __future__ import annotations

import numpy as np

from detkit.data.augment import (
    DarknetAugment,
    augment,
    augment_with_extent,
    mosaic,
    move_boxes,
    place,
    rotate90,
)


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


def test_random_scale_zooms_both_ways_and_boxes_stay_on_the_paint():
    image, boxes = painted()
    settings = DarknetAugment(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0, flip=False, random_scale=0.5)
    widths = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        canvas, placement = place(image, 128, 128, 0.0, rng, 0.5)
        widths.append(placement[2])
        assert canvas.shape == (128, 128, 3)
        canvas, moved, _ = augment(image, boxes, np.array([0, 1]), 128, 128, settings, np.random.default_rng(seed))
        for box in moved:
            if min(box[2], box[3]) * 128 > 6:  # a sliver at the edge has no inside to check
                assert box_mean(canvas, box, 128) > 240
            assert (0 <= box[:2]).all() and (box[:2] <= 1).all()
    assert min(widths) < 96 and max(widths) > 160  # 128 * U(0.5, 1.5): zoomed out and in


def test_random_scale_overhang_crops_the_image_at_the_offset():
    image = np.zeros((100, 100, 3), np.uint8)
    image[40:60, 40:60] = 255  # a white square in the middle of a black image
    boxes = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    settings = DarknetAugment(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0, flip=False, random_scale=0.9)
    overhangs = 0
    for seed in range(20):
        canvas, (dx, dy, new_w, new_h) = place(image, 100, 100, 0.0, np.random.default_rng(seed), 0.9)
        if new_w <= 100:
            continue
        overhangs += 1  # no gray, a negative offset within the slack, the crop at that offset
        assert 100 - new_w <= dx <= 0 and 100 - new_h <= dy <= 0 and not (canvas == 127).any()
        square = [dx + 0.4 * new_w, dy + 0.4 * new_h, dx + 0.6 * new_w, dy + 0.6 * new_h]
        x1, y1, x2, y2 = (int(np.clip(v, 0, 100)) for v in square)
        if x2 - x1 > 4 and y2 - y1 > 4:
            assert canvas[y1 + 2:y2 - 2, x1 + 2:x2 - 2].min() == 255
        _, moved, _ = augment(image, boxes, np.array([0]), 100, 100, settings, np.random.default_rng(seed))
        expected = np.clip(np.array(square) / 100, 0, 1)
        if expected[2] - expected[0] > 0.001 and expected[3] - expected[1] > 0.001:
            np.testing.assert_allclose(moved[0], [(expected[0] + expected[2]) / 2, (expected[1] + expected[3]) / 2,
                                                  expected[2] - expected[0], expected[3] - expected[1]], atol=1e-5)
    assert overhangs >= 5


class HalfwayRng:
    """Stands in for a Generator where the test needs the cut point in the middle."""

    def uniform(self, low, high):
        return (low + high) / 2


def test_mosaic_quadrants_show_each_part_by_its_corner():
    net = 64
    parts = []
    for value in (10, 60, 110, 160):
        part = np.full((net, net, 3), value, np.uint8)
        part[net - 4:, net - 4:] = 255  # the bottom-right corner marks the top-left part's inner corner
        parts.append((part, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), (0, 0, net, net)))
    canvas, boxes, classes = mosaic(parts, net, net, HalfwayRng())
    assert boxes.shape == (0, 4) and classes.shape == (0,)
    assert (canvas[:28, :28] == 10).all() and (canvas[28:32, 28:32] == 255).all()  # its corner at the cut
    assert (canvas[:32, 32:] == 60).all() and (canvas[32:, :32] == 110).all() and (canvas[32:, 32:] == 160).all()
    for seed in range(10):  # the cut point stays in the middle half
        canvas, _, _ = mosaic(parts, net, net, np.random.default_rng(seed))
        cut_x = int(np.argmax(canvas[0, :, 0] == 60))
        assert 16 <= cut_x <= 48

    # an image on the left half of its canvas (gray on the right): its right edge, not the
    # canvas's, touches the cut, so the top-left quadrant shows no gray
    narrow = np.full((net, net, 3), 127, np.uint8)
    narrow[:, :32] = 10
    canvas, _, _ = mosaic([(narrow, *parts[0][1:3], (0, 0, 32, net)), *parts[1:]], net, net, HalfwayRng())
    assert (canvas[:32, :32] == 10).all()


def test_mosaic_boxes_stay_on_the_paint_and_slivers_are_dropped():
    image, boxes = painted()
    settings = DarknetAugment(jitter=0.2, hue=0.0, saturation=1.0, exposure=1.0, random_scale=0.3)
    kept_total = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        parts = [augment_with_extent(image, boxes, np.array([0, 1]), 128, 128, settings, rng) for _ in range(4)]
        canvas, moved, classes = mosaic(parts, 128, 128, rng)
        assert len(moved) == len(classes) and len(moved) <= 8
        kept_total += len(moved)
        for box in moved:
            assert box[2] * 128 > 2 and box[3] * 128 > 2
            if min(box[2], box[3]) * 128 > 6:
                assert box_mean(canvas, box, 128) > 240
    assert 20 < kept_total < 160  # some boxes cut away, most kept
    rng = np.random.default_rng(0)
    for _ in range(20):  # the extent is where the image lies: gray outside, the image's gray inside
        canvas, _, _, (x1, y1, x2, y2) = augment_with_extent(image, boxes, np.array([0, 1]), 128, 128,
                                                             settings, rng)
        inside = np.zeros(canvas.shape[:2], bool)
        inside[y1:y2, x1:x2] = True
        assert (canvas[~inside] == 127).all() and (canvas[inside][:, 0] != 127).mean() > 0.95

    # The bottom-right part's top-left corner lies at the cut (50, 50): a 20-pixel box at 40..60
    # moves to 90..110 and is clipped to 90..100 (a quarter visible: kept); at 44..64 -> 94..114,
    # 6 x 6 pixels of 20 x 20 remain (9 %: dropped); at 49..69 one pixel remains (dropped).
    part = np.zeros((100, 100, 3), np.uint8)
    empty = (part, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), (0, 0, 100, 100))

    def cut(centre: float):
        box = np.array([[centre, centre, 0.2, 0.2]], np.float32)
        return mosaic([empty, empty, empty, (part, box, np.array([7]), (0, 0, 100, 100))], 100, 100, HalfwayRng())[1:]

    moved, classes = cut(0.5)
    np.testing.assert_allclose(moved, [[0.95, 0.95, 0.1, 0.1]], atol=1e-6)
    assert classes.tolist() == [7]
    assert len(cut(0.54)[0]) == 0 and len(cut(0.59)[0]) == 0


def test_dataset_mosaic_mixes_four_samples_reproducibly(tmp_path):
    import cv2

    from detkit.data.dataset import DetectionDataset, Sample

    samples = []
    for i, value in enumerate((20, 70, 120, 170, 220)):
        path = tmp_path / f"{i}.png"
        image = np.full((80, 80, 3), value, np.uint8)
        cv2.imwrite(str(path), image)
        samples.append(Sample(path, np.array([[0.5, 0.5, 0.5, 0.5]], np.float32), np.array([i])))
    settings = DarknetAugment(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0, mosaic=True)
    dataset = DetectionDataset(samples, (64, 64), settings, seed=5)
    plain = DetectionDataset(samples, (64, 64), DarknetAugment(jitter=0.0, hue=0.0, saturation=1.0, exposure=1.0))
    mixed = 0
    for key in range(10):
        image, targets, index = dataset[key]
        again, targets_again, _ = dataset[key]
        assert index == key % 5 and torch_equal(image, again) and torch_equal(targets, targets_again)
        colours = set(np.unique(image.numpy()).tolist()) - {127}
        assert index * 50 + 20 in colours  # the sample itself is one of the four
        mixed += len(colours) > 1
        assert len(plain[key][1]) == 1
    assert mixed >= 8


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_dataset_mosaic_parts_do_not_share_the_cut_points_random_stream(tmp_path, monkeypatch):
    """Each part is augmented from its own stream: with a shared one, a zoomed-in first image
    would come with a large top-left quadrant (correlation 0.9 before the fix)."""
    import copy

    import cv2

    import detkit.data.dataset as dataset_module
    from detkit.data.dataset import DetectionDataset, Sample

    samples = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((80, 80, 3), 90, np.uint8))
        samples.append(Sample(path, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))
    pairs = []
    real_mosaic = dataset_module.mosaic

    def recording_mosaic(parts, net_w, net_h, rng):
        cut_x = copy.deepcopy(rng).uniform(0.25, 0.75)  # the draw mosaic makes first
        pairs.append((parts[0][3][2] - parts[0][3][0], cut_x))
        return real_mosaic(parts, net_w, net_h, rng)

    monkeypatch.setattr(dataset_module, "mosaic", recording_mosaic)
    settings = DarknetAugment(jitter=0.3, hue=0.0, saturation=1.0, exposure=1.0, random_scale=0.5, mosaic=True)
    dataset = DetectionDataset(samples, (64, 64), settings, seed=2)
    for key in range(200):
        dataset[key]
    widths, cuts = np.array(pairs).T
    assert widths.std() > 0 and abs(np.corrcoef(widths, cuts)[0, 1]) < 0.3
