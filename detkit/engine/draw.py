"""Annotated images: boxes, class name and score, darknet's stable colour per class."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from .predict import Detection

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


def draw_detections(image: np.ndarray, detections: Sequence[Detection], num_classes: int
                    ) -> np.ndarray:
    """Draw in place and return `image`: one box per detection and a filled label above it.

    The label sits on a filled rectangle in the class colour with black or white text, so it is
    readable on any photo; line width and font scale follow the image size.
    """
    h, w = image.shape[:2]
    thickness = max(1, round((h + w) / 2 * 0.003))
    font_scale = max(0.4, thickness / 3)
    font_thick = max(1, thickness - 1)
    for det in sorted(detections, key=lambda d: d.score):
        color = class_color(det.class_id, num_classes)
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        cv2.rectangle(image, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        label = f"{det.class_name} {det.score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, font_thick)
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1  # above the box, else inside
        left = min(x1, max(0, w - tw - 2))
        cv2.rectangle(image, (left, top), (left + tw + 2, top + th + base + 2), color, cv2.FILLED)
        cv2.putText(image, label, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    text_color(color), font_thick, cv2.LINE_AA)
    return image
