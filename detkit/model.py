"""The layer graph built from a cfg: one module per section, darknet's layer numbering."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import heads as _registers_heads  # noqa: F401  (importing them registers every builder)
from . import layers as _registers_layers  # noqa: F401
from .cfg import DARKNET_SECTIONS, Section, parse_cfg, parse_cfg_text, warn_unused
from .errors import CfgError
from .layers import BuildContext, Layer, Shape
from .registry import builder_for

# [net] keys darknet reads for training and augmentation; read here so they never warn.
# AlexeyAB's cutmix and mixup are not implemented and left out: they warn as unused fields.
NET_KEYS = {
    "batch", "subdivisions", "learning_rate", "momentum", "decay", "width", "height", "channels",
    "inputs", "policy", "burn_in", "power", "step", "scale", "steps", "scales", "gamma",
    "max_batches", "angle", "aspect", "saturation", "exposure", "hue", "adam", "B1", "B2", "eps",
    "max_crop", "min_crop", "time_steps", "notruth", "random", "center", "letter_box", "flip",
    "mosaic", "resize_step", "tree", "max_chart_loss", "mean", "std",
    "channel_order", "input_scale", "rot90", "random_scale",
}


class Model(nn.Module):
    """A darknet network as a PyTorch module. See DESIGN.md for the public contract."""

    def __init__(self, sections: list[Section]) -> None:
        super().__init__()
        self.sections = sections
        self.net = sections[0]
        width = self.net.get_int("width", 0)
        height = self.net.get_int("height", 0)
        channels = self.net.get_int("channels", 0)
        if width <= 0 or height <= 0 or channels <= 0:
            raise self.net.error("[net] needs positive width, height and channels")
        self.input_size = (width, height)
        self.input_channels = channels
        self._parse_input_normalisation()
        for key in NET_KEYS:
            self.net.used.add(key)
        self.seen = 0  # images seen in training; darknet's *net->seen (region warm-up uses it)
        self.layers = nn.ModuleList()
        self._build(sections[1:])
        self._keep = self._needed_later()
        self._release = self._release_schedule()
        heads = [layer for layer in self.layers if hasattr(layer, "decode")]
        self.num_classes = heads[-1].classes if heads else 0
        self.head_indices = [layer.index for layer in heads]

    def _parse_input_normalisation(self) -> None:
        """detkit [net] keys for nets trained on other input conventions (VGG16-SSD: 0-255, mean).

        The public input is always RGB in [0, 1]; the net sees flip (channel_order=bgr), then
        x * input_scale, then (x - mean) / std. Darknet nets leave all of them at the identity.
        """
        order = self.net.get_str("channel_order", "rgb").lower()
        if order not in ("rgb", "bgr"):
            raise self.net.error(f"channel_order={order} must be rgb or bgr", "channel_order")
        self.flip_channels = order == "bgr"
        self.input_scale = self.net.get_float("input_scale", 1.0)
        mean = self.net.get_floats("mean", [0.0] * self.input_channels)
        std = self.net.get_floats("std", [1.0] * self.input_channels)
        for key, values in (("mean", mean), ("std", std)):
            if len(values) != self.input_channels:
                raise self.net.error(f"'{key}' needs {self.input_channels} values", key)
        if min(std) <= 0:
            raise self.net.error("'std' values must be positive", "std")
        self.normalises = self.flip_channels or self.input_scale != 1.0 or any(mean) or std != [1.0] * len(std)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalises:
            return x
        if self.flip_channels:
            x = x.flip(1)
        return (x * self.input_scale - self.input_mean) / self.input_std

    def _build(self, sections: list[Section]) -> None:
        check_sections(sections)
        ctx = BuildContext(shapes=[], input_shape=(self.input_channels, self.input_size[1],
                                                   self.input_size[0]), net=self.net)
        for index, section in enumerate(sections):
            layer = builder_for(section.kind)(index, section, ctx)
            shape = layer.out_shape(ctx.prev, ctx.shapes)
            if min(shape) <= 0:
                raise section.error(f"output size {shape[2]}x{shape[1]}x{shape[0]} is empty "
                                    f"for input {ctx.prev[2]}x{ctx.prev[1]}x{ctx.prev[0]}")
            ctx.shapes.append(shape)
            self.layers.append(layer)
        self.shapes_at_cfg_size: list[Shape] = list(ctx.shapes)

    def _needed_later(self) -> set[int]:
        return {src for layer in self.layers for src in layer.sources}

    def _release_schedule(self) -> dict[int, list[int]]:
        """After layer i runs, the kept outputs nobody reads any more (their last reader is i)."""
        last_reader: dict[int, int] = {}
        for layer in self.layers:
            for src in layer.sources:
                last_reader[src] = max(last_reader.get(src, -1), layer.index)
        schedule: dict[int, list[int]] = {}
        for src, reader in last_reader.items():
            schedule.setdefault(reader, []).append(src)
        return schedule

    @property
    def heads(self) -> list[Layer]:
        return [self.layers[i] for i in self.head_indices]

    def init_head_biases(self, fresh_layers: set[int]) -> list[int]:
        """Prior objectness on each head's input convolution where that convolution is fresh
        (not loaded from pretrained weights); the layer indices it set. Heads without
        `init_prior_biases` (SSD) keep their init."""
        from .layers.conv import Convolutional

        shapes = self.shapes()
        primed = []
        for head in self.heads:
            conv = self.layers[head.index - 1]
            if (conv.index in fresh_layers and isinstance(conv, Convolutional) and conv.conv.bias is not None
                    and hasattr(head, "init_prior_biases")):
                _, h, w = shapes[head.index][0]
                head.init_prior_biases(conv.conv.bias, h * w)
                primed.append(conv.index)
        return primed

    def shapes(self, size: tuple[int, int] | None = None) -> list[tuple[Shape, Shape]]:
        """(input, output) shape of every layer at an input size (w, h); cfg size by default."""
        w, h = size or self.input_size
        prev: Shape = (self.input_channels, h, w)
        outs: list[Shape] = []
        pairs = []
        for layer in self.layers:
            out = layer.out_shape(prev, outs)
            if min(out) <= 0:
                raise CfgError(f"layer {layer.index} ({layer.kind}) has an empty output at input "
                               f"size {w}x{h}")
            pairs.append((prev, out))
            outs.append(out)
            prev = out
        return pairs

    def activation_bytes(self, size: tuple[int, int] | None = None, batch: int = 1,
                         training: bool = False, element_bytes: int = 4) -> int:
        """Estimated activation memory of one pass at input size (w, h): for inference the
        largest layer's input plus output and every output kept for a later route, shortcut or
        head; for training every output twice (kept for backward, and its gradient). Shape
        arithmetic only, so it is safe to call for absurd sizes before allocating anything."""
        pairs = self.shapes(size)
        elements = [c * h * w for _, (c, h, w) in pairs]
        if training:
            total = 2 * sum(elements)
        else:
            inputs = [c * h * w for (c, h, w), _ in pairs]
            kept = sum(elements[i] for i in self._keep)
            total = max(a + b for a, b in zip(inputs, elements, strict=True)) + kept
        return total * batch * element_bytes

    def _run(self, x: torch.Tensor, keep_all: bool):
        """One pass: every kept output, what each head's loss reads and its decode (eval).

        A head's loss reads its input (raw logits), or its output when it sets
        `loss_uses_output = True` (SSD: the head itself gathers several source maps).
        """
        outputs: list = [None] * len(self.layers)
        net_hw = (x.shape[2], x.shape[3])
        x = self.normalise(x)
        decoded, head_inputs = [], []
        for i, layer in enumerate(self.layers):
            is_head = i in self.head_indices
            uses_output = is_head and getattr(layer, "loss_uses_output", False)
            if is_head and not uses_output:
                head_inputs.append(x)
            if is_head and not self.training and not keep_all and getattr(layer, "fuses_decode",
                                                                         False):
                # an inference head that decodes its logits in one pass; nothing reads its
                # activated output (detkit.fast sets fuses_decode only then)
                decoded.append(layer.decode_logits(x, outputs, net_hw))
                continue
            x = layer(x, outputs)
            if uses_output:
                head_inputs.append(x)
            if keep_all or i in self._keep:
                outputs[i] = x
            if is_head and not self.training:
                decoded.append(layer.decode(x, net_hw))
        return outputs, decoded, head_inputs, x

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        """Eval: (B, N, 5+C) decoded predictions, heads concatenated in cfg order.

        Train: with `targets` (rows of image_index, class, cx, cy, w, h, normalised) the total
        loss and a dict of its parts; without, what each head's loss reads: its raw input
        (logits), or its output for heads with `loss_uses_output` (SSD).
        """
        _, decoded, head_inputs, last = self._run(x, keep_all=False)
        if self.training:
            if targets is None:
                return head_inputs
            return self.loss(head_inputs, targets, (x.shape[2], x.shape[3]))
        if not decoded:
            return last
        return decoded[0] if len(decoded) == 1 else torch.cat(decoded, 1)

    def loss(self, head_inputs: list[torch.Tensor], targets: torch.Tensor,
             net_hw: tuple[int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of every head's loss (darknet's: summed over the batch, not averaged).

        Each head's `loss(raw, targets, net_hw, seen)` returns a dict of named parts whose sum is
        that head's loss; parts with the same name are added across heads.
        """
        parts: dict[str, torch.Tensor] = {}
        for head, raw in zip(self.heads, head_inputs, strict=True):
            for name, value in head.loss(raw, targets, net_hw, self.seen).items():
                parts[name] = parts[name] + value if name in parts else value
        total = sum(parts.values()) if parts else head_inputs[0].sum() * 0
        return total, parts

    @torch.no_grad()
    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output in darknet layout (for [yolo]/[region]: darknet's l.output)."""
        outputs, _, _, _ = self._run(x, keep_all=True)
        return outputs


def check_sections(sections: list[Section]) -> None:
    """Every section must have a builder; the first one without gets the error, with its line.

    Checked before any layer is built, so a cfg with an unknown section fails on that section
    rather than on a layer before it that cannot tell what follows.
    """
    for section in sections:
        if builder_for(section.kind) is not None:
            continue
        where, name = f"{section.path}:{section.line}", section.raw_kind or section.kind
        if section.kind in DARKNET_SECTIONS:
            raise CfgError(f"{where}: section [{name}] is not supported by detkit")
        raise CfgError(f"{where}: unknown section [{name}]")


def build_model(sections: list[Section]) -> Model:
    """Build a Model and warn once for each cfg key no layer read."""
    model = Model(sections)
    warn_unused(sections)
    return model


def model_from_cfg(cfg: str | Path) -> Model:
    return build_model(parse_cfg(cfg))


def model_from_text(text: str, path: str = "<cfg>") -> Model:
    return build_model(parse_cfg_text(text, path))
