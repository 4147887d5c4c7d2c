"""What every layer module shares: its darknet index, kind and where its inputs come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Shape = tuple[int, int, int]  # (c, h, w), darknet's out_c, out_h, out_w


@dataclass
class BuildContext:
    """What a layer builder may know: the previous output shape and every earlier one."""

    shapes: list[Shape]
    input_shape: Shape
    net: object  # detkit.cfg.Section for [net]

    @property
    def prev(self) -> Shape:
        return self.shapes[-1] if self.shapes else self.input_shape


class Layer(nn.Module):
    """Base of every layer. `sources` lists earlier layer indices read besides the previous one."""

    kind: str = "layer"

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.sources: list[int] = []

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        return in_shape

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:  # noqa: D401
        raise NotImplementedError

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        """(pjreddie FLOPs, AlexeyAB-only extra FLOPs) of this layer at these shapes."""
        return 0.0, 0.0

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        return self.kind
