"""Layers without parameters: pooling, route, shortcut, upsample, reorg, dropout, softmax, cost."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cfg import Section
from ..registry import register
from .activations import Activation
from .base import BuildContext, Layer, Shape
from .conv import parse_activation


def resolve_index(section: Section, key: str, raw: int, index: int) -> int:
    """Darknet's rule: a negative index is relative to the current layer."""
    resolved = index + raw if raw < 0 else raw
    if not 0 <= resolved < index:
        raise section.error(
            f"'{key}' refers to layer {raw} (resolved {resolved}), which is not an earlier layer "
            f"of this network (valid: 0..{index - 1} or -1..-{index})", key)
    return resolved


@register("maxpool")
class MaxPool(Layer):
    """Darknet maxpool: total padding size-1 by default, window starting at -padding/2."""

    kind = "max"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.stride = section.get_int("stride", 1)
        self.size = section.get_int("size", self.stride)
        self.padding = section.get_int("padding", self.size - 1)
        if self.size < 1 or self.stride < 1:
            raise section.error("size and stride must be at least 1")

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        p = self.padding
        if p:
            x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        c, h, w = in_shape
        return (c, (h + self.padding - self.size) // self.stride + 1,
                (w + self.padding - self.size) // self.stride + 1)

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        c, h, w = out_shape
        return 0.0, float(self.size * self.size * c * h * w)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        oc, oh, ow = out_shape
        return (f"max          {self.size} x {self.size} / {self.stride}  {w:4d} x{h:4d} x{c:4d}"
                f"   ->  {ow:4d} x{oh:4d} x{oc:4d}")


@register("avgpool")
class AvgPool(Layer):
    kind = "avg"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        return (in_shape[0], 1, 1)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        return f"avg                     {w:4d} x{h:4d} x{c:4d}   ->  {c:4d}"


@register("route")
class Route(Layer):
    """Channel concat of earlier outputs; AlexeyAB's groups/group_id take a channel slice of each."""

    kind = "route"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        raw = section.get_ints("layers")
        if not raw:
            raise section.error("'layers' is empty", "layers")
        self.sources = [resolve_index(section, "layers", r, index) for r in raw]
        self.groups = section.get_int("groups", 1)
        self.group_id = section.get_int("group_id", 0)
        if not 0 <= self.group_id < self.groups:
            raise section.error(f"group_id={self.group_id} is not in 0..groups-1", "group_id")
        self.section = section

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        parts = [self._slice(outputs[i]) for i in self.sources]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return t
        part = t.shape[1] // self.groups
        return t[:, self.group_id * part:(self.group_id + 1) * part]

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        first = shapes[self.sources[0]]
        for i in self.sources[1:]:
            if shapes[i][1:] != first[1:]:
                raise self.section.error(
                    f"layers {self.sources[0]} ({first[2]}x{first[1]}) and {i} "
                    f"({shapes[i][2]}x{shapes[i][1]}) have different sizes and cannot be concatenated",
                    "layers")
        return (sum(shapes[i][0] // self.groups for i in self.sources), first[1], first[2])

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        return "route " + "".join(f" {i}" for i in self.sources)


@register("shortcut")
class Shortcut(Layer):
    """out = act(alpha*prev + beta*from), darknet's shortcut_cpu including the size-mismatch case."""

    kind = "res"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        raw = section.get_ints("from")
        if len(raw) != 1:
            raise section.error("shortcut 'from' with several layers is not supported", "from")
        self.sources = [resolve_index(section, "from", raw[0], index)]
        self.alpha = section.get_float("alpha", 1.0)
        self.beta = section.get_float("beta", 1.0)
        weights_type = section.get_str("weights_type", "none")
        if weights_type != "none":
            raise section.error(f"weights_type={weights_type} is not supported", "weights_type")
        self.act = Activation(parse_activation(section, "linear"))

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        add = outputs[self.sources[0]]
        if add.shape == x.shape:
            out = x + add if self.alpha == 1 and self.beta == 1 else self.alpha * x + self.beta * add
        else:
            out = self._mismatched(x, add)
        return self.act(out)

    def _mismatched(self, x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        # shortcut_cpu: sample the larger map with a stride, add into the overlapping channels.
        w1, w2 = add.shape[3], x.shape[3]
        stride, sample = max(1, w1 // w2), max(1, w2 // w1)
        c = min(add.shape[1], x.shape[1])
        minh, minw = min(add.shape[2], x.shape[2]), min(w1, w2)
        out = self.alpha * x
        src = add[:, :c, ::stride, ::stride][:, :, :minh, :minw]
        out[:, :c, ::sample, ::sample][:, :, :src.shape[2], :src.shape[3]] += self.beta * src
        return out

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        c, h, w = out_shape
        return 0.0, float(c * h * w)  # AlexeyAB: out_w*out_h*out_c*n, n = number of 'from' layers

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        oc, oh, ow = out_shape
        return (f"res  {self.sources[0]:3d}                {w:4d} x{h:4d} x{c:4d}   ->  "
                f"{ow:4d} x{oh:4d} x{oc:4d}")


@register("upsample")
class Upsample(Layer):
    kind = "upsample"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.stride = section.get_int("stride", 2)
        self.scale = section.get_float("scale", 1.0)
        if self.stride < 1:
            raise section.error("a negative upsample stride (downsampling) is not supported", "stride")

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        out = x.repeat_interleave(self.stride, 2).repeat_interleave(self.stride, 3) \
            if self.stride > 1 else x
        return out * self.scale if self.scale != 1 else out

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        c, h, w = in_shape
        return (c, h * self.stride, w * self.stride)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        oc, oh, ow = out_shape
        return (f"upsample           {self.stride:2d}x  {w:4d} x{h:4d} x{c:4d}   ->  "
                f"{ow:4d} x{oh:4d} x{oc:4d}")


@register("reorg")
class Reorg(Layer):
    """pjreddie's reorg: reorg_cpu called with forward=0 on the input dims. Not space-to-depth."""

    kind = "reorg"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.stride = section.get_int("stride", 1)
        for flag in ("reverse", "flatten", "extra"):
            if section.get_int(flag, 0):
                raise section.error(f"reorg '{flag}=1' is not supported", flag)
        c, h, w = ctx.prev
        s = self.stride
        if s < 1 or h % s or w % s or c % (s * s):
            raise section.error(
                f"reorg stride {s} needs height and width divisible by {s} and channels by {s * s}"
                f" (input {w}x{h}x{c})", "stride")

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.stride
        return (x.reshape(b, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4)
                .reshape(b, c * s * s, h // s, w // s))

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        c, h, w = in_shape
        s = self.stride
        return (c * s * s, h // s, w // s)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        oc, oh, ow = out_shape
        return (f"reorg              / {self.stride}  {w:4d} x{h:4d} x{c:4d}   ->  "
                f"{ow:4d} x{oh:4d} x{oc:4d}")


@register("dropout")
class Dropout(Layer):
    kind = "dropout"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.probability = section.get_float("probability", 0.5)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        return F.dropout(x, self.probability, self.training)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        n = in_shape[0] * in_shape[1] * in_shape[2]
        return f"dropout       p = {self.probability:.2f}               {n:4d}  ->  {n:4d}"


@register("softmax")
class Softmax(Layer):
    """Softmax over contiguous groups of the flattened (C,H,W) output, as softmax_cpu does."""

    kind = "softmax"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.groups = section.get_int("groups", 1)
        self.temperature = section.get_float("temperature", 1.0)
        if section.get_int("spatial", 0) or section.has("tree"):
            raise section.error("spatial and tree softmax are not supported")
        section.get_int("noloss", 0)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        b = x.shape[0]
        flat = x.reshape(b, self.groups, -1) / self.temperature
        return torch.softmax(flat, dim=2).reshape(x.shape)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        n = in_shape[0] * in_shape[1] * in_shape[2]
        return f"softmax                                        {n:4d}"


@register("cost")
class Cost(Layer):
    """Training-only cost: identity at inference, like darknet's copy of the input."""

    kind = "cost"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        for key in ("type", "scale", "ratio", "noobj", "thresh"):
            section.used.add(key)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        return x

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        n = in_shape[0] * in_shape[1] * in_shape[2]
        return f"cost                                           {n:4d}"
