"""Darknet-style layer table (BFLOPs, shapes, parameters) and latency/FPS measurement."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .model import Model

TABLE_HEADER = "layer     filters    size              input                output"


@dataclass
class LayerRow:
    index: int
    kind: str
    text: str
    input: tuple[int, int, int]   # (w, h, c) as darknet prints it
    output: tuple[int, int, int]
    bflops: float                 # darknet (pjreddie): 2 x multiply-adds of conv layers, in 1e9
    bflops_alexeyab: float        # AlexeyAB adds maxpool and shortcut operations
    params: int


@dataclass
class LayerTable:
    input_size: tuple[int, int]
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def bflops(self) -> float:
        return sum(r.bflops for r in self.rows)

    @property
    def bflops_alexeyab(self) -> float:
        return sum(r.bflops_alexeyab for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    def format(self) -> str:
        lines = [TABLE_HEADER] + [f"{r.index:5d} {r.text}" for r in self.rows]
        lines += [
            f"Total BFLOPs (FLOPs = 2 x MACs, conv only, as pjreddie): {self.bflops:.3f}",
            f"Total BFLOPS (with maxpool and shortcut, as AlexeyAB):  {self.bflops_alexeyab:.3f}",
            f"Parameters: {self.params:,}",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "bflops_pjreddie": self.bflops,
            "bflops_alexeyab": self.bflops_alexeyab,
            "params": self.params,
            "layers": [asdict(r) for r in self.rows],
        }


def layer_table(model: Model, size: tuple[int, int] | None = None) -> LayerTable:
    """The table darknet prints while loading a cfg, at `size` (w, h) or the cfg's own size."""
    table = LayerTable(input_size=size or model.input_size)
    for layer, (in_shape, out_shape) in zip(model.layers, model.shapes(size), strict=True):
        pj, ab_extra = layer.flops(in_shape, out_shape)
        table.rows.append(LayerRow(
            index=layer.index,
            kind=layer.kind,
            text=layer.table_row(in_shape, out_shape),
            input=(in_shape[2], in_shape[1], in_shape[0]),
            output=(out_shape[2], out_shape[1], out_shape[0]),
            bflops=pj / 1e9,
            bflops_alexeyab=(pj + ab_extra) / 1e9,
            params=sum(p.numel() for p in layer.parameters()),
        ))
    return table


@dataclass
class Timing:
    batch: int
    iters: int
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    images_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_forward(model: Model, size: tuple[int, int], batch: int = 1, warmup: int = 3,
                 iters: int = 20, device: str | torch.device = "cpu") -> Timing:
    """Median-based latency of the model's forward pass (warm-up excluded)."""
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.rand(batch, model.input_channels, size[1], size[0], device=device)
    for _ in range(warmup):
        model(x)
    _sync(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        model(x)
        _sync(device)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    p50 = statistics.median(samples)

    def pct(q: float) -> float:
        return samples[min(len(samples) - 1, int(round(q * (len(samples) - 1))))]

    return Timing(batch, iters, p50, pct(0.9), pct(0.99), batch * 1000.0 / p50)
