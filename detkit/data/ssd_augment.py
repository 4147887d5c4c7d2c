"""SSD's training augmentation (Liu et al. 2016; Caffe SSD's ssd_pascal.py), numpy/OpenCV for
DataLoader workers.

The order is Caffe's: photometric distortion, expand (zoom out onto a mean-filled canvas), a
random crop that must overlap some truth by a minimum IoU drawn from {none, 0.1, 0.3, 0.5, 0.7,
0.9, any}, horizontal flip, then a warp (no letterbox) to the network size. Boxes follow every
geometric step, so they always describe the pixels they were drawn on.

`ssd_augment` has the call and return convention of detkit.data.augment.augment (BGR uint8 in,
boxes cx, cy, w, h normalised to the image in, normalised to the network out), so a data set can
use either.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .augment import to_cxcywh_normalised, to_xyxy_pixels

# None: keep the whole image; -inf: any crop whose kept truths are non-empty (Caffe's
# max_jaccard_overlap=1 sampler).
CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -np.inf)


@dataclass
class SSDAugment:
    """Caffe SSD's settings (ssd_pascal.py train_transform_param and batch_sampler)."""

    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)  # expand fill, image channel order
    photometric: bool = True
    brightness_delta: float = 32.0
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue_delta: float = 18.0            # degrees
    channel_swap_prob: float = 0.0     # Caffe's random_order_prob; ssd.pytorch uses 0.5
    expand_prob: float = 0.5
    max_expand: float = 4.0
    crop: bool = True
    crop_trials: int = 50
    min_crop_scale: float = 0.3
    crop_aspect: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5
    min_size: float = 0.0              # drop boxes this small (network-normalised) at the end


def photometric_distort(image: np.ndarray, settings: SSDAugment, rng: np.random.Generator) -> np.ndarray:
    """Brightness, then contrast before or after saturation and hue (one of the two orders at
    random), then an optional channel permutation. float32 BGR in 0..255 in and out."""
    image = image.astype(np.float32, copy=True)
    if rng.random() < 0.5:
        image += rng.uniform(-settings.brightness_delta, settings.brightness_delta)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        image = _contrast(image, settings, rng)
    image = _saturation_hue(image, settings, rng)
    if not contrast_first:
        image = _contrast(image, settings, rng)
    if rng.random() < settings.channel_swap_prob:
        image = image[:, :, rng.permutation(3)]
    return np.clip(image, 0, 255)


def _contrast(image: np.ndarray, settings: SSDAugment, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        image = image * rng.uniform(*settings.contrast)
    return image


def _saturation_hue(image: np.ndarray, settings: SSDAugment, rng: np.random.Generator) -> np.ndarray:
    """In OpenCV's float HSV (H in degrees, S in 0..1, V as given)."""
    do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
    if not (do_sat or do_hue):
        return image
    hsv = cv2.cvtColor(np.clip(image, 0, 255), cv2.COLOR_BGR2HSV)
    if do_sat:
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*settings.saturation), 0, 1)
    if do_hue:
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-settings.hue_delta, settings.hue_delta)) % 360.0
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def expand(image: np.ndarray, boxes: np.ndarray, settings: SSDAugment,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Zoom out: the image at a random place on a canvas up to max_expand times larger, filled
    with the mean (zero after mean subtraction). Boxes are x1, y1, x2, y2 pixels."""
    if rng.random() >= settings.expand_prob or settings.max_expand <= 1:
        return image, boxes
    h, w = image.shape[:2]
    ratio = rng.uniform(1.0, settings.max_expand)
    out_w, out_h = int(w * ratio), int(h * ratio)
    left, top = int(rng.uniform(0, out_w - w)), int(rng.uniform(0, out_h - h))
    canvas = np.empty((out_h, out_w, image.shape[2]), image.dtype)
    canvas[...] = np.asarray(settings.mean, image.dtype)
    canvas[top:top + h, left:left + w] = image
    return canvas, boxes + np.array([left, top, left, top], boxes.dtype)


def _iou_one(rect: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(rect[:2], boxes[:, :2])
    rb = np.minimum(rect[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area_r = np.prod(rect[2:] - rect[:2])
    area_b = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / (area_r + area_b - inter)


def min_iou_crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, settings: SSDAugment,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop of 0.3..1 of each side (aspect 0.5..2) overlapping some truth by the drawn IoU.

    Truths whose centre falls outside the crop are dropped, the rest clipped to it. After
    `crop_trials` failures the image is kept whole, as Caffe does.
    """
    min_iou = CROP_MIN_IOUS[int(rng.integers(len(CROP_MIN_IOUS)))]
    if min_iou is None or len(boxes) == 0:
        return image, boxes, labels
    rect = sample_crop(image.shape[1], image.shape[0], boxes, min_iou, settings, rng)
    if rect is None:
        return image, boxes, labels
    inside = centres_inside(boxes, rect)
    kept = boxes[inside].copy()
    kept[:, :2] = np.maximum(kept[:, :2], rect[:2]) - rect[:2]
    kept[:, 2:] = np.minimum(kept[:, 2:], rect[2:]) - rect[:2]
    x0, y0, x1, y1 = rect.astype(int)
    return image[y0:y1, x0:x1], kept, labels[inside]


def centres_inside(boxes: np.ndarray, rect: np.ndarray) -> np.ndarray:
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return np.all((centres > rect[:2]) & (centres < rect[2:]), axis=1)


def sample_crop(w: int, h: int, boxes: np.ndarray, min_iou: float, settings: SSDAugment,
                rng: np.random.Generator) -> np.ndarray | None:
    """An integer crop x1, y1, x2, y2 with IoU >= min_iou to some truth and at least one truth
    centre inside, or None after `crop_trials` tries (Caffe's BatchSampler with max_sample 1)."""
    for _ in range(settings.crop_trials):
        cw = rng.uniform(settings.min_crop_scale * w, w)
        ch = rng.uniform(settings.min_crop_scale * h, h)
        if not settings.crop_aspect[0] <= ch / cw <= settings.crop_aspect[1]:
            continue
        left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
        rect = np.array([int(left), int(top), int(left + cw), int(top + ch)], np.float32)
        if rect[2] <= rect[0] or rect[3] <= rect[1]:
            continue
        if _iou_one(rect, boxes).max() >= min_iou and centres_inside(boxes, rect).any():
            return rect
    return None


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return image[:, ::-1], flipped


def ssd_augment(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, net_w: int, net_h: int,
                settings: SSDAugment | None, rng: np.random.Generator | None):
    """One training (settings and rng given) or evaluation (None: warp only) sample.

    `image` is BGR uint8 HWC and `boxes` (N, 4) cx, cy, w, h normalised to it. Returns the BGR
    uint8 network-size image, boxes (K, 4) cx, cy, w, h normalised to the network and classes (K,).
    """
    h, w = image.shape[:2]
    xyxy = to_xyxy_pixels(np.asarray(boxes, np.float32).reshape(-1, 4), w, h)
    classes = np.asarray(classes)
    if settings is not None and rng is not None:
        image, xyxy, classes = _geometric(image, xyxy, classes, settings, rng)
    h, w = image.shape[:2]
    out = cv2.resize(np.ascontiguousarray(image), (net_w, net_h), interpolation=cv2.INTER_LINEAR)
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    normalised = to_cxcywh_normalised(xyxy, w, h)
    min_size = settings.min_size if settings is not None else 0.0
    keep = (normalised[:, 2] > min_size) & (normalised[:, 3] > min_size)
    return out, normalised[keep], classes[keep]


def _geometric(image: np.ndarray, xyxy: np.ndarray, classes: np.ndarray, settings: SSDAugment,
               rng: np.random.Generator):
    """Photometric distortion, expand, min-IoU crop and flip, in Caffe's order."""
    if settings.photometric:
        image = photometric_distort(image, settings, rng)
    image, xyxy = expand(image, xyxy, settings, rng)
    if settings.crop:
        image, xyxy, classes = min_iou_crop(image, xyxy, classes, settings, rng)
    if rng.random() < settings.flip_prob:
        image, xyxy = hflip(image, xyxy)
    return image, xyxy, classes
