"""Annotated images stay legible (issue 25): labels never cover each other, never leave the image,
and read black or white on their class colour."""

from __future__ import annotations

import numpy as np

from detkit.engine.draw import draw_detections, place_label, place_labels, text_color
from detkit.engine.predict import Detection


def overlap(a, b) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def inside(rect, width, height) -> bool:
    return 0 <= rect[0] and 0 <= rect[1] and rect[2] <= width and rect[3] <= height


def test_two_boxes_with_the_same_corner_get_separate_labels():
    boxes = [(50, 60, 150, 200), (50, 60, 120, 140)]
    rects = place_labels(boxes, [(70, 20), (60, 20)], (300, 300))
    assert rects[0] == (50, 40, 120, 60)          # the first: above its box
    assert rects[1] == (50, 60, 110, 80)          # the second: inside its box's top
    assert overlap(*rects) == 0


def test_many_labels_at_one_place_are_all_separate_and_inside_the_image():
    boxes = [(0, 0, 100, 100)] * 6  # at the corner: "above" is clamped into the image
    rects = place_labels(boxes, [(80, 15)] * 6, (200, 120))
    assert all(inside(r, 200, 120) for r in rects)
    assert all(overlap(a, b) == 0 for i, a in enumerate(rects) for b in rects[i + 1:])


def test_labels_at_the_right_and_bottom_edges_are_pulled_inside():
    assert place_label((190, 95, 199, 99), (40, 12), (200, 100)) == (160, 83, 200, 95)
    crowded = [(0, 0, 200, 100)]  # every place taken: the least overlapping one, still inside
    assert inside(place_label((20, 20, 60, 60), (30, 12), (200, 100), crowded), 200, 100)


def test_drawn_labels_have_a_filled_background_and_contrasting_text():
    image = np.zeros((120, 160, 3), np.uint8)
    dets = [Detection((10.0, 40.0, 100.0, 110.0), 0.9, 0, "person"),
            Detection((10.0, 40.0, 80.0, 100.0), 0.8, 1, "bicycle")]
    draw_detections(image, dets, 80)
    assert image.any()
    assert text_color((255, 255, 0)) == (0, 0, 0) and text_color((128, 0, 0)) == (255, 255, 255)
