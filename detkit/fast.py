"""The fast inference path: an optimised, inference-only copy of a Model.

`optimize_for_inference(model, device)` returns a copy (the caller's model is untouched) with

* batch norm folded into the convolutions (darknet's eval formula, `inference_scale_shift`),
* channels-last activations and weights,
* on the CPU: convolution and activation in one oneDNN call, and Winograd convolutions for the
  3x3/stride-1 layers with many channels, where they beat direct convolution (PyTorch's oneDNN
  convolutions are direct, and a 416x416 YOLO spends most of its FLOPs in such layers),
* darknet maxpools without the padding copy where the padding is never read, nearest-neighbour
  upsampling as one op,
* on CUDA: float16 or bfloat16 (heads decode in float32), CUDA graphs per input shape, and
  optionally torch.compile.

Every step is switchable off. CPU threading: detkit sets OMP_WAIT_POLICY=PASSIVE before torch
is imported (detkit/__init__.py), because spinning OpenMP threads stall every parallel region on
a shared CPU; the Winograd kernels are used only on layers heavy enough (WINOGRAD_MIN_GFLOPS)
to pay for their extra ops. The copy is inference-only: batch norm no longer exists as a
module, so `train()` raises and darknet .weights cannot be saved from it; `forward` and
`layer_outputs` keep their meaning (a folded convolutional layer outputs exactly what the
original layer outputs, up to float rounding: Winograd differs from direct convolution by a few
1e-6 relative in float32).
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .errors import DetkitError
from .heads.yolo import YoloHead
from .layers.activations import ACTIVATIONS
from .layers.conv import Convolutional
from .layers.simple import MaxPool, Route, Upsample
from .model import Model

log = logging.getLogger("detkit")

# darknet activation -> oneDNN post-op (name, scalars) of mkldnn._convolution_pointwise.
_ONEDNN_ATTRS: dict[str, tuple[str, list[float]]] = {
    "linear": ("none", []),
    "relu": ("relu", []),
    "logistic": ("sigmoid", []),
    "tanh": ("tanh", []),
    "leaky": ("leaky_relu", [0.1]),
    "swish": ("swish", []),
}
# Below this many input channels the transforms cost more than the FLOPs they save. With the
# native transforms (detkit.native) 32->64 at 104x104 takes 1.6 ms against oneDNN's 2.0 and
# 16->32 at 208x208 loses (4.7 against 2.3); as PyTorch ops 32->64 at 208x208 took 27 ms
# against 7, hence 64 there.
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MIN_CHANNELS_OPS = 64
WINOGRAD_F4_MIN_SIZE = 12     # F(4x4,3x3) from this output size up, F(2x2,3x3) below
# Winograd runs three ops where oneDNN runs one (ten as PyTorch ops), and every op wakes the
# thread pool (tens of microseconds on a VM, more on a shared CPU): only layers this heavy
# (direct FLOPs = 2 x MACs at the tuned input size) gain more than they lose.
WINOGRAD_MIN_GFLOPS = 0.3
WINOGRAD_CLEAR_WIN = 0.9       # Winograd is kept only when it takes under 90% of oneDNN's time
MAX_PACKED_SHAPES = 8         # CPU: oneDNN-reordered weights kept per conv (one per input shape)
MAX_GRAPHS = 8                # CUDA graphs kept (one per input shape), least recently used out


@dataclass(frozen=True)
class FastOptions:
    """What `optimize_for_inference` did; `InferenceModel.fast_options` keeps it for reports."""

    device: str
    dtype: str                  # "float32", "float16", "bfloat16"
    fold_bn: bool
    channels_last: bool
    fuse: bool                  # CPU: conv + activation in one oneDNN call
    winograd: bool              # CPU: Winograd 3x3 convolutions where they win
    cuda_graphs: bool
    compile: bool
    precision_note: str = ""    # how --precision was resolved (auto's choice, guard outcome)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# --------------------------------------------------------------------------------------------
# Convolution kernels
# --------------------------------------------------------------------------------------------

def fold_conv_bn(layer: Convolutional) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to conv -> darknet eval batch norm.

    Computed in float64 so folding adds no rounding of its own: w' = w * scale,
    b' = shift (+ conv bias * scale), scale = gamma / (sqrt(var) + 1e-6) as darknet's CPU path.
    """
    weight = layer.conv.weight.detach().double()
    bias = (layer.conv.bias.detach().double() if layer.conv.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if layer.bn is None:
        return weight.float(), bias.float()
    bn = layer.bn
    scale = bn.weight.detach().double() / (bn.running_var.detach().double().sqrt() + 1e-6)
    shift = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    return (weight * scale.view(-1, 1, 1, 1)).float(), (shift + bias * scale).float()


class ConvAct(nn.Module):
    """Convolution with a bias and a darknet activation: the folded conv + BN + act of a layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                 activation: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return self.act(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}, act={self.activation}"


class ReorderedWeights:
    """oneDNN-reordered copies of one convolution weight, one per input shape, a few at most.

    Given plain weights, oneDNN reorders them into its blocked layout on every call: for a
    13x13 3x3x512->1024 layer that reorder is two thirds of the call (45 -> 15 ms on two
    threads). The layout oneDNN picks depends on the input shape, hence one copy per shape.
    oneDNN tensors neither pickle nor deep-copy: a copy of the owner starts empty and reorders
    on demand.
    """

    def __init__(self, padding: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int], groups: int) -> None:
        self.args = (list(padding), list(stride), list(dilation), groups)
        self.by_key: dict[tuple[int, ...], tuple[tuple[int, int], torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> ReorderedWeights:
        return ReorderedWeights(*self.args)

    def __getstate__(self) -> dict:
        return {"args": self.args, "by_key": {}}

    def for_input(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The weight in the layout oneDNN wants for `x` (the plain weight where oneDNN cannot
        take reordered ones)."""
        return self.derived_for_input(weight, lambda: weight, x)

    def derived_for_input(self, source: torch.Tensor, make: Callable[[], torch.Tensor],
                          x: torch.Tensor) -> torch.Tensor:
        """The same for a weight computed from `source` by `make()`, called only when a
        reorder is due: the plain computed weight need not be kept."""
        if not _PREPACK_OK:
            return make()
        shape, source_key = tuple(x.shape), (source._version, source.data_ptr())
        known = self.by_key.get(shape)
        if known is not None and known[0] == source_key:
            return known[1]
        if known is None and len(self.by_key) >= MAX_PACKED_SHAPES:
            self.by_key.pop(next(iter(self.by_key)))
        padding, stride, dilation, groups = self.args
        reordered = torch.ops.mkldnn._reorder_convolution_weight(
            make().detach(), padding, stride, dilation, groups, list(x.shape))
        self.by_key[shape] = (source_key, reordered)   # a changed weight replaces its copy
        return reordered


class OneDnnConvAct(ConvAct):
    """ConvAct as one oneDNN call with the activation as a post-op (CPU, float32 or bfloat16),
    on weights
    reordered once into oneDNN's blocked layout (ReorderedWeights).

    The post-op saves a full read and write of every activation map (a separate leaky ReLU costs
    about a tenth of a 416x416 YOLO).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, conv: nn.Conv2d,
                 activation: str) -> None:
        # channels-last already: the model's conversion to channels-last must not replace
        # the weight after the kernel timing reordered it (the stale copy would be kept too)
        super().__init__(weight.contiguous(memory_format=torch.channels_last), bias, conv,
                         activation)
        self.reordered = ReorderedWeights(self.padding, self.stride, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
            return super().forward(x)
        attr, scalars = _ONEDNN_ATTRS[self.activation]
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.reordered.for_input(self.weight, x), self.bias, list(self.padding),
            list(self.stride), list(self.dilation), self.groups, attr, scalars, "")


def _winograd_matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B^T, G, A^T of Lavin and Gray's F(m x m, 3 x 3), m = 2 or 4, in float64."""
    d = torch.float64
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"Winograd F({m}x{m}, 3x3) is not implemented (m = 2 or 4)")
    return torch.tensor(bt, dtype=d), torch.tensor(g, dtype=d), torch.tensor(at, dtype=d)


class WinogradConv3x3(nn.Module):
    """3x3, stride 1, padding 1 convolution + activation by Winograd F(m x m, 3 x 3).

    Per (m+2)^2 input tile: V = B^T d B, then P = (m+2)^2 independent channel GEMMs V_p @ U_p,
    then Y = A^T M A. The 2-D transforms are matmuls with Kronecker products of the 1-D
    matrices. The P channel GEMMs are one grouped 1x1 convolution (P groups) over a
    (1, P*Cin, tiles, 1) channels-last map, the tiles' transformed points laid out as
    (tile, point, channel): oneDNN runs it with its own AVX-512 kernels on reordered weights at
    185-200 GFLOP/s on two EPYC threads, where torch.bmm (MKL) reaches 110-150 with the same
    operands; the GEMMs are most of the time. F(4,3) does 4x, F(2,3) 2.25x fewer multiply-adds
    than direct convolution. Input and output are channels-last (NHWC memory).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str,
                 m: int) -> None:
        super().__init__()
        bt, g, at = _winograd_matrices(m)
        self.m, self.alpha = m, m + 2
        self.points = self.alpha ** 2
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.register_buffer("g", g)
        # (Cout, Cin, 9): 3-D, so converting the model to channels-last leaves it (and the
        # reordered U derived from it) alone
        self.register_buffer("weight", weight.detach().float().reshape(*weight.shape[:2], 9))
        self._u: tuple[tuple[int, int], torch.Tensor] | None = None
        self.cout = weight.shape[0]
        self.register_buffer("kb", torch.kron(bt, bt).float())     # (a^2, a^2)
        self.register_buffer("ka", torch.kron(at, at).float())     # (m^2, a^2)
        # The bias rides on the GEMMs: A^T's column 1 is all ones (for m = 2 and 4), so a bias
        # added to transform point (1, 1) alone reaches every output pixel once, exactly.
        point_bias = torch.zeros(self.points, self.cout)
        point_bias[self.alpha + 1] = bias.detach().float()
        self.register_buffer("point_bias", point_bias.reshape(-1))
        self.reordered = ReorderedWeights((0, 0), (1, 1), (1, 1), self.points)

    def transformed_weight(self) -> torch.Tensor:
        """U = G w G^T of every 3x3 kernel as the grouped 1x1 conv's (P * Cout, Cin, 1, 1)
        weight, group p holding U_p (point-major). Computed on demand and kept only where the
        GEMMs read it on every call: with oneDNN only its reordered copy is kept, as U is 4x
        the kernel's size for F(4x4) (yolov2-voc: 600 MB less)."""
        key = (self.weight._version, self.weight.data_ptr())
        if self._u is not None and self._u[0] == key:
            return self._u[1]
        cout, cin = self.weight.shape[:2]
        u = torch.empty((self.points, cout, cin), dtype=torch.float32)
        for start in range(0, cout, 64):   # in float64, a few output channels at a time
            kernels = self.weight[start:start + 64].double().view(-1, cin, 3, 3)
            chunk = (self.g @ kernels @ self.g.T).reshape(-1, cin, self.points)
            u[:, start:start + 64] = chunk.permute(2, 0, 1)
        u = u.view(-1, cin, 1, 1)
        if not (_onednn_works() and _PREPACK_OK):
            self._u = (key, u)
        return u

    def _channel_gemms(self, v: torch.Tensor) -> torch.Tensor:
        """(T, P, Cin) -> (T, P, Cout): the P GEMMs (and the bias) as one grouped 1x1 conv."""
        tiles = v.shape[0]
        x = v.view(1, tiles, 1, -1).permute(0, 3, 1, 2)      # (1, P*Cin, T, 1), NHWC memory
        if x.dtype == torch.float32 and _onednn_works():
            u = self.reordered.derived_for_input(self.weight, self.transformed_weight, x)
            y = torch.ops.mkldnn._convolution_pointwise(
                x, u, self.point_bias, [0, 0], [1, 1], [1, 1], self.points, "none", [], "")
        else:
            y = F.conv2d(x, self.transformed_weight(), self.point_bias, groups=self.points)
        return y.permute(0, 2, 3, 1).reshape(tiles, self.points, self.cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        library = native.kernels_for(x)
        if library is None:
            return self._forward_ops(x)
        x = x.contiguous(memory_format=torch.channels_last)
        activation = self.activation if self.activation in native.ACTIVATION_CODES else "linear"
        mm = self._channel_gemms(native.winograd_input(library, x, self.m))
        n, _, h, w = x.shape
        y = native.winograd_output(library, mm.contiguous(), (n, self.cout, h, w), self.m,
                                   activation)
        return y if activation == self.activation else self.act(y)

    def _forward_ops(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution in PyTorch ops, where the native transforms are not built."""
        m, a = self.m, self.alpha
        n, c, h, w = x.shape
        cout = self.cout
        th, tw = -(-h // m), -(-w // m)          # output tiles (output size = input size)
        xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, m * tw + 1 - w, 1, m * th + 1 - h))
        s = xp.stride()
        tiles = xp.as_strided((n, th, tw, a, a, c), (s[0], m * s[1], m * s[2], s[1], s[2], s[3]))
        v = torch.matmul(self.kb, tiles.reshape(n * th * tw, a * a, c))       # (T, P, Cin)
        y = torch.matmul(self.ka, self._channel_gemms(v))                    # (T, m^2, Cout)
        out = torch.empty((n, th, m, tw, m, cout), dtype=y.dtype, device=y.device)
        self._activate_into(y.view(n, th, tw, m, m, cout), out.permute(0, 1, 3, 2, 4, 5))
        out = out.view(n, m * th, m * tw, cout)
        if m * th != h or m * tw != w:
            out = out[:, :h, :w].contiguous()
        return out.permute(0, 3, 1, 2)

    def _activate_into(self, y: torch.Tensor, out: torch.Tensor) -> None:
        """out = act(y), written straight into the tiles' places in the output map: one pass
        over memory (and one wake-up of the thread pool) instead of two."""
        if self.activation == "leaky":
            torch._C._nn.leaky_relu(y, 0.1, out=out)
        elif self.activation == "logistic":
            torch.sigmoid(y, out=out)
        elif self.activation == "linear":
            out.copy_(y)
        else:
            out.copy_(self.act(y))

    def extra_repr(self) -> str:
        return f"F({self.m}x{self.m},3x3), {self.points} GEMMs ->{self.cout}, act={self.activation}"


def winograd_applies(layer: Convolutional, in_channels: int) -> bool:
    """3x3, stride 1, 'same' padding, no groups or dilation, and enough channels to pay off."""
    conv = layer.conv
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and in_channels >= _winograd_min_channels() and layer.filters >= 64)


def _winograd_min_channels() -> int:
    return WINOGRAD_MIN_CHANNELS if native.kernels() is not None else WINOGRAD_MIN_CHANNELS_OPS


def _conv_kernel(layer: Convolutional, in_shape: tuple[int, int, int],
                 out_shape: tuple[int, int, int], options: FastOptions) -> nn.Module:
    """The fastest safe module for one convolutional layer on the options' device."""
    weight, bias = fold_conv_bn(layer)
    on_cpu = options.device.startswith("cpu")
    # a CPU bfloat16 dtype already means oneDNN runs bf16 here (_resolve_options checked it)
    onednn_dtype = options.dtype in ("float32", "bfloat16")
    heavy = layer.flops(in_shape, out_shape)[0] >= WINOGRAD_MIN_GFLOPS * 1e9
    direct = None
    if (on_cpu and onednn_dtype and options.fuse and layer.activation_name in _ONEDNN_ATTRS
            and _onednn_works()):
        direct = OneDnnConvAct(weight, bias, layer.conv, layer.activation_name)
    cpu = on_cpu and options.dtype == "float32"   # the Winograd kernels are float32 only
    if cpu and options.winograd and heavy and winograd_applies(layer, in_shape[0]):
        m = 4 if min(out_shape[1:]) >= WINOGRAD_F4_MIN_SIZE else 2
        winograd = WinogradConv3x3(weight, bias, layer.activation_name, m)
        return winograd if direct is None else _faster(winograd, direct, in_shape)
    return direct or ConvAct(weight, bias, layer.conv, layer.activation_name)


def _faster(first: nn.Module, second: nn.Module, in_shape: tuple[int, int, int],
            runs: int = 5, warmup: int = 3) -> nn.Module:
    """`first` (Winograd) when it runs this layer clearly faster here (WINOGRAD_CLEAR_WIN), else
    `second`: timed on a batch-1 input (best of `runs`, interleaved), like cudnn.benchmark; the
    margin keeps near-ties on the deterministic side instead of flipping with machine noise.
    Measured on two EPYC (Zen 4) threads, layer alone: F(4x4) takes 50-75% of oneDNN's time
    from 13x13 to 104x104 with 64-1280 input channels, but F(2x2) at 7x7 with 512 inputs and
    anything with 32 inputs at 208x208 lose; the layer's place in the network (caches, the
    thread pool) moves those figures, hence timing rather than a table."""
    x = torch.rand(1, *in_shape).contiguous(memory_format=torch.channels_last)
    best = [math.inf, math.inf]
    with torch.no_grad():
        for _ in range(warmup):   # reorders; the heap settles only after a call or two
            for module in (first, second):
                module(x)
        for _ in range(runs):
            for i, module in enumerate((first, second)):
                started = time.perf_counter()
                module(x)
                best[i] = min(best[i], time.perf_counter() - started)
    return first if best[0] < WINOGRAD_CLEAR_WIN * best[1] else second


_ONEDNN_OK: bool | None = None
_PREPACK_OK = False


def _onednn_works() -> bool:
    """Whether this torch build has oneDNN's fused conv op and it agrees with F.conv2d (and
    whether it also takes weights reordered in advance)."""
    global _ONEDNN_OK, _PREPACK_OK
    if _ONEDNN_OK is None:
        try:
            x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(3, 4, 3, 3), torch.randn(3)
            want = F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.1)
            got = torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [1, 1], [1, 1], 1,
                                                           "leaky_relu", [0.1], "")
            _ONEDNN_OK = torch.allclose(got, want, atol=1e-5)
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
            got = torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 1,
                                                           "leaky_relu", [0.1], "")
            _PREPACK_OK = bool(_ONEDNN_OK and torch.allclose(got, want, atol=1e-5))
        except (RuntimeError, AttributeError):
            _ONEDNN_OK = _ONEDNN_OK or False
    return _ONEDNN_OK


@functools.cache
def _onednn_bf16_works() -> bool:
    """Whether oneDNN's fused conv takes bfloat16 maps and weights here and agrees with the
    float32 convolution to bf16 rounding (about 3 significant digits)."""
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(8, 16, 3, 3, generator=generator), torch.randn(8, generator=generator)
        want = F.leaky_relu(F.conv2d(x, w, b, padding=1), 0.1)
        got = torch.ops.mkldnn._convolution_pointwise(
            x.bfloat16(), w.bfloat16().contiguous(memory_format=torch.channels_last), b.bfloat16(),
            [1, 1], [1, 1], [1, 1], 1, "leaky_relu", [0.1], "")
        return got.dtype == torch.bfloat16 and torch.allclose(got.float(), want, rtol=0.05, atol=0.1)
    except (RuntimeError, AttributeError):
        return False


class FoldedActivation(nn.Module):
    """The layer's activation now lives inside its convolution module: identity here."""

    name = "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --------------------------------------------------------------------------------------------
# Other layers
# --------------------------------------------------------------------------------------------

class FastMaxPool(MaxPool):
    """Darknet maxpool in one pass, without the -inf padding copy.

    On the CPU in float32 that is the native kernel (detkit.native: one pass and one parallel
    region, pixels outside the map skipped). Elsewhere: darknet pads size-1 in total, p//2
    before; where no window reaches the padding (the common 2x2/2 pool on even sizes) it is
    skipped. Both are bit-identical to the padded pool.
    """

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        p, before = self.padding, self.padding // 2
        h, w = x.shape[2], x.shape[3]
        out_h = (h + p - self.size) // self.stride + 1
        out_w = (w + p - self.size) // self.stride + 1
        library = native.pool_kernels_for(x)
        if library is not None and out_h > 0 and out_w > 0:
            return native.maxpool(library, x.contiguous(memory_format=torch.channels_last),
                                  self.size, self.stride, before, (out_h, out_w))
        last_h = (out_h - 1) * self.stride - before + self.size
        last_w = (out_w - 1) * self.stride - before + self.size
        if before == 0 and last_h <= h and last_w <= w:
            if self.size == 2 and self.stride == 2 and h % 2 == 0 and w % 2 == 0 and x.device.type == "cpu":
                return _max_of_quads(x)
            return F.max_pool2d(x, self.size, self.stride)[:, :, :out_h, :out_w]
        return super().forward(x, outputs)


def _max_of_quads(x: torch.Tensor) -> torch.Tensor:
    """2x2/2 max pooling as two element-wise maxima of strided views (rows, then columns): on
    the CPU about four times faster than max_pool2d (which also computes indices) on a
    16x416x416 map; exact. Two ops, not three: each op wakes the thread pool."""
    rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    return torch.maximum(rows[:, :, :, 0::2], rows[:, :, :, 1::2])


class FastUpsample(Upsample):
    """Nearest-neighbour upsampling as one op (exact for darknet's integer stride)."""

    def forward(self, x: torch.Tensor, outputs: list) -> torch.Tensor:
        if self.stride <= 1:
            return super().forward(x, outputs)
        out = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return out * self.scale if self.scale != 1 else out


class FastYoloHead(YoloHead):
    """[yolo] head whose activation and decode are one native pass (CPU, float32) in a forward
    that reads only its predictions: about ten ops and a copy of the logits fewer per head.
    `fuses_decode` is set only where no later layer reads the head's activated output."""

    fuses_decode = False

    def decode_logits(self, x: torch.Tensor, outputs: list, net_hw: tuple[int, int]
                      ) -> torch.Tensor:
        """decode(forward(x)): predictions (B, A*H*W, 5+C) from the logits (a bf16 body's
        logits are widened first: the decode is float32 whatever the body runs in)."""
        if x.dtype == torch.bfloat16:
            x = x.float()
        library = native.kernels_for(x)
        if library is None:
            return self.decode(self(x, outputs), net_hw)
        return native.yolo_decode(library, x, self.anchors, self.scale_x_y, net_hw)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class InferenceModel(Model):
    """A Model after `optimize_for_inference`: same forward and layer_outputs, inference only."""

    fast_options: FastOptions

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise DetkitError("this model is optimised for inference (batch norm folded into "
                              "the convolutions); train the original model instead")
        return super().train(False)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Move/cast the input to the optimised device, dtype and memory format."""
        opts = self.fast_options
        fmt = torch.channels_last if opts.channels_last and x.dim() == 4 else torch.preserve_format
        return x.to(device=opts.device, dtype=opts.torch_dtype, memory_format=fmt)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """Model.forward (eval) on an already prepared input; float32 out."""
        return Model.forward(self, x).float()

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, 5+C) float32 decoded predictions, as Model.forward in eval mode."""
        if targets is not None:
            raise DetkitError("an inference-optimised model computes no loss")
        x = self.prepare_input(x)
        runner = getattr(self, "_runner", None)
        if runner is not None:
            return runner(x)
        return self._eager(x)

    @torch.no_grad()
    def layer_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return Model.layer_outputs(self, self.prepare_input(x))


def _float_head_inputs(head: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a head: float32 NCHW input and source maps, so the head decodes (and
    an SSD head runs its own convolutions) exactly as the eager float32 model does."""
    x, outputs = args
    if x.dtype == torch.float32 and x.is_contiguous() and not head.sources:
        return None
    outputs = list(outputs)
    for i in head.sources:
        if outputs[i] is not None:
            outputs[i] = outputs[i].float().contiguous()
    return x.float().contiguous(), outputs


class CudaGraphRunner:
    """Replays one captured CUDA graph per input shape: the whole forward is one launch.

    Captured lazily on the first call with a new shape (after two warm-up passes on a side
    stream, as the PyTorch docs prescribe); the input is copied into the graph's static buffer
    and the output is cloned, so callers never see a buffer the next call overwrites. Any
    capture failure turns graphs off for this model, with a warning, and runs eagerly.
    """

    def __init__(self, model: InferenceModel) -> None:
        self.model = model
        self.graphs: OrderedDict = OrderedDict()
        self.enabled = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_cuda or torch.is_grad_enabled():
            return self.model._eager(x)
        key = (tuple(x.shape), x.dtype, x.stride())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            if entry is None:
                return self.model._eager(x)
        self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor):
        try:
            static_in = x.clone()
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model._eager(static_in)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model._eager(static_in)
        except RuntimeError as exc:  # capture unsupported here: stay correct, go eager
            log.warning("warning: CUDA graph capture failed (%s); running without graphs", exc)
            self.enabled = False
            return None
        entry = (graph, static_in, static_out)
        self.graphs[(tuple(x.shape), x.dtype, x.stride())] = entry
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return entry


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "auto")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo names, best first
# The bf16 guard: on the same input every prediction's score (objectness x best class) must
# agree with float32's within this, and every box float32 scores at least GUARD_MIN_SCORE must
# overlap its float32 twin by GUARD_MIN_IOU (the accuracy tests hold real photos to the same).
GUARD_MAX_SCORE_DIFF = 0.05
GUARD_MIN_SCORE = 0.25
GUARD_MIN_IOU = 0.9


@functools.cache
def cpu_bf16_instructions() -> str | None:
    """The CPU's bfloat16 instruction set ('amx_bf16' or 'avx512_bf16'), read from the kernel's
    /proc/cpuinfo flags; None without one, or where there is no /proc/cpuinfo. oneDNN emulates
    bf16 on other CPUs, slower than float32, so `auto` must know rather than guess."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """(dtype, note) for `precision` on `device`: `auto` is bfloat16 on a CPU with bf16
    instructions whose oneDNN runs bf16 convolutions, float32 elsewhere (CUDA keeps float32
    unless half/bf16 is asked for, as before). The note says why, for `benchmark`."""
    if precision not in PRECISIONS:
        raise DetkitError(f"precision '{precision}': choose fp32, bf16 or auto")
    device = torch.device(device)
    if precision == "fp32":
        return "float32", "fp32"
    if precision == "bf16":
        return "bfloat16", "bf16"
    if device.type != "cpu":
        return "float32", "fp32 (auto: float32 on CUDA; --half for float16)"
    instructions = cpu_bf16_instructions()
    if instructions is None:
        return "float32", "fp32 (auto: this CPU has no bf16 instructions)"
    if not _onednn_bf16_works():
        return "float32", "fp32 (auto: this torch's oneDNN runs no bf16 convolution)"
    return "bfloat16", f"bf16 (auto: CPU has {instructions})"


@dataclass(frozen=True)
class GuardResult:
    """bf16 against float32 on one input: the largest score difference, the smallest IoU of a
    confident box with its float32 twin, and whether both are within the guard."""

    max_score_diff: float
    min_iou: float
    confident: int

    @property
    def passed(self) -> bool:
        return self.max_score_diff <= GUARD_MAX_SCORE_DIFF and self.min_iou >= GUARD_MIN_IOU


def _scores_and_boxes(preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prediction objectness x best class score, and the box as x1, y1, x2, y2."""
    preds = preds.float()
    scores = preds[..., 4] * preds[..., 5:].amax(-1) if preds.shape[-1] > 5 else preds[..., 4]
    cx, cy, w, h = preds[..., 0], preds[..., 1], preds[..., 2], preds[..., 3]
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return scores, boxes


def compare_predictions(reference: torch.Tensor, candidate: torch.Tensor) -> GuardResult:
    """Row-by-row comparison of two (B, N, 5+C) decoded prediction tensors of one network."""
    from torchvision.ops import box_iou

    ref_scores, ref_boxes = _scores_and_boxes(reference)
    cand_scores, cand_boxes = _scores_and_boxes(candidate)
    diff = float((ref_scores - cand_scores).abs().max()) if ref_scores.numel() else 0.0
    confident = ref_scores >= GUARD_MIN_SCORE
    if not bool(confident.any()):
        return GuardResult(diff, 1.0, 0)
    a, b = ref_boxes[confident], cand_boxes[confident]
    ious = box_iou(a, b).diagonal()
    return GuardResult(diff, float(ious.min()), int(confident.sum()))


def guard_input(size: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """A fixed input for the build-time guard: smooth random blobs (noise upsampled), closer to
    a photo's statistics than white noise, the same on every machine."""
    generator = torch.Generator().manual_seed(2024)
    w, h = size
    coarse = torch.rand(1, channels, max(1, h // 16), max(1, w // 16), generator=generator)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def _resolve_options(device: torch.device, half: bool, bf16: bool, channels_last: bool,
                     fold_bn: bool, fuse: bool, winograd: bool | None, cuda_graphs: bool | None,
                     compile: bool, precision: str = "fp32") -> FastOptions:
    """Turn the caller's wishes into what is safe on `device` (float16 only on CUDA; bfloat16
    on CUDA and on the CPU, where oneDNN runs it)."""
    if half and bf16:
        raise DetkitError("choose one of half (float16) and bf16")
    cuda = device.type == "cuda"
    dtype, note = resolve_precision("bf16" if bf16 else precision, device)
    if half:
        dtype, note = "float16", "fp16"
    if dtype == "float16" and not cuda:
        log.warning("warning: float16 needs a CUDA device; running in float32 on %s", device)
        dtype, note = "float32", "fp32 (float16 needs CUDA)"
    if dtype == "bfloat16" and not cuda and not _onednn_bf16_works():
        log.warning("warning: this torch's oneDNN runs no bf16 convolution; float32 on %s", device)
        dtype, note = "float32", "fp32 (oneDNN has no bf16 convolution)"
    elif dtype == "bfloat16" and not cuda and cpu_bf16_instructions() is None:
        log.warning("warning: this CPU has no bf16 instructions: oneDNN emulates bf16, slower "
                    "than float32")
    return FastOptions(
        device=str(device), dtype=dtype, fold_bn=fold_bn, channels_last=channels_last,
        # torch.compile fuses conv + activation itself and cannot lower the oneDNN kernels
        fuse=fuse and fold_bn and not cuda and not compile,
        winograd=(not cuda if winograd is None else winograd) and fold_bn and not cuda
        and not compile and dtype == "float32",
        cuda_graphs=cuda if cuda_graphs is None else (cuda_graphs and cuda),
        compile=compile, precision_note=note)


def _optimise_layers(model: Model, options: FastOptions, size: tuple[int, int]) -> None:
    """Replace, in place on the copy, each layer's modules by their inference form."""
    for layer, (in_shape, out_shape) in zip(model.layers, model.shapes(size), strict=True):
        if isinstance(layer, Convolutional) and options.fold_bn:
            layer.conv = _conv_kernel(layer, in_shape, out_shape, options)
            layer.bn = None
            layer.act = FoldedActivation()
            release_free_heap()   # the timing's temporaries, before the next layer's pile up
        elif type(layer) is MaxPool:
            layer.__class__ = FastMaxPool
        elif type(layer) is Upsample:
            layer.__class__ = FastUpsample
        elif type(layer) is YoloHead:
            layer.__class__ = FastYoloHead
            after = model.layers[layer.index + 1] if layer.index + 1 < len(model.layers) else None
            layer.fuses_decode = (layer.index not in model._keep
                                  and (after is None or isinstance(after, Route)))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MALLOC_MMAP_THRESHOLD = 256 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20
_MALLOC_TUNED: bool | None = None


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    Every CPU forward allocates its activations and Winograd intermediates (1-25 MB each) anew.
    glibc serves blocks that large with fresh mmaps, so each forward page-faults them in again
    and gives them back: on two cores 15-35 ms of a 130 ms yolov2-voc forward, and Winograd's
    1 ms layers turn into 3 ms ones. OpenCV DNN plans its buffers once; PyTorch's CPU tuning
    guides preload jemalloc or tcmalloc for the same reason. Here glibc is told to serve blocks
    below MALLOC_MMAP_THRESHOLD from its heap and to keep up to MALLOC_TRIM_THRESHOLD of free
    heap: the process holds on to memory it used (a forward's worth), which is the trade.
    Process-wide, once; only where glibc is the C library; DETKIT_SYSTEM_MALLOC=1 leaves
    malloc alone. Returns whether the settings are in effect.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED is None:
        _MALLOC_TUNED = os.environ.get("DETKIT_SYSTEM_MALLOC") != "1" and _set_malloc_thresholds()
    return _MALLOC_TUNED


@functools.cache
def _glibc_function(name: str):
    """A function of glibc, or None where the C library is not glibc (musl and others);
    looked up once (find_library runs ldconfig)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library and "libc.so" in library else None
    except (OSError, AttributeError):
        return None


def _set_malloc_thresholds() -> bool:
    """glibc's mallopt with the two thresholds; False where the C library is not glibc."""
    mallopt = _glibc_function("mallopt")
    return bool(mallopt and mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS now (glibc's malloc_trim). Building the fast
    copy frees hundreds of MB of temporaries (weight transforms, the kernels that lost the
    timing) that the retained heap would otherwise keep for the process's life: yolov2-voc
    held 2.6 GB after `optimize_for_inference` instead of 1.9. Returns whether it ran."""
    malloc_trim = _glibc_function("malloc_trim") if _MALLOC_TUNED else None
    if malloc_trim is not None:
        malloc_trim(ctypes.c_size_t(0))
    return malloc_trim is not None


def optimize_for_inference(model: Model, device: str | torch.device | None = None,
                           half: bool = False, bf16: bool = False, channels_last: bool = True,
                           fold_bn: bool = True, fuse: bool = True, winograd: bool | None = None,
                           cuda_graphs: bool | None = None, compile: bool = False,
                           size: tuple[int, int] | None = None,
                           precision: str = "fp32") -> InferenceModel:
    """An optimised, inference-only copy of `model` on `device`; `model` is not modified.

    `precision`: fp32, bf16 or auto (`resolve_precision`: bf16 on a CPU with bf16 instructions).
    An `auto` bf16 copy is checked against the float32 model on a fixed input (`compare_predictions`)
    and rebuilt in float32 if it fails; `fast_options.precision_note` says what happened.
    `half` (float16) applies on CUDA only (a warning and float32 elsewhere); `bf16` is
    precision bf16. `winograd` (CPU, float32) and `cuda_graphs` (CUDA) default to on for their
    device. `size` (w, h) is the input size the per-layer kernel choice is tuned for (default:
    the cfg's); any other size still works. Process-wide effects: on CUDA cudnn.benchmark
    (fixed shapes are the common case), on the CPU glibc's malloc keeps freed memory for reuse
    (`retain_freed_memory`).
    """
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    size = size or model.input_size
    wishes = dict(channels_last=channels_last, fold_bn=fold_bn, fuse=fuse, winograd=winograd,
                  cuda_graphs=cuda_graphs, compile=compile)
    options = _resolve_options(device, half, bf16, precision=precision, **wishes)
    if precision == "auto" and options.dtype == "bfloat16" and _has_ssd_head(model):
        options = dataclasses.replace(
            _resolve_options(device, half, False, precision="fp32", **wishes),
            precision_note=SSD_AUTO_NOTE)
    fast = _build_fast_copy(model, device, options, size)
    if precision == "auto" and options.dtype == "bfloat16" and device.type == "cpu":
        guard = guard_bf16(model, fast, size)
        if guard.passed:
            fast.fast_options = dataclasses.replace(options, precision_note=(
                f"{options.precision_note}; bf16 guard passed: scores within "
                f"{guard.max_score_diff:.3f} of fp32"))
        else:
            log.warning("warning: bf16 changes this network's scores by up to %.3f (boxes IoU "
                        "%.2f) against float32: running in float32", guard.max_score_diff,
                        guard.min_iou)
            fallback = _resolve_options(device, half, False, precision="fp32", **wishes)
            fast = _build_fast_copy(model, device, dataclasses.replace(fallback, precision_note=(
                f"fp32 (auto: bf16 failed the guard, scores off by {guard.max_score_diff:.3f})")),
                size)
    return fast


# Measured: the small tree-crown SSD's validation AP50 moved from 0.1931 (fp32) to 0.1830 in bf16,
# over the 0.005 the accuracy guard allows (yolov3-tiny-trees: 0.3988 -> 0.3996), although its
# scores on the fixed guard input stayed within 0.05: SSD's many low softmax scores reorder.
SSD_AUTO_NOTE = ("fp32 (auto: bf16 moved an SSD's tree-crown AP50 by 0.010, over the 0.005 guard; "
                 "--precision bf16 to force it)")


def _has_ssd_head(model: Model) -> bool:
    from .heads.ssd import SSDHead

    return any(isinstance(head, SSDHead) for head in model.heads)


def _build_fast_copy(model: Model, device: torch.device, options: FastOptions,
                     size: tuple[int, int]) -> InferenceModel:
    """The optimised copy for resolved `options` (see optimize_for_inference)."""
    if device.type == "cpu":
        retain_freed_memory()   # before the kernels are timed, so they are timed as they will run
    fast = copy.deepcopy(model).eval()
    _optimise_layers(fast, options, size)
    fast.__class__ = InferenceModel
    for head in fast.heads:
        head.register_forward_pre_hook(_float_head_inputs)
    fast.fast_options = options
    fast = fast.to(device=device)
    if options.dtype != "float32":
        _cast_body(fast, options.torch_dtype)
    if options.channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    for p in fast.parameters():
        p.requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    _attach_runner(fast, options)
    if device.type == "cpu":
        release_free_heap()
    return fast


@torch.no_grad()
def guard_bf16(model: Model, fast: InferenceModel, size: tuple[int, int]) -> GuardResult:
    """The bf16 copy against the float32 eager model on `guard_input`: `auto` keeps bf16 only
    for networks whose scores it leaves within GUARD_MAX_SCORE_DIFF."""
    was_training = model.training
    model.eval()
    try:
        x = guard_input(size, model.input_channels)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        reference = model(x.to(device)).float().cpu()
        return compare_predictions(reference, fast(x).float().cpu())
    finally:
        model.train(was_training)


def _cast_body(model: InferenceModel, dtype: torch.dtype) -> None:
    """Cast everything but the heads (anchors and decode stay float32: fp16 would round the
    region anchors by 1e-3 and box centres by up to a quarter pixel at 416)."""
    for layer in model.layers:
        if layer.index not in model.head_indices:
            layer.to(dtype=dtype)
    model.input_mean = model.input_mean.to(dtype)
    model.input_std = model.input_std.to(dtype)


def _attach_runner(model: InferenceModel, options: FastOptions) -> None:
    """torch.compile (its own CUDA graphs with mode reduce-overhead) or detkit's CUDA graphs."""
    if options.compile:
        mode = "reduce-overhead" if options.cuda_graphs else "default"
        model._runner = torch.compile(model._eager, mode=mode, dynamic=False)
    elif options.cuda_graphs:
        model._runner = CudaGraphRunner(model)
