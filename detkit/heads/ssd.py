"""[ssd] head: per-source 3x3 box and class predictors, prior boxes, decode, targets and loss.

The section names its source feature maps like [route] does (`layers=`) and holds the priors
and loss settings (docs/cfg-ssd.md). Its output is the raw (B, P, 4 + C + 1) predictions, box
offsets then class logits (background included), priors in the order of priors.generate_priors;
`decode` turns them into DESIGN.md's (B, P, 5 + C) and `loss` takes them as they are, so the
head sets `loss_uses_output` (the Model hands it its output, not its input).
"""

from __future__ import annotations

import torch
from torch import nn

from ..boxes import cxcywh_to_xyxy
from ..cfg import Section
from ..errors import DataError
from ..layers.base import BuildContext, Layer, Shape
from ..layers.simple import resolve_index
from ..registry import register
from .priors import PriorCache, parse_prior_spec
from .ssd_match import SSDTargets, build_targets, decode, multibox_loss


@register("ssd", extension=True)
class SSDHead(Layer):
    kind = "ssd"
    loss_uses_output = True

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        self.section = section
        raw = section.get_ints("layers")
        if not raw:
            raise section.error("'layers' is empty", "layers")
        self.sources = [resolve_index(section, "layers", r, index) for r in raw]
        self._read_settings(section)
        _, cfg_h, cfg_w = ctx.input_shape
        self.spec = parse_prior_spec(section, len(self.sources), (cfg_w, cfg_h))
        self.boxes_per_location = self.spec.boxes_per_location()
        self._source_shapes = [ctx.shapes[i] for i in self.sources]
        self.loc = nn.ModuleList()
        self.conf = nn.ModuleList()
        for (channels, _, _), boxes in zip(self._source_shapes, self.boxes_per_location, strict=True):
            self.loc.append(nn.Conv2d(channels, boxes * 4, 3, padding=1))
            self.conf.append(nn.Conv2d(channels, boxes * (self.classes + 1), 3, padding=1))
        self._xavier_init()
        self._priors = PriorCache(self.spec)
        self.last_grids: tuple[tuple[int, int], ...] | None = None

    def _read_settings(self, section: Section) -> None:
        self.classes = section.get_int("classes", 20)
        self.background = section.get_int("background", 0)
        self.variances = tuple(section.get_floats("variances", [0.1, 0.2]))
        self.iou_thresh = section.get_float("iou_thresh", 0.5)
        self.neg_pos = section.get_float("neg_pos", 3.0)
        self.score_thresh = section.get_float("score_thresh", 0.01)
        self.nms_thresh = section.get_float("nms_thresh", 0.45)
        self.topk = section.get_int("topk", 400)
        self.max_det = section.get_int("max_det", 200)
        if self.classes < 1:
            raise section.error("'classes' (without background) must be at least 1", "classes")
        if not 0 <= self.background <= self.classes:
            raise section.error(f"'background' must be a logit index in 0..{self.classes}",
                                "background")
        if len(self.variances) != 2 or min(self.variances) <= 0:
            raise section.error("'variances' needs two positive values (centre, size)", "variances")
        if not 0 < self.iou_thresh <= 1 or self.neg_pos < 0:
            raise section.error("need 0 < iou_thresh <= 1 and neg_pos >= 0")
        if self.topk < 1 or self.max_det < 1:
            raise section.error("'topk' and 'max_det' must be at least 1")

    def _xavier_init(self) -> None:
        """torchvision's SSDHead initialisation, so an untrained detkit SSD starts alike."""
        for conv in [*self.loc, *self.conf]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.constant_(conv.bias, 0.0)

    # -- graph ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        """(B, P, 4 + C + 1): box offsets, then class logits, location-major within each source.

        The feature-map sizes are remembered: priors depend on them and decode/loss see only the
        input size.
        """
        features = [outputs[i] for i in self.sources]
        self.last_grids = tuple((f.shape[2], f.shape[3]) for f in features)
        loc = torch.cat([_per_box(conv(f), 4) for conv, f in zip(self.loc, features, strict=True)], 1)
        conf = torch.cat([_per_box(conv(f), self.classes + 1)
                          for conv, f in zip(self.conf, features, strict=True)], 1)
        return torch.cat([loc, conf], 2)

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        """(4 + C + 1, P, 1). Also keeps the source shapes for flops() at this input size."""
        self._source_shapes = [shapes[i] for i in self.sources]
        priors = sum(h * w * boxes for (_, h, w), boxes
                     in zip(self._source_shapes, self.boxes_per_location, strict=True))
        return (4 + self.classes + 1, priors, 1)

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        """The 3x3 predictors' FLOPs (2 x MACs) at the shapes of the last out_shape() call."""
        total = 0.0
        for (c, h, w), boxes in zip(self._source_shapes, self.boxes_per_location, strict=True):
            total += 2.0 * 9 * c * h * w * boxes * (4 + self.classes + 1)
        return total, 0.0

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        sources = ",".join(str(i) for i in self.sources)
        bflops = self.flops(in_shape, out_shape)[0] / 1e9
        return (f"ssd   {len(self.sources)} x 3x3 loc+conf  layers {sources}   ->  "
                f"{out_shape[1]} priors x {out_shape[0]}  {bflops:5.3f} BFLOPs")

    def darknet_tensors(self) -> list[torch.Tensor]:
        """Per source in `layers` order: loc bias, loc weight, conf bias, conf weight (OIHW).

        Darknet's own convolutional order (biases, then weights), source after source.
        """
        tensors: list[torch.Tensor] = []
        for loc, conf in zip(self.loc, self.conf, strict=True):
            tensors += [loc.bias, loc.weight, conf.bias, conf.weight]
        return tensors

    # -- priors, decode, targets, loss ---------------------------------------------------------

    def priors(self, net_hw: tuple[int, int], device: torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(P, 4) cx, cy, w, h normalised, for the feature sizes of the last forward()."""
        if self.last_grids is None:
            raise RuntimeError("the SSD head needs a forward pass before its priors are known")
        return self._priors.get(self.last_grids, net_hw, device or torch.device("cpu"), dtype)

    def decode(self, raw: torch.Tensor, net_hw: tuple[int, int]) -> torch.Tensor:
        """(B, P, 5 + C): cx, cy, w, h in input pixels, 1 - p(background), p(c) / (1 - p(bg)).

        Boxes are not clipped to the image (as [yolo] is not); ssd_postprocess clips.
        """
        priors = self.priors(net_hw, raw.device, raw.dtype)
        boxes = decode(raw[..., :4], priors, self.variances)
        boxes = boxes * raw.new_tensor([net_hw[1], net_hw[0], net_hw[1], net_hw[0]])
        objectness, probs = ssd_scores(raw[..., 4:], self.background)
        return torch.cat([boxes, objectness, probs], -1)

    def targets(self, targets: torch.Tensor, batch: int, net_hw: tuple[int, int],
                device: torch.device, dtype: torch.dtype = torch.float32) -> SSDTargets:
        """Match truth rows (image, class, cx, cy, w, h normalised) to the priors and encode them."""
        targets = targets.to(device)
        if targets.numel() and (targets[:, 1].min() < 0 or targets[:, 1].max() >= self.classes):
            raise DataError(f"target classes must be in 0..{self.classes - 1} (the [ssd] layer "
                            f"has classes={self.classes}), got {targets[:, 1].min():.0f}.."
                            f"{targets[:, 1].max():.0f}")
        priors = self.priors(net_hw, device, dtype)
        return build_targets(targets, batch, priors, self.iou_thresh, self.background, self.variances)

    # torchvision's normalisation: the loss is already a mean over the batch's positives, where
    # darknet heads sum over images; the trainer divides by the batch only for the latter.
    loss_is_batch_mean = True

    def loss(self, raw: torch.Tensor, targets: torch.Tensor, net_hw: tuple[int, int],
             seen: int = 0) -> dict[str, torch.Tensor]:
        """{"loc": Smooth L1, "cls": cross-entropy with hard negatives}, each / positives."""
        matched = self.targets(targets, raw.shape[0], net_hw, raw.device, raw.dtype)
        return multibox_loss(raw[..., :4], raw[..., 4:], matched, self.neg_pos)

    def postprocess(self, preds: torch.Tensor, image_size: tuple[int, int] | None = None
                    ) -> list[torch.Tensor]:
        """ssd_postprocess with this section's score_thresh, nms_thresh, topk and max_det."""
        return ssd_postprocess(preds, image_size, self.score_thresh, self.nms_thresh, self.topk,
                               self.max_det)


def _per_box(t: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, A*K, H, W) -> (B, H*W*A, K): torchvision's SSDScoringHead layout."""
    b, _, h, w = t.shape
    return t.view(b, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, columns)


def ssd_scores(logits: torch.Tensor, background: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(objectness (..., 1), class probabilities (..., C)) from logits with a background column.

    objectness = 1 - p(background) and class probability = p(c) / (1 - p(background)) are
    computed in log space (a softmax over the foreground logits), so they stay exact when
    p(background) rounds to 1; their product is p(c).
    """
    foreground = torch.cat([logits[..., :background], logits[..., background + 1:]], -1)
    lse_all = _logsumexp_last(logits)
    lse_fg = _logsumexp_last(foreground)
    return torch.exp(lse_fg - lse_all), torch.exp(foreground - lse_fg)


def _logsumexp_last(t: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis, kept. In an ONNX export it is spelt out (max, then the log
    of the shifted sum), as torch.logsumexp computes it: OpenVINO 2026.4 infers ONNX's
    ReduceLogSumExp(axes=[-1], keepdims=1) as a (1, 1, 1) tensor and refuses the SSD export."""
    if not torch.onnx.is_in_onnx_export():
        return torch.logsumexp(t, -1, keepdim=True)
    top = t.amax(-1, keepdim=True)
    return top + torch.log(torch.exp(t - top).sum(-1, keepdim=True))


def ssd_postprocess(preds: torch.Tensor, image_size: tuple[int, int] | None = None,
                    score_thresh: float = 0.01, nms_thresh: float = 0.45, topk: int = 400,
                    max_det: int = 200) -> list[torch.Tensor]:
    """torchvision's SSD postprocess_detections on detkit's (B, N, 5 + C) eval output.

    Per image and class: scores p(c) = objectness x class probability above `score_thresh`, the
    best `topk` of them; then NMS per class at `nms_thresh` and the best `max_det` per image.
    Boxes are clipped to `image_size` (w, h, input pixels) when given, as torchvision clips to
    the image. Returns per image (K, 6): x1, y1, x2, y2, score, class (0-based, no background),
    best first, the layout of detkit.postprocess.
    """
    from torchvision.ops import batched_nms  # lazy: torchvision's import slows CLI start-up

    batch, count, width = preds.shape
    classes = width - 5
    boxes = cxcywh_to_xyxy(preds[..., :4])
    if image_size is not None:
        limit = boxes.new_tensor([image_size[0], image_size[1], image_size[0], image_size[1]])
        boxes = torch.minimum(boxes.clamp(min=0), limit)
    scores = preds[..., 4:5] * preds[..., 5:]
    top_scores, top_index = scores.topk(min(topk, count), dim=1)
    image, rank, cls = (top_scores > score_thresh).nonzero(as_tuple=True)
    anchor = top_index[image, rank, cls]
    cand_boxes, cand_scores = boxes[image, anchor], top_scores[image, rank, cls]
    # float64: the per-group coordinate offsets batched_nms may use stay exact for big batches.
    keep = batched_nms(cand_boxes.double(), cand_scores.double(), image * classes + cls, nms_thresh)
    rows = torch.cat([cand_boxes[keep], cand_scores[keep, None], cls[keep, None].to(boxes.dtype)], 1)
    owner = image[keep]
    return [rows[owner == b][:max_det] for b in range(batch)]
