"""Darknet's image preprocessing and box correction, as batched tensor ops on the model's device.

Darknet (pjreddie, image.c) feeds a network with `letterbox_image`: the image is resized with
`resize_image` (bilinear, align-corners sampling, no antialiasing) to fit the network input with
its aspect ratio kept, then centred on a 0.5-gray canvas. `correct_yolo_boxes` maps the boxes
back. Both are reproduced here exactly, float32 arithmetic included, so that detkit's answers
match darknet's; `tests/test_detect.py` compares against libdarknet pixel for pixel.

Not every network wants darknet's letterbox: SSD is trained on images stretched to its square
input (torchvision, the SSD paper, detkit.data.ssd_augment), so `default_letterbox` says which
geometry a model expects and detection follows it unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..errors import CfgError

GRAY = 0.5  # darknet's fill_image(boxed, .5)
LETTERBOX_KEY = "letter_box"  # AlexeyAB's [net] key: 1 letterboxes, 0 stretches


def default_letterbox(model: torch.nn.Module) -> bool:
    """Whether detection should letterbox (True) or stretch (False) this model's input.

    A model answers best with the geometry it was trained on. `[net] letter_box=0/1` (AlexeyAB's
    key) says it explicitly. Otherwise a model with any SSD head stretches, because SSD is
    trained on images warped to the square input (torchvision, the SSD paper,
    detkit.data.ssd_augment); `[yolo]`/`[region]` models letterbox, as pjreddie's darknet does.
    """
    net = getattr(model, "net", None)
    if net is not None and net.has(LETTERBOX_KEY):
        value = net.get_int(LETTERBOX_KEY)
        if value not in (0, 1):
            raise CfgError(f"{net.where(LETTERBOX_KEY)}: [net] {LETTERBOX_KEY}={value} must be 0 "
                           "(stretch) or 1 (letterbox)")
        return value == 1
    return not has_ssd_head(model)


def has_ssd_head(model: torch.nn.Module) -> bool:
    """Whether any head is an SSD head (imported lazily: the heads package is not needed to
    letterbox a batch). Decides the input geometry here and the augmentation family in training."""
    from ..heads.ssd import SSDHead

    return any(isinstance(head, SSDHead) for head in getattr(model, "heads", ()))


@dataclass(frozen=True)
class Placement:
    """Where an `img_w` x `img_h` image sits in the network input: resized size and offset."""

    img_w: int
    img_h: int
    new_w: int
    new_h: int
    dx: int
    dy: int


def placement(img_w: int, img_h: int, net_w: int, net_h: int, letterbox: bool = True) -> Placement:
    """Darknet's letterbox_image geometry, integer arithmetic and float32 comparison included.

    `if ((float)w/im.w < (float)h/im.h) { new_w = w; new_h = (im.h*w)/im.w; } else {...}` and
    the resized image is embedded at ((w-new_w)/2, (h-new_h)/2) with C integer division.
    Without letterbox the image is stretched to the whole input.
    """
    if not letterbox:
        return Placement(img_w, img_h, net_w, net_h, 0, 0)
    if np.float32(net_w) / np.float32(img_w) < np.float32(net_h) / np.float32(img_h):
        new_w, new_h = net_w, max(1, (img_h * net_w) // img_w)
    else:
        new_w, new_h = max(1, (img_w * net_h) // img_h), net_h
    return Placement(img_w, img_h, new_w, new_h, (net_w - new_w) // 2, (net_h - new_h) // 2)


@lru_cache(maxsize=64)
def _taps(src: int, dst: int, device: torch.device, last_edge: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of darknet's resize_image along one axis.

    Sample positions are `i * ((float)(src-1)/(dst-1))` in float32, truncated to an index plus
    a fraction. Columns (`last_edge=True`): the last output column copies the last input column.
    Rows: darknet only skips the second tap of the last row, so when float rounding puts that
    row at `src-2 + 0.99997` it keeps just `(1-dy)` of row `src-2` -- a nearly black bottom row
    for some sizes. It is darknet's behaviour, so it is reproduced (see the tests).
    Cached: every frame of a video reuses the same taps, already on the device.
    """
    scale = np.float32(src - 1) / np.float32(dst - 1) if dst > 1 else np.float32(0)
    pos = np.arange(dst, dtype=np.float32) * scale
    idx0 = np.minimum(pos.astype(np.int64), src - 1)
    frac = (pos - idx0.astype(np.float32)).astype(np.float32)
    w0 = (np.float32(1) - frac).astype(np.float32)
    w1 = frac.copy()
    if last_edge and (dst >= 1):
        idx0[-1], w0[-1], w1[-1] = src - 1, 1.0, 0.0
    elif dst >= 1:
        w1[-1] = 0.0
    if src == 1:
        w0[:], w1[:] = 1.0, 0.0
    idx1 = np.minimum(idx0 + 1, src - 1)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return tensor(idx0), tensor(idx1), tensor(w0), tensor(w1)


def resize_nhwc(x: torch.Tensor, new_w: int, new_h: int) -> torch.Tensor:
    """darknet's resize_image on a float (B, H, W, C) batch: horizontal pass, then vertical.

    Channels-last keeps both gathers contiguous (whole pixels, then whole rows), several times
    faster on the CPU than gathering along the last axis of NCHW.
    """
    _, h, w, _ = x.shape
    if (w, h) == (new_w, new_h):
        return x
    return _vertical_pass(_horizontal_pass(x, new_w, lambda t: t), new_h)


def resize_uint8_nhwc(frames: torch.Tensor, new_w: int, new_h: int) -> torch.Tensor:
    """resize_nhwc(to_float(frames)), the same values, without a full-size float copy: the
    horizontal gather reads the uint8 pixels (gathering commutes with the /255), so a
    20000x20000 photo costs two H x new_w float planes instead of 4.8 GB."""
    _, h, w, _ = frames.shape
    if (w, h) == (new_w, new_h):
        return to_float(frames)
    return _vertical_pass(_horizontal_pass(frames, new_w, to_float), new_h)


def _horizontal_pass(x: torch.Tensor, new_w: int, convert) -> torch.Tensor:
    c0, c1, cw0, cw1 = _taps(x.shape[2], new_w, x.device, last_edge=True)
    left, right = convert(x.index_select(2, c0)), convert(x.index_select(2, c1))
    return left * cw0.to(left.dtype).view(-1, 1) + right * cw1.to(left.dtype).view(-1, 1)


def _vertical_pass(part: torch.Tensor, new_h: int) -> torch.Tensor:
    r0, r1, rw0, rw1 = _taps(part.shape[1], new_h, part.device, last_edge=False)
    rw0 = rw0.to(part.dtype).view(-1, 1, 1)
    rw1 = rw1.to(part.dtype).view(-1, 1, 1)
    return part.index_select(1, r0) * rw0 + part.index_select(1, r1) * rw1


def darknet_resize(x: torch.Tensor, new_w: int, new_h: int) -> torch.Tensor:
    """darknet's resize_image on a float (B, C, H, W) batch (see resize_nhwc)."""
    return resize_nhwc(x.permute(0, 2, 3, 1), new_w, new_h).permute(0, 3, 1, 2).contiguous()


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 in [0, 1], same layout; darknet's `/255.` of its loader."""
    return frames.float().div_(255.0)


def letterbox_batch(images: Sequence[np.ndarray], net_size: tuple[int, int],
                    device: torch.device | str, letterbox: bool = True,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[Placement]]:
    """Upload BGR uint8 images and build the network input batch on `device`.

    Images of the same size (video frames) are uploaded and resized together. The arithmetic is
    float32 whatever `dtype` is; the batch is cast at the end (for --half).
    """
    net_w, net_h = net_size
    device = torch.device(device)
    batch = torch.full((len(images), 3, net_h, net_w), GRAY, dtype=torch.float32, device=device)
    places: list[Placement] = [placement(im.shape[1], im.shape[0], net_w, net_h, letterbox)
                               for im in images]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for indices in groups.values():
        stacked = np.stack([images[i] for i in indices]) if len(indices) > 1 else images[indices[0]][None]
        frames = torch.from_numpy(np.ascontiguousarray(stacked)).to(device, non_blocking=True)
        p = places[indices[0]]
        # BGR HWC -> RGB CHW as part of the one copy into the canvas (exact: resize is per channel)
        resized = resize_uint8_nhwc(frames, p.new_w, p.new_h).permute(0, 3, 1, 2).flip(1)
        index = torch.as_tensor(indices, device=device)
        if len(indices) == len(images):
            batch[:, :, p.dy:p.dy + p.new_h, p.dx:p.dx + p.new_w] = resized
        else:
            region = batch[:, :, p.dy:p.dy + p.new_h, p.dx:p.dx + p.new_w]
            region.index_copy_(0, index, resized)
    return batch.to(dtype), places


def correct_boxes(dets: torch.Tensor, place: Placement, net_size: tuple[int, int],
                  clip: bool = True) -> torch.Tensor:
    """Map (K, 6) x1, y1, x2, y2, score, class from input pixels to original-image pixels.

    darknet's correct_yolo_boxes: x = (x - (netw-new_w)/2./netw) / ((float)new_w/netw), relative,
    times the image width. The offset is the *float* half of the padding, as in darknet (the
    image itself was placed at the integer half). Boxes are clipped to the image like darknet's
    draw_detections and print_cocos do.
    """
    net_w, net_h = net_size
    out = dets.clone()
    pad_x = (net_w - place.new_w) / 2.0
    pad_y = (net_h - place.new_h) / 2.0
    out[:, [0, 2]] = (dets[:, [0, 2]] - pad_x) * (place.img_w / place.new_w)
    out[:, [1, 3]] = (dets[:, [1, 3]] - pad_y) * (place.img_h / place.new_h)
    if clip:
        out[:, [0, 2]] = out[:, [0, 2]].clamp(0, place.img_w)
        out[:, [1, 3]] = out[:, [1, 3]].clamp(0, place.img_h)
    return out
