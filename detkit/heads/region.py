"""[region] (YOLOv2) head: darknet's activation and decode. Anchors are in grid-cell units."""

from __future__ import annotations

import torch

from ..cfg import Section
from ..layers.base import BuildContext, Layer, Shape
from ..registry import register
from .common import anchor_pairs, flatten_predictions, grid_offsets, init_objectness_bias
from .region_loss import region_loss

# Parsed by darknet but never used by it; read so they raise no "unused" warning.
_IGNORED_KEYS = ("absolute", "classfix", "log", "sqrt", "mask_scale")


@register("region")
class RegionHead(Layer):
    kind = "detection"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.section = section
        self.coords = section.get_int("coords", 4)
        self.classes = section.get_int("classes", 20)
        self.num_anchors = section.get_int("num", 1)
        self.softmax = bool(section.get_int("softmax", 0))
        self.jitter = section.get_float("jitter", 0.2)
        self.rescore = bool(section.get_int("rescore", 0))
        self.thresh = section.get_float("thresh", 0.5)
        self.random = section.get_int("random", 0)
        self.coord_scale = section.get_float("coord_scale", 1.0)
        self.object_scale = section.get_float("object_scale", 1.0)
        self.noobject_scale = section.get_float("noobject_scale", 1.0)
        self.class_scale = section.get_float("class_scale", 1.0)
        self.bias_match = bool(section.get_int("bias_match", 0))
        self.max_boxes = section.get_int("max", 30)
        for key in _IGNORED_KEYS:
            section.used.add(key)
        self._reject_unsupported(section)
        anchors = anchor_pairs(section)
        if len(anchors) < self.num_anchors:
            raise section.error(
                f"num={self.num_anchors} but only {len(anchors)} anchor pairs are given", "anchors")
        expected = self.num_anchors * (self.classes + self.coords + 1)
        if ctx.prev[0] != expected:
            raise section.error(
                f"the previous layer has {ctx.prev[0]} filters but num*(classes+coords+1) = "
                f"{self.num_anchors}*({self.classes}+{self.coords}+1) = {expected}", "classes")
        self.register_buffer("anchors", torch.tensor(anchors[: self.num_anchors]), persistent=False)

    def _reject_unsupported(self, section: Section) -> None:
        if section.has("tree"):
            raise section.error("the softmax tree (yolo9000) is not supported", "tree")
        if section.has("map"):
            raise section.error("'map' (class remapping) is not supported", "map")
        if self.coords != 4:
            raise section.error(f"coords={self.coords} is not supported (only 4)", "coords")
        if section.get_int("background", 0):
            raise section.error("'background=1' is not supported", "background")

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        """Darknet's l.output: logistic on x, y, objectness; softmax (or logistic) on classes."""
        b, _, h, w = x.shape
        p = x.view(b, self.num_anchors, self.classes + 5, h, w)
        cls = torch.softmax(p[:, :, 5:], 2) if self.softmax else torch.sigmoid(p[:, :, 5:])
        out = torch.cat([torch.sigmoid(p[:, :, 0:2]), p[:, :, 2:4], torch.sigmoid(p[:, :, 4:5]), cls], 2)
        return out.view(b, -1, h, w)

    def decode(self, activated: torch.Tensor, net_hw: tuple[int, int]) -> torch.Tensor:
        """(B, A*H*W, 5+C) in input pixels; darknet's get_region_box times the network size."""
        b, _, h, w = activated.shape
        p = activated.view(b, self.num_anchors, self.classes + 5, h, w)
        cols, rows = grid_offsets(h, w, p.device, p.dtype)
        anchors = self.anchors.to(p.dtype)
        stride_x, stride_y = net_hw[1] / w, net_hw[0] / h
        cx = (p[:, :, 0] + cols) * stride_x
        cy = (p[:, :, 1] + rows) * stride_y
        bw = torch.exp(p[:, :, 2]) * anchors[:, 0].view(1, -1, 1, 1) * stride_x
        bh = torch.exp(p[:, :, 3]) * anchors[:, 1].view(1, -1, 1, 1) * stride_y
        boxes = torch.stack([cx, cy, bw, bh], 2)
        return flatten_predictions(torch.cat([boxes, p[:, :, 4:]], 2))

    def loss(self, raw: torch.Tensor, targets: torch.Tensor | None, net_hw: tuple[int, int],
             seen: int = 0) -> dict[str, torch.Tensor]:
        """Darknet's [region] loss parts (xy, wh, obj, noobj, cls) on this layer's input logits.

        `seen` is darknet's *net->seen for this forward (the prior pull stops at 12,800 images);
        anchors are in grid cells, so the network size is not needed. See heads/region_loss.py.
        """
        return region_loss(self, raw, targets, seen)

    def init_prior_biases(self, bias: torch.Tensor, cells: int) -> None:
        """Prior objectness for the fresh convolution feeding this layer (see common.py)."""
        init_objectness_bias(bias, self.num_anchors, cells)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        return "detection"
