"""Darknet's training augmentation (data.c load_data_detection), in numpy/OpenCV so it runs in
DataLoader workers. Boxes are (N, 4) cx, cy, w, h normalised to the image; they leave normalised
to the network input."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class DarknetAugment:
    """[net] jitter/hue/saturation/exposure and horizontal flip, as darknet applies them."""

    jitter: float = 0.2
    hue: float = 0.1
    saturation: float = 1.5
    exposure: float = 1.5
    flip: bool = True
    rot90: bool = False      # detkit extension: a random multiple of 90 degrees (overhead photos)
    min_size: float = 0.001  # darknet drops boxes narrower or shorter than this (normalised)


def rand_scale(rng: np.random.Generator, s: float) -> float:
    """darknet's rand_scale: U(1, s), inverted half of the time."""
    scale = rng.uniform(1.0, s) if s > 1 else 1.0
    return scale if rng.random() < 0.5 else 1.0 / scale


def _fit(aspect: float, net_w: int, net_h: int) -> tuple[int, int]:
    """The long side fills the net: (new_w, new_h) for an image of this aspect ratio."""
    if aspect < net_w / net_h:
        return max(1, int(round(aspect * net_h))), net_h
    return net_w, max(1, int(round(net_w / aspect)))


def letterbox_placement(width: int, height: int, net_w: int, net_h: int) -> tuple[float, float, float, float]:
    """Where the centred letterbox puts an image: (dx, dy, new_w, new_h) in network pixels."""
    new_w, new_h = _fit(width / height, net_w, net_h)
    return float(int((net_w - new_w) / 2)), float(int((net_h - new_h) / 2)), float(new_w), float(new_h)


def place(image: np.ndarray, net_w: int, net_h: int, jitter: float,
          rng: np.random.Generator | None) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Jittered aspect, long side fills the net, random offset on 0.5 gray (data.c l.1036).

    Without `rng` this is darknet's centred letterbox. Returns the canvas and the placement
    (dx, dy, new_w, new_h) in network pixels.
    """
    h, w = image.shape[:2]
    if rng is None:
        x0f, y0f, new_wf, new_hf = letterbox_placement(w, h, net_w, net_h)
        x0, y0, new_w, new_h = int(x0f), int(y0f), int(new_wf), int(new_hf)
    else:
        dw, dh = jitter * w, jitter * h
        aspect = (w + rng.uniform(-dw, dw)) / (h + rng.uniform(-dh, dh)) if jitter > 0 else w / h
        new_w, new_h = _fit(aspect, net_w, net_h)
        x0, y0 = int(rng.uniform(0, net_w - new_w)), int(rng.uniform(0, net_h - new_h))
    canvas = np.full((net_h, net_w, 3), 127, np.uint8)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas[y0:y0 + new_h, x0:x0 + new_w] = resized[: net_h - y0, : net_w - x0]
    return canvas, (float(x0), float(y0), float(new_w), float(new_h))


def move_boxes(boxes: np.ndarray, placement, net_w: int, net_h: int, flip: bool,
               min_size: float) -> np.ndarray:
    """Boxes (cx, cy, w, h image-normalised) -> network-normalised, clipped, tiny ones dropped.

    Returns a keep mask applied by the caller together with the classes.
    """
    dx, dy, new_w, new_h = placement
    x1 = ((boxes[:, 0] - boxes[:, 2] / 2) * new_w + dx) / net_w
    x2 = ((boxes[:, 0] + boxes[:, 2] / 2) * new_w + dx) / net_w
    y1 = ((boxes[:, 1] - boxes[:, 3] / 2) * new_h + dy) / net_h
    y2 = ((boxes[:, 1] + boxes[:, 3] / 2) * new_h + dy) / net_h
    if flip:
        x1, x2 = 1 - x2, 1 - x1
    x1, x2 = np.clip(x1, 0, 1), np.clip(x2, 0, 1)
    y1, y2 = np.clip(y1, 0, 1), np.clip(y2, 0, 1)
    out = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1).astype(np.float32)
    return out


def distort_hsv(image: np.ndarray, hue: float, saturation: float, exposure: float,
                rng: np.random.Generator) -> np.ndarray:
    """Hue shift with wrap-around, saturation and exposure scaled by rand_scale (image.c)."""
    dhue = rng.uniform(-hue, hue)
    dsat, dexp = rand_scale(rng, saturation), rand_scale(rng, exposure)
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + dhue * 256.0) % 256.0
    hsv[..., 1] = np.clip(hsv[..., 1] * dsat, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * dexp, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR_FULL)


def rotate90(image: np.ndarray, boxes: np.ndarray, turns: int) -> tuple[np.ndarray, np.ndarray]:
    """`turns` quarter turns clockwise of the image and its normalised (cx, cy, w, h) boxes.

    Seen from above, a tree or a car has no "up": with the horizontal flip this gives all eight
    symmetries of the square, which darknet's augmentation (flip only) cannot show the model.
    """
    for _ in range(turns % 4):
        image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
        if len(boxes):  # the pixel (x, y) of an H-high image goes to (H - y, x)
            boxes = np.stack([1 - boxes[:, 1], boxes[:, 0], boxes[:, 3], boxes[:, 2]], 1).astype(np.float32)
    return image, boxes


def augment(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, net_w: int, net_h: int,
            settings: DarknetAugment | None, rng: np.random.Generator | None):
    """One training (settings and rng given) or evaluation (None) sample.

    Returns the BGR uint8 network canvas, boxes (K, 4) cx, cy, w, h network-normalised and
    classes (K,).
    """
    train = settings is not None and rng is not None
    if train and settings.rot90:
        image, boxes = rotate90(image, boxes, int(rng.integers(0, 4)))
    canvas, placement = place(image, net_w, net_h, settings.jitter if train else 0.0, rng if train else None)
    flip = bool(train and settings.flip and rng.random() < 0.5)
    if flip:
        canvas = canvas[:, ::-1].copy()
    if train:
        canvas = distort_hsv(canvas, settings.hue, settings.saturation, settings.exposure, rng)
    moved = move_boxes(boxes, placement, net_w, net_h, flip, 0.0)
    min_size = settings.min_size if settings is not None else 0.0
    keep = (moved[:, 2] > min_size) & (moved[:, 3] > min_size) if len(moved) else np.zeros(0, bool)
    return canvas, moved[keep], classes[keep]
