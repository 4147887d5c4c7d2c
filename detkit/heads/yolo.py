"""[yolo] (YOLOv3) head: darknet's activation and decode; targets and loss in yolo_loss.py."""

from __future__ import annotations

import torch

from ..cfg import Section
from ..layers.base import BuildContext, Layer, Shape
from ..registry import register
from .common import anchor_pairs, flatten_predictions, grid_offsets, init_objectness_bias
from .yolo_loss import IOU_LOSSES, yolo_loss


@register("yolo")
class YoloHead(Layer):
    """Anchors are in input pixels; `mask` picks this layer's anchors out of all `num`."""

    kind = "yolo"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.section = section
        self.classes = section.get_int("classes", 20)
        self.total_anchors = section.get_int("num", 1)
        self.mask = section.get_ints("mask", list(range(self.total_anchors)))
        all_anchors = anchor_pairs(section)
        if len(all_anchors) < self.total_anchors:
            raise section.error(
                f"num={self.total_anchors} but only {len(all_anchors)} anchor pairs are given", "anchors")
        if any(not 0 <= m < self.total_anchors for m in self.mask):
            raise section.error(f"mask {self.mask} refers to anchors outside 0..num-1", "mask")
        self.all_anchors = all_anchors[: self.total_anchors]
        self.jitter = section.get_float("jitter", 0.2)
        self.ignore_thresh = section.get_float("ignore_thresh", 0.5)
        self.truth_thresh = section.get_float("truth_thresh", 1.0)
        self.random = section.get_int("random", 0)
        self.max_boxes = section.get_int("max", 90)
        self.scale_x_y = section.get_float("scale_x_y", 1.0)
        self._read_alexeyab_loss_keys(section)
        if section.has("map"):
            raise section.error("'map' (class remapping) is not supported", "map")
        if section.get_int("new_coords", 0):
            raise section.error("'new_coords=1' (scaled-YOLOv4) is not supported", "new_coords")
        expected = len(self.mask) * (self.classes + 5)
        if ctx.prev[0] != expected:
            raise section.error(
                f"the previous layer has {ctx.prev[0]} filters but len(mask)*(classes+5) = "
                f"{len(self.mask)}*({self.classes}+5) = {expected}", "classes")
        anchors = torch.tensor([self.all_anchors[m] for m in self.mask], dtype=torch.float32)
        self.register_buffer("anchors", anchors, persistent=False)

    def _read_alexeyab_loss_keys(self, section: Section) -> None:
        """AlexeyAB's loss keys (yolov4 cfgs). Their defaults keep pjreddie's loss exactly, so a
        cfg without them trains as the reference darknet does (AlexeyAB's own iou_normalizer
        default is 0.75; here it is 1 unless the cfg says otherwise)."""
        self.iou_loss = section.get_str("iou_loss", "mse").lower()
        if self.iou_loss not in IOU_LOSSES:
            raise section.error(f"iou_loss={self.iou_loss} is not one of {', '.join(IOU_LOSSES)}",
                                "iou_loss")
        self.iou_normalizer = section.get_float("iou_normalizer", 1.0)
        self.obj_normalizer = section.get_float("obj_normalizer", 1.0)
        self.cls_normalizer = section.get_float("cls_normalizer", 1.0)
        self.iou_thresh = section.get_float("iou_thresh", 1.0)

    @property
    def num_anchors(self) -> int:
        return len(self.mask)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        """Darknet's l.output: logistic on x, y, objectness and classes; w, h stay raw."""
        b, _, h, w = x.shape
        p = x.view(b, self.num_anchors, self.classes + 5, h, w)
        xy = torch.sigmoid(p[:, :, 0:2])
        if self.scale_x_y != 1.0:
            xy = xy * self.scale_x_y - (self.scale_x_y - 1) / 2
        out = torch.cat([xy, p[:, :, 2:4], torch.sigmoid(p[:, :, 4:])], 2)
        return out.view(b, -1, h, w)

    def decode(self, activated: torch.Tensor, net_hw: tuple[int, int]) -> torch.Tensor:
        """(B, A*H*W, 5+C): cx, cy, w, h in input pixels, objectness, class probabilities."""
        b, _, h, w = activated.shape
        p = activated.view(b, self.num_anchors, self.classes + 5, h, w)
        cols, rows = grid_offsets(h, w, p.device, p.dtype)
        anchors = self.anchors.to(p.dtype)
        cx = (p[:, :, 0] + cols) * (net_hw[1] / w)
        cy = (p[:, :, 1] + rows) * (net_hw[0] / h)
        bw = torch.exp(p[:, :, 2]) * anchors[:, 0].view(1, -1, 1, 1)
        bh = torch.exp(p[:, :, 3]) * anchors[:, 1].view(1, -1, 1, 1)
        boxes = torch.stack([cx, cy, bw, bh], 2)
        return flatten_predictions(torch.cat([boxes, p[:, :, 4:]], 2))

    def loss(self, raw: torch.Tensor, targets: torch.Tensor | None, net_hw: tuple[int, int],
             seen: int = 0) -> dict[str, torch.Tensor]:
        """Darknet's [yolo] loss parts (xy, wh, obj, noobj, cls) on this layer's input logits.

        `targets` rows are image_index, class, cx, cy, w, h (normalised); `seen` is unused by
        [yolo] and accepted so every head has the same signature. See heads/yolo_loss.py.
        """
        return yolo_loss(self, raw, targets, net_hw)

    def init_prior_biases(self, bias: torch.Tensor, cells: int) -> None:
        """Prior objectness for the fresh convolution feeding this layer (see common.py)."""
        init_objectness_bias(bias, self.num_anchors, cells)

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        return "yolo"
