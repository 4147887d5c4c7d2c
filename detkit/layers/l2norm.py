"""[l2norm]: SSD's L2 normalisation with a learnable per-channel scale (on VGG's conv4_3).

conv4_3's activations are far larger than those of the later maps the head also reads; SSD
normalises each position's channel vector to unit length and rescales it by a learned factor
per channel, 20 at the start (Liu et al., ParseNet). Computed as torchvision's
SSDFeatureExtractorVGG does: scale * F.normalize(x), x / max(||x||, eps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cfg import Section
from ..registry import register
from .base import BuildContext, Layer, Shape


@register("l2norm", extension=True)
class L2Norm(Layer):
    kind = "l2norm"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.section = section
        channels = ctx.prev[0]
        self.init_scale = section.get_float("scale", 20.0)
        self.eps = section.get_float("eps", 1e-12)
        if self.eps <= 0:
            raise section.error("'eps' must be positive", "eps")
        self.weight = nn.Parameter(torch.full((channels,), self.init_scale))

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1, eps=self.eps)

    def darknet_tensors(self) -> list[torch.Tensor]:
        """The per-channel scales: one array of `channels` floats in .weights."""
        return [self.weight]

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        return (f"l2norm  scale {self.init_scale:<6g}      {w:4d} x{h:4d} x{c:4d}   ->  "
                f"{w:4d} x{h:4d} x{c:4d}")
