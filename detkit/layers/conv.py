"""[convolutional] and [connected]."""

from __future__ import annotations

import torch
from torch import nn

from ..cfg import Section
from ..registry import register
from .activations import ACTIVATIONS, Activation
from .base import BuildContext, Layer, Shape


def parse_activation(section: Section, default: str) -> str:
    name = section.get_str("activation", default)
    if name not in ACTIVATIONS:
        raise section.error(f"activation '{name}' is not supported", "activation")
    return name


DARKNET_BN_EPS = 1e-6


class DarknetBatchNorm(nn.BatchNorm2d):
    """BatchNorm with darknet's statistics convention.

    Rolling statistics are updated .99/.01 (momentum 0.01). At inference darknet's CPU path
    (blas.c normalize_cpu, the reference detkit is tested against) divides by sqrt(var) + 1e-6,
    not sqrt(var + 1e-5): the two differ noticeably for near-dead channels of real weights and
    compound over deep nets. Training uses torch's batch statistics (eps 1e-5).
    """

    def __init__(self, n: int) -> None:
        super().__init__(n, eps=1e-5, momentum=0.01)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {input.dim()}D")

    def inference_scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight / (self.running_var.sqrt() + DARKNET_BN_EPS)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        scale, shift = self.inference_scale_shift()
        if x.dim() == 4:
            return torch.addcmul(shift[:, None, None], x, scale[:, None, None])
        return torch.addcmul(shift, x, scale)


def darknet_batchnorm(n: int, dims: int = 2) -> nn.Module:
    return DarknetBatchNorm(n)


class DarknetSyncBatchNorm(nn.SyncBatchNorm):
    """DarknetBatchNorm whose training statistics are computed over every process (CUDA):
    torch's SyncBatchNorm in training, darknet's formula at inference."""

    inference_scale_shift = DarknetBatchNorm.inference_scale_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return DarknetBatchNorm.forward(self, x)


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Turn every 4-D DarknetBatchNorm into a DarknetSyncBatchNorm in place (same parameters,
    statistics and identity, so an optimizer built before still holds them); how many."""
    count = 0
    for module in model.modules():
        if type(module) is DarknetBatchNorm:
            module.__class__ = DarknetSyncBatchNorm
            module.process_group = None  # the default (whole world) group
            count += 1
    return count


@register("convolutional")
class Convolutional(Layer):
    kind = "conv"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        c_in = ctx.prev[0]
        self.filters = section.get_int("filters", 1)
        self.size = section.get_int("size", 1)
        self.stride = section.get_int("stride", 1)
        self.dilation = section.get_int("dilation", 1)
        self.groups = section.get_int("groups", 1)
        pad = section.get_int("pad", 0)
        self.padding = section.get_int("padding", 0)
        if pad:
            self.padding = (self.size // 2) * self.dilation
        self.batch_normalize = bool(section.get_int("batch_normalize", 0))
        self.activation_name = parse_activation(section, "logistic")
        for flag in ("binary", "xnor"):
            if section.get_int(flag, 0):
                raise section.error(f"'{flag}=1' convolutions are not supported", flag)
        self._check(section, c_in)
        self.conv = nn.Conv2d(
            c_in, self.filters, self.size, self.stride, self.padding,
            dilation=self.dilation, groups=self.groups, bias=not self.batch_normalize,
        )
        self.bn = darknet_batchnorm(self.filters) if self.batch_normalize else None
        self.act = Activation(self.activation_name)

    def _check(self, section: Section, c_in: int) -> None:
        for key, value in (("filters", self.filters), ("size", self.size), ("stride", self.stride),
                           ("groups", self.groups), ("dilation", self.dilation)):
            if value < 1:
                raise section.error(f"'{key}' must be at least 1, got {value}", key)
        if c_in % self.groups or self.filters % self.groups:
            raise section.error(
                f"groups={self.groups} must divide both input channels ({c_in}) and filters "
                f"({self.filters})", "groups")

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        _, h, w = in_shape
        span = self.dilation * (self.size - 1) + 1
        return (self.filters, (h + 2 * self.padding - span) // self.stride + 1,
                (w + 2 * self.padding - span) // self.stride + 1)

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        c_in = in_shape[0]
        return 2.0 * self.filters * self.size * self.size * (c_in // self.groups) * out_shape[1] * out_shape[2], 0.0

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        c, h, w = in_shape
        oc, oh, ow = out_shape
        bflops = self.flops(in_shape, out_shape)[0] / 1e9
        return (f"conv  {self.filters:5d} {self.size:2d} x{self.size:2d} /{self.stride:2d}  "
                f"{w:4d} x{h:4d} x{c:4d}   ->  {ow:4d} x{oh:4d} x{oc:4d}  {bflops:5.3f} BFLOPs")


@register("connected")
class Connected(Layer):
    kind = "connected"

    def __init__(self, index: int, section: Section, ctx: BuildContext) -> None:
        super().__init__(index)
        c, h, w = ctx.prev
        self.inputs = c * h * w
        self.outputs = section.get_int("output", 1)
        self.batch_normalize = bool(section.get_int("batch_normalize", 0))
        self.activation_name = parse_activation(section, "logistic")
        self.linear = nn.Linear(self.inputs, self.outputs, bias=not self.batch_normalize)
        self.bn = darknet_batchnorm(self.outputs, dims=1) if self.batch_normalize else None
        self.act = Activation(self.activation_name)

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        x = self.linear(x.flatten(1))
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)[:, :, None, None]

    def out_shape(self, in_shape: Shape, shapes: list[Shape]) -> Shape:
        return (self.outputs, 1, 1)

    def flops(self, in_shape: Shape, out_shape: Shape) -> tuple[float, float]:
        return 0.0, 0.0  # darknet counts conv layers only

    def table_row(self, in_shape: Shape, out_shape: Shape) -> str:
        return f"connected                            {self.inputs:4d}  ->  {self.outputs:4d}"


def darknet_tensors(layer: Layer) -> list[torch.Tensor]:
    """A layer's parameters in the order darknet stores them in .weights (empty if none).

    conv: biases, [scales, rolling mean, rolling variance], weights (OIHW).
    connected: biases, weights (out x in), then [scales, rolling mean, rolling variance].
    With batch norm the darknet "biases" are the BN beta.
    """
    if isinstance(layer, Convolutional):
        if layer.bn is None:
            return [layer.conv.bias, layer.conv.weight]
        bn = layer.bn
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, layer.conv.weight]
    if isinstance(layer, Connected):
        if layer.bn is None:
            return [layer.linear.bias, layer.linear.weight]
        bn = layer.bn
        return [bn.bias, layer.linear.weight, bn.weight, bn.running_mean, bn.running_var]
    extra = getattr(layer, "darknet_tensors", None)
    return list(extra()) if extra is not None else []
