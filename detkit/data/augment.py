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
    random_scale: float = 0.0  # detkit extension: resize by U(1 - s, 1 + s) after the placement
    mosaic: bool = False     # AlexeyAB's [net] mosaic=1: four augmented images, one per quadrant
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
          rng: np.random.Generator | None, random_scale: float = 0.0,
          ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Jittered aspect, long side fills the net, random offset on 0.5 gray (data.c l.1036).

    `random_scale` s > 0 then resizes the placed image by U(1 - s, 1 + s) (ultralytics' scale
    gain; darknet has it as a commented-out `scale = rand_uniform(.25, 2)`): a larger image is
    cropped at a random offset, a smaller one lies on more gray. Without `rng` this is darknet's
    centred letterbox. Returns the canvas and the placement (dx, dy, new_w, new_h) in network
    pixels; dx, dy are negative when the image overhangs the canvas.
    """
    h, w = image.shape[:2]
    if rng is None:
        x0f, y0f, new_wf, new_hf = letterbox_placement(w, h, net_w, net_h)
        x0, y0, new_w, new_h = int(x0f), int(y0f), int(new_wf), int(new_hf)
    else:
        dw, dh = jitter * w, jitter * h
        aspect = (w + rng.uniform(-dw, dw)) / (h + rng.uniform(-dh, dh)) if jitter > 0 else w / h
        new_w, new_h = _fit(aspect, net_w, net_h)
        if random_scale > 0:
            factor = rng.uniform(1.0 - random_scale, 1.0 + random_scale)
            new_w, new_h = max(1, int(round(new_w * factor))), max(1, int(round(new_h * factor)))
        x0, y0 = int(_offset(rng, net_w - new_w)), int(_offset(rng, net_h - new_h))
    canvas = np.full((net_h, net_w, 3), 127, np.uint8)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    _paste(canvas, resized, (0, 0, net_w, net_h), (x0, y0))
    return canvas, (float(x0), float(y0), float(new_w), float(new_h))


def _offset(rng: np.random.Generator, slack: int) -> float:
    """Uniform offset in [0, slack] (gray around the image) or [slack, 0] (the image overhangs):
    darknet's rand_uniform, which swaps reversed bounds."""
    return rng.uniform(min(0, slack), max(0, slack))


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
    return augment_with_extent(image, boxes, classes, net_w, net_h, settings, rng)[:3]


def augment_with_extent(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, net_w: int, net_h: int,
                        settings: DarknetAugment | None, rng: np.random.Generator | None):
    """`augment`, and where the image lies on the canvas: (x1, y1, x2, y2) pixels, the gray
    around it excluded (mosaic puts the image's corner, not the canvas's, at its cut point)."""
    train = settings is not None and rng is not None
    if train and settings.rot90:
        image, boxes = rotate90(image, boxes, int(rng.integers(0, 4)))
    canvas, placement = place(image, net_w, net_h, settings.jitter if train else 0.0, rng if train else None,
                              settings.random_scale if train else 0.0)
    flip = bool(train and settings.flip and rng.random() < 0.5)
    if flip:
        canvas = canvas[:, ::-1].copy()
    if train:
        canvas = distort_hsv(canvas, settings.hue, settings.saturation, settings.exposure, rng)
    moved = move_boxes(boxes, placement, net_w, net_h, flip, 0.0)
    min_size = settings.min_size if settings is not None else 0.0
    keep = (moved[:, 2] > min_size) & (moved[:, 3] > min_size) if len(moved) else np.zeros(0, bool)
    return canvas, moved[keep], classes[keep], _extent(placement, net_w, net_h, flip)


def _extent(placement, net_w: int, net_h: int, flip: bool) -> tuple[int, int, int, int]:
    dx, dy, new_w, new_h = placement
    x1, y1 = int(max(0, dx)), int(max(0, dy))
    x2, y2 = int(min(net_w, dx + new_w)), int(min(net_h, dy + new_h))
    return (net_w - x2, y1, net_w - x1, y2) if flip else (x1, y1, x2, y2)


def mosaic(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]],
           net_w: int, net_h: int, rng, min_visible: float = 0.1
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four augmented samples (canvas, boxes, classes, image extent on the canvas, all at the
    network size, from `augment_with_extent`) as one: a random cut point in the middle half
    splits the canvas into quadrants, and each image's inner corner touches the cut point (the
    top-left image's bottom-right corner, ...), as AlexeyAB's and ultralytics' mosaic place
    them. More objects and contexts per image, objects cut at the quadrant edges.

    A cut box is kept when at least `min_visible` of it and more than 2 pixels each way remain
    (ultralytics' candidate rule): a sliver of a crown is not a crown. Returns canvas, boxes
    (K, 4) network-normalised cx, cy, w, h, and classes (K,).
    """
    if len(parts) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(parts)}")
    cut_x = int(rng.uniform(0.25, 0.75) * net_w)
    cut_y = int(rng.uniform(0.25, 0.75) * net_h)
    regions = [(0, 0, cut_x, cut_y), (cut_x, 0, net_w, cut_y), (0, cut_y, cut_x, net_h), (cut_x, cut_y, net_w, net_h)]
    canvas = np.full((net_h, net_w, 3), 127, np.uint8)
    all_boxes, all_classes = [], []
    for quadrant, ((part, boxes, classes, extent), region) in enumerate(zip(parts, regions, strict=True)):
        left, top = quadrant % 2 == 0, quadrant < 2  # the quadrant is left of / above the cut
        offset = (cut_x - (extent[2] if left else extent[0]), cut_y - (extent[3] if top else extent[1]))
        _paste(canvas, part, region, offset)
        kept, kept_classes = _cut_boxes(boxes, classes, region, offset, net_w, net_h, min_visible)
        all_boxes.append(kept)
        all_classes.append(kept_classes)
    return canvas, np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_classes)


def _paste(canvas: np.ndarray, part: np.ndarray, region, offset) -> None:
    """canvas[region] = part moved by `offset`, where the moved part covers the region."""
    ox, oy = offset
    x1, y1 = max(region[0], ox), max(region[1], oy)
    x2, y2 = min(region[2], ox + part.shape[1]), min(region[3], oy + part.shape[0])
    if x2 > x1 and y2 > y1:
        canvas[y1:y2, x1:x2] = part[y1 - oy:y2 - oy, x1 - ox:x2 - ox]


def _cut_boxes(boxes: np.ndarray, classes: np.ndarray, region, offset, net_w: int, net_h: int,
               min_visible: float) -> tuple[np.ndarray, np.ndarray]:
    """A part's normalised boxes moved by `offset` pixels and clipped to `region`."""
    if not len(boxes):
        return np.zeros((0, 4), np.float32), classes[:0]
    corners = to_xyxy_pixels(boxes, net_w, net_h) + np.array(offset * 2, np.float64)
    area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
    x1, y1, x2, y2 = region
    clipped = np.clip(corners, [x1, y1, x1, y1], [x2, y2, x2, y2])
    width, height = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    keep = (width > 2) & (height > 2) & (width * height >= min_visible * np.maximum(area, 1e-9))
    return to_cxcywh_normalised(clipped[keep], net_w, net_h), classes[keep]


def to_xyxy_pixels(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Normalised (cx, cy, w, h) -> corner pixels of a w x h image."""
    cx, cy, bw, bh = boxes.T
    return np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                     (cy + bh / 2) * h], 1).astype(np.float32)


def to_cxcywh_normalised(boxes: np.ndarray, w: int, h: int) -> np.ndarray:
    """Corner pixels of a w x h image -> normalised (cx, cy, w, h), clipped to the image."""
    x1, y1 = np.clip(boxes[:, 0] / w, 0, 1), np.clip(boxes[:, 1] / h, 0, 1)
    x2, y2 = np.clip(boxes[:, 2] / w, 0, 1), np.clip(boxes[:, 3] / h, 0, 1)
    return np.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1).astype(np.float32)
