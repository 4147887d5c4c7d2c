"""Annotated images: boxes, class name and score, darknet's stable colour per class."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from .detection import Detection

# darknet image.c: colors[6][3] and get_color(c, x, max), RGB in [0, 1].
_DARKNET_COLORS = ((1, 0, 1), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))


def _darknet_channel(c: int, x: int, maximum: int) -> float:
    ratio = (x / maximum) * 5
    i, j = int(np.floor(ratio)), int(np.ceil(ratio))
    ratio -= i
    return (1 - ratio) * _DARKNET_COLORS[i][c] + ratio * _DARKNET_COLORS[j][c]


@lru_cache(maxsize=4096)
def class_color(class_id: int, num_classes: int) -> tuple[int, int, int]:
    """darknet's draw_detections colour of a class (offset = class*123457 % classes), as BGR.

    Stable across images and runs, and the same colours darknet's own predictions.jpg uses.
    """
    num_classes = max(num_classes, 1)
    offset = class_id * 123457 % num_classes
    red = _darknet_channel(2, offset, num_classes)
    green = _darknet_channel(1, offset, num_classes)
    blue = _darknet_channel(0, offset, num_classes)
    return (int(round(blue * 255)), int(round(green * 255)), int(round(red * 255)))


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on a BGR background (Rec. 601 luma)."""
    b, g, r = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


Rect = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, x2 and y2 exclusive


def _overlap(a: Rect, b: Rect) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def place_label(box: Rect, size: tuple[int, int], image_size: tuple[int, int],
                taken: Sequence[Rect] = ()) -> Rect:
    """Where one label rectangle of `size` (w, h) goes for `box`, clear of the `taken` ones.

    Crowded scenes (a flock, a car park) put boxes corner to corner, and labels drawn all at
    the same place hide each other. Tried in order: above the box, inside its top, below it,
    then shifted down from the top one label height at a time; the first that overlaps no
    earlier label wins (else the least overlapping one). Every candidate is clamped into
    `image_size` (w, h), so a label is never cut off at the border.
    """
    lw, lh = size
    width, height = image_size
    left = min(max(box[0], 0), max(width - lw, 0))

    def at(top: int) -> Rect:
        top = min(max(top, 0), max(height - lh, 0))
        return (left, top, left + lw, top + lh)

    candidates = [at(box[1] - lh), at(box[1]), at(box[3])]
    candidates += [at(top) for top in range(box[1] + lh, height - lh + 1, max(lh, 1))]
    for rect in candidates:
        if not any(_overlap(rect, other) for other in taken):
            return rect
    return min(candidates, key=lambda rect: sum(_overlap(rect, other) for other in taken))


def place_labels(boxes: Sequence[Rect], sizes: Sequence[tuple[int, int]],
                 image_size: tuple[int, int]) -> list[Rect]:
    """place_label for each box in turn (first = best place), each clear of those before."""
    placed: list[Rect] = []
    for box, size in zip(boxes, sizes, strict=True):
        placed.append(place_label(box, size, image_size, placed))
    return placed


def draw_detections(image: np.ndarray, detections: Sequence[Detection], num_classes: int
                    ) -> np.ndarray:
    """Draw in place and return `image`: one box per detection and a label that stays legible.

    The label ("dog 0.81") sits on a filled rectangle in the class colour with black or white
    text, so it reads on any photo; labels are placed by score (the best first) so that none
    covers another (place_labels), and drawn after all boxes so no box line crosses a label.
    Line width and font scale follow the image size.
    """
    h, w = image.shape[:2]
    thickness = max(1, round((h + w) / 2 * 0.003))
    font_scale = max(0.4, thickness / 3)
    font_thick = max(1, thickness - 1)
    ranked = sorted(detections, key=lambda d: -d.score)
    boxes, texts, metrics = [], [], []
    for det in ranked:
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        boxes.append((max(0, min(x1, w - 1)), max(0, min(y1, h - 1)),
                      max(0, min(x2, w - 1)), max(0, min(y2, h - 1))))
        texts.append(f"{det.class_name} {det.score:.2f}")
        metrics.append(cv2.getTextSize(texts[-1], cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                                       font_thick))
    sizes = [(tw + 2, th + base + 2) for (tw, th), base in metrics]
    labels = place_labels(boxes, sizes, (w, h))
    order = range(len(ranked) - 1, -1, -1)  # the best drawn last, on top
    for i in order:
        cv2.rectangle(image, boxes[i][:2], boxes[i][2:],
                      class_color(ranked[i].class_id, num_classes), thickness, cv2.LINE_AA)
    for i in order:
        color = class_color(ranked[i].class_id, num_classes)
        left, top, right, bottom = labels[i]
        cv2.rectangle(image, (left, top), (right - 1, bottom - 1), color, cv2.FILLED)
        cv2.putText(image, texts[i], (left + 1, top + metrics[i][0][1] + 1),
                    cv2.FONT_HERSHEY_SIMPLEX, font_scale, text_color(color), font_thick,
                    cv2.LINE_AA)
    return image
