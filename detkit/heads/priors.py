"""SSD prior (default) boxes, with torchvision's DefaultBoxGenerator arithmetic.

torchvision is the reference (DESIGN.md), so the boxes are computed with the same float32 and
Python-double steps it uses: the same cfg gives bit-identical priors. A cfg may give the box sizes
three ways (see docs/cfg-ssd.md): torchvision's relative `scales`, Caffe SSD's `min_sizes` /
`max_sizes` in pixels, or torchvision's `min_ratio` / `max_ratio` formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cfg import Section

GridSizes = tuple[tuple[int, int], ...]  # (h, w) of every source feature map


@dataclass(frozen=True)
class PriorSpec:
    """Everything the priors depend on besides the input and feature-map sizes.

    Per source k the two square boxes have sides `min_scales[k]` and sqrt(min_scales[k] *
    max_scales[k]) (torchvision: max_scales[k] = scales[k+1]), in units of the input width;
    `height_ratio` (cfg width / cfg height) turns them into height units, which is 1 except for
    pixel sizes on a non-square cfg. `steps` are in input pixels; None places
    the centres on the feature grid (torchvision's steps=None).
    """

    aspect_ratios: tuple[tuple[float, ...], ...]
    min_scales: tuple[float, ...]
    max_scales: tuple[float, ...]
    steps: tuple[float, ...] | None = None
    clip: bool = True
    height_ratio: float = 1.0

    @property
    def num_sources(self) -> int:
        return len(self.aspect_ratios)

    def boxes_per_location(self) -> list[int]:
        """Two squares plus a (w, h) and (h, w) pair for every aspect ratio."""
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]


def wh_pairs(spec: PriorSpec) -> list[torch.Tensor]:
    """Per source, the (A, 2) normalised widths and heights in torchvision's order."""
    pairs = []
    for k, ratios in enumerate(spec.aspect_ratios):
        s_k = spec.min_scales[k]
        s_prime = math.sqrt(spec.min_scales[k] * spec.max_scales[k])
        rows = [[s_k, s_k], [s_prime, s_prime]]
        for ar in ratios:
            root = math.sqrt(ar)
            rows.extend([[s_k * root, s_k / root], [s_k / root, s_k * root]])
        wh = torch.as_tensor(rows, dtype=torch.float32)
        if spec.height_ratio != 1.0:
            wh[:, 1] *= spec.height_ratio
        pairs.append(wh)
    return pairs


def generate_priors(spec: PriorSpec, grids: GridSizes, image_hw: tuple[int, int]) -> torch.Tensor:
    """(P, 4) priors cx, cy, w, h normalised to the input, location-major, boxes within.

    The order (feature map, row, column, box) is the order of the head's predictions.
    """
    if len(grids) != spec.num_sources:
        raise ValueError(f"{len(grids)} feature maps for {spec.num_sources} prior sources")
    boxes = []
    for k, (wh, (f_h, f_w)) in enumerate(zip(wh_pairs(spec), grids, strict=True)):
        if spec.steps is not None:
            x_f, y_f = image_hw[1] / spec.steps[k], image_hw[0] / spec.steps[k]
        else:
            x_f, y_f = f_w, f_h
        shifts_x = ((torch.arange(0, f_w) + 0.5) / x_f).to(torch.float32)
        shifts_y = ((torch.arange(0, f_h) + 0.5) / y_f).to(torch.float32)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        centres = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)) * len(wh), dim=-1)
        sizes = wh.clamp(min=0, max=1) if spec.clip else wh
        boxes.append(torch.cat((centres.reshape(-1, 2), sizes.repeat(f_h * f_w, 1)), dim=1))
    return torch.cat(boxes, dim=0)


def parse_aspect_ratios(section: Section, sources: int) -> tuple[tuple[float, ...], ...]:
    """`aspect_ratios=2;2,3;2,3` -> one group per source, ';' between groups.

    A single group applies to every source. Ratios are given >= 1; each adds the box and its
    transpose (Caffe's flip=true, torchvision's only behaviour).
    """
    text = section.get_str("aspect_ratios", "2")
    try:
        groups = [tuple(float(v) for v in group.split(",") if v) for group in text.split(";")]
    except ValueError:
        raise section.error(f"'aspect_ratios={text}' is not ';'-separated lists of numbers",
                            "aspect_ratios") from None
    if len(groups) == 1:
        groups = groups * sources
    if len(groups) != sources:
        raise section.error(f"'aspect_ratios' has {len(groups)} groups for {sources} source layers",
                            "aspect_ratios")
    if any(ar <= 0 for group in groups for ar in group):
        raise section.error("aspect ratios must be positive", "aspect_ratios")
    return tuple(groups)


Scales = tuple[tuple[float, ...], tuple[float, ...], float]  # min, max, height ratio


def parse_scales(section: Section, sources: int, cfg_wh: tuple[int, int]) -> Scales:
    """Min and max scales (input-width units) and the height ratio, from the keys the cfg has."""
    given = [key for key in ("scales", "min_sizes", "min_ratio") if section.has(key)]
    if len(given) > 1:
        raise section.error(f"give only one of scales, min_sizes/max_sizes, min_ratio/max_ratio "
                            f"(found {', '.join(given)})", given[1])
    if section.has("min_sizes"):
        return _pixel_scales(section, sources, cfg_wh)
    if section.has("scales"):
        scales = section.get_floats("scales")
        if len(scales) != sources + 1:
            raise section.error(f"'scales' needs {sources + 1} values (one per source layer plus "
                                f"the last box's upper scale), got {len(scales)}", "scales")
    else:
        scales = _ratio_scales(section, sources)
    return tuple(scales[:-1]), tuple(scales[1:]), 1.0


def _pixel_scales(section: Section, sources: int, cfg_wh: tuple[int, int]) -> Scales:
    """Caffe SSD: squares of min_sizes[k] and sqrt(min_sizes[k] * max_sizes[k]) cfg pixels."""
    mins = section.get_floats("min_sizes")
    maxs = section.get_floats("max_sizes")
    if len(mins) != sources or len(maxs) != sources:
        raise section.error(f"'min_sizes' and 'max_sizes' need {sources} values each (one per "
                            f"source layer), got {len(mins)} and {len(maxs)}", "min_sizes")
    width, height = cfg_wh
    return tuple(v / width for v in mins), tuple(v / width for v in maxs), width / height


def _ratio_scales(section: Section, sources: int) -> list[float]:
    """torchvision's formula: evenly spaced from min_ratio to max_ratio, then 1.0."""
    low = section.get_float("min_ratio", 0.15)
    high = section.get_float("max_ratio", 0.9)
    if sources == 1:
        return [low, high]
    return [low + (high - low) * k / (sources - 1.0) for k in range(sources)] + [1.0]


def parse_prior_spec(section: Section, sources: int, cfg_wh: tuple[int, int]) -> PriorSpec:
    """The prior-box keys of an [ssd] section."""
    ratios = parse_aspect_ratios(section, sources)
    mins, maxs, height_ratio = parse_scales(section, sources, cfg_wh)
    if min(mins + maxs) <= 0:
        raise section.error("prior scales and sizes must be positive")
    steps = section.get_floats("steps") if section.has("steps") else None
    if steps is not None and (len(steps) != sources or min(steps) <= 0):
        raise section.error(f"'steps' needs {sources} positive values (pixels per feature-map "
                            f"cell, one per source layer)", "steps")
    clip = bool(section.get_int("clip", 1))
    return PriorSpec(ratios, mins, maxs, tuple(steps) if steps else None, clip, height_ratio)


class PriorCache:
    """Priors computed once per (input size, feature-map sizes, device, dtype) and kept there.

    Training at several input sizes keeps a few entries; the cache is bounded so a long run over
    many sizes does not grow without end.
    """

    def __init__(self, spec: PriorSpec, max_entries: int = 16) -> None:
        self.spec = spec
        self.max_entries = max_entries
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, grids: GridSizes, image_hw: tuple[int, int], device: torch.device,
            dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(grids), tuple(image_hw), str(device), dtype)
        priors = self._store.get(key)
        if priors is None:
            if len(self._store) >= self.max_entries:
                self._store.clear()
            priors = generate_priors(self.spec, grids, image_hw).to(device=device, dtype=dtype)
            self._store[key] = priors
        return priors
