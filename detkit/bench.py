"""Darknet-style layer table (BFLOPs, shapes, parameters) and honest latency/FPS measurement.

Timing rules (DESIGN.md, Tests and measurements): warm-up iterations are excluded; on CUDA each
iteration is bracketed by CUDA events and the host synchronises once, after the loop, so the
figures are device time without host-side gaps; on the CPU a monotonic clock brackets each call.
Latency is reported as p50/p90/p99 over the timed iterations and throughput as
batch / median latency. "Model" times the network alone (input already on the device);
"end to end" times what `detkit detect` does per batch: upload and letterbox (or, for SSD, stretch:
engine.letterbox.default_letterbox) BGR images, forward, decode, NMS and the final copy of the
boxes to the host.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .errors import DetkitError
from .model import Model

log = logging.getLogger("detkit")

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


# Dense (no sparsity) peak tensor TFLOP/s by device name and dtype, from the vendors' data
# sheets (SXM parts where both exist); float32 means TF32 tensor cores where the GPU has them,
# because PyTorch's cuDNN convolutions use TF32 by default.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"float16": 989.0, "bfloat16": 989.0, "float32": 494.0},
    "H100": {"float16": 989.0, "bfloat16": 989.0, "float32": 494.0},
    "A100": {"float16": 312.0, "bfloat16": 312.0, "float32": 156.0},
    "L40S": {"float16": 362.0, "bfloat16": 362.0, "float32": 183.0},
    "L4": {"float16": 121.0, "bfloat16": 121.0, "float32": 60.0},
    "A10": {"float16": 125.0, "bfloat16": 125.0, "float32": 62.5},
    "V100": {"float16": 125.0, "float32": 15.7},
    "T4": {"float16": 65.0, "float32": 8.1},
    "RTX 4090": {"float16": 165.0, "bfloat16": 165.0, "float32": 82.6},
    "RTX 3090": {"float16": 71.0, "bfloat16": 71.0, "float32": 35.6},
}
E2E_IMAGE_SIZE = (640, 480)   # (w, h) of the synthetic BGR images of the end-to-end timing


@dataclass
class Timing:
    """Latency percentiles (ms) of `iters` timed calls of one batch size, and throughput."""

    batch: int
    iters: int
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    images_per_s: float


@dataclass
class BatchResult:
    """Everything measured for one batch size."""

    batch: int
    model: Timing
    end_to_end: Timing | None
    peak_memory_mb: float
    peak_memory_kind: str            # "cuda max allocated" or "process peak RSS"
    achieved_tflops: float | None    # pjreddie FLOPs x batch / model p50
    peak_share: float | None         # achieved / the device's dense peak, when known


@dataclass
class BenchReport:
    """One `detkit benchmark` run: settings, machine and per-batch results."""

    cfg: str
    input_size: tuple[int, int]
    device: str
    device_name: str
    dtype: str
    fast: bool
    compile: bool
    threads: int
    flops_per_image: float           # pjreddie convention: 2 x MACs of the conv layers
    peak_tflops: float | None
    torch_version: str
    results: list[BatchResult] = field(default_factory=list)
    precision: str = "fp32"          # how --precision was resolved (auto's choice and guard)
    openmp_wait_policy: str = ""     # detkit.openmp_wait_policy(): import order can change it

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """Human-readable lines printed after the layer table."""
        head = (f"{self.device_name} ({self.device}), {self.dtype}, "
                f"{'fast path' if self.fast else 'eager'}{', torch.compile' if self.compile else ''}"
                f", {self.threads} CPU thread(s), torch {self.torch_version}")
        lines = [head]
        if self.device.startswith("cpu"):
            lines.append(f"precision {self.precision}; OpenMP wait policy {self.openmp_wait_policy}")
        lines += ["batch  what          p50 ms    p90 ms    p99 ms    images/s"]
        for r in self.results:
            for what, t in (("model", r.model), ("end to end", r.end_to_end)):
                if t is not None:
                    lines.append(f"{r.batch:5d}  {what:<11s} {t.latency_ms_p50:8.2f}  "
                                 f"{t.latency_ms_p90:8.2f}  {t.latency_ms_p99:8.2f}  "
                                 f"{t.images_per_s:10.1f}")
            extra = f"       peak memory {r.peak_memory_mb:.0f} MB ({r.peak_memory_kind})"
            if r.achieved_tflops is not None:
                rate = (f"{r.achieved_tflops:.2f} TFLOP/s" if r.achieved_tflops >= 1
                        else f"{1000 * r.achieved_tflops:.1f} GFLOP/s")
                extra += f"; {rate} achieved (model, FLOPs = 2 x MACs)"
            if r.peak_share is not None:
                extra += f", {100 * r.peak_share:.1f}% of the {self.peak_tflops:g} TFLOP/s peak"
            lines.append(extra)
        return "\n".join(lines)


def timing_from_samples(batch: int, samples_ms: Sequence[float]) -> Timing:
    """Percentiles by linear interpolation (numpy's default); throughput from the median."""
    if not samples_ms:
        raise DetkitError("no timed iterations (--iters must be at least 1)")
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return Timing(batch, len(a), p50, p90, p99, batch * 1000.0 / p50 if p50 > 0 else math.inf)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int,
               tick: Callable[[int], object] | None = None) -> list[float]:
    """Milliseconds of each of `iters` calls of `fn` after `warmup` untimed ones.

    CUDA: events around every call, one synchronisation after the loop (so the host never
    stalls the queue between iterations). CPU: perf_counter around every call.
    """
    for _ in range(warmup):
        fn()
        if tick:
            tick(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
            if tick:
                tick(1)
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for _ in range(iters):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1000.0)
        if tick:
            tick(1)
    return samples


@torch.inference_mode()
def time_forward(model: Model, size: tuple[int, int], batch: int = 1, warmup: int = 3,
                 iters: int = 20, device: str | torch.device = "cpu",
                 tick: Callable[[int], object] | None = None) -> Timing:
    """Latency of the model alone on a random input already on `device`."""
    device = torch.device(device)
    x = torch.rand(batch, model.input_channels, size[1], size[0], device=device)
    return timing_from_samples(batch, time_calls(lambda: model(x), device, warmup, iters, tick))


def synthetic_images(batch: int, size: tuple[int, int] = E2E_IMAGE_SIZE,
                     seed: int = 0) -> list[np.ndarray]:
    """Photo-like BGR uint8 images (smooth gradients plus noise), deterministic."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for i in range(batch):
        base = np.stack([xx / w, yy / h, (xx + yy + i * 37) % 256 / 255.0], -1) * 200
        images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return images


@torch.inference_mode()
def time_end_to_end(model: Model, size: tuple[int, int], batch: int = 1, warmup: int = 3,
                    iters: int = 20, device: str | torch.device = "cpu",
                    tick: Callable[[int], object] | None = None, conf_thresh: float = 0.25,
                    nms_thresh: float = 0.45, letterbox: bool = True) -> Timing:
    """Latency of what detect does per batch: letterbox (or stretch), forward, decode, NMS, copy
    to host. `letterbox` should be default_letterbox of the cfg's model, as detect uses it."""
    from .boxes import postprocess
    from .engine.letterbox import correct_boxes, letterbox_batch

    device = torch.device(device)
    images = synthetic_images(batch)

    def step() -> list[torch.Tensor]:
        x, places = letterbox_batch(images, size, device, letterbox)
        dets = postprocess(model(x).float(), conf_thresh, nms_thresh)
        boxes = [correct_boxes(d, p, size) for d, p in zip(dets, places, strict=True)]
        return list(torch.cat(boxes).cpu().split([len(b) for b in boxes]))

    return timing_from_samples(batch, time_calls(step, device, warmup, iters, tick))


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (platform's answer elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_tflops(name: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, None when unknown (all CPUs)."""
    for key, table in PEAK_TFLOPS.items():
        if key.lower() in name.lower():
            return table.get(dtype)
    return None


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "process peak RSS"


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def pick_bench_device(device: str | None) -> torch.device:
    """cuda when available unless told; a clear error for a device this machine lacks."""
    from .engine.predict import pick_device

    return pick_device(device)


def prepare_model(model: Model, device: torch.device, fast: bool, half: bool, bf16: bool,
                  compile: bool, size: tuple[int, int], precision: str = "fp32"
                  ) -> tuple[Model, str, str]:
    """The model as it will be timed, the dtype it runs in and how the precision was chosen."""
    if fast:
        from .fast import optimize_for_inference

        fast_model = optimize_for_inference(model, device, half=half, bf16=bf16,
                                            compile=compile, size=size, precision=precision)
        return fast_model, fast_model.fast_options.dtype, fast_model.fast_options.precision_note
    if precision == "bf16" and device.type == "cpu":
        raise DetkitError("--precision bf16 runs on the fast path: drop --no-fast")
    model = model.to(device).eval()
    dtype = "float32"
    if device.type == "cuda" and (half or bf16):
        dtype = "float16" if half else "bfloat16"
        model = _EagerCast(model, getattr(torch, dtype))
    elif half or bf16:
        log.warning("warning: --half/--bf16 need a CUDA device; timing float32 on %s", device)
    if compile:
        model = torch.compile(model)
    return model, dtype, dtype


class _EagerCast(torch.nn.Module):
    """The eager model in half precision for --no-fast timing (input cast, output float32)."""

    def __init__(self, model: Model, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype
        self.input_channels = model.input_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def run_benchmark(model: Model, cfg: str, size: tuple[int, int], batches: Sequence[int],
                  device: str | None = None, fast: bool = True, half: bool = False,
                  bf16: bool = False, compile: bool = False, warmup: int = 5, iters: int = 30,
                  end_to_end: bool = True, progress: bool = True,
                  precision: str = "fp32") -> BenchReport:
    """Time `model` (eval, any weights) per batch size, alone and end to end; see module doc."""
    from tqdm import tqdm

    from .engine.letterbox import default_letterbox
    from .openmp import openmp_wait_policy

    if warmup < 0 or iters < 1 or not batches or min(batches) < 1:
        raise DetkitError("need --warmup >= 0, --iters >= 1 and batch sizes >= 1")
    dev = pick_bench_device(device)
    letterbox = default_letterbox(model)  # end to end = what detect does with this cfg
    timed, dtype, precision_note = prepare_model(model, dev, fast, half, bf16, compile, size,
                                                 precision)
    flops = layer_table(model, size).bflops * 1e9
    name = device_name(dev)
    report = BenchReport(cfg=cfg, input_size=tuple(size), device=str(dev), device_name=name,
                         dtype=dtype, fast=fast, compile=compile, threads=torch.get_num_threads(),
                         flops_per_image=flops, peak_tflops=peak_tflops(name, dtype) if
                         dev.type == "cuda" else None, torch_version=torch.__version__,
                         precision=precision_note, openmp_wait_policy=openmp_wait_policy())
    per_batch = (warmup + iters) * (2 if end_to_end else 1)
    with tqdm(total=per_batch * len(batches), desc="benchmark", unit="it", leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
        for b in batches:
            bar.set_postfix_str(f"batch {b}")
            _reset_peak_memory(dev)
            t_model = time_forward(timed, size, b, warmup, iters, dev, bar.update)
            t_e2e = (time_end_to_end(timed, size, b, warmup, iters, dev, bar.update,
                                     letterbox=letterbox) if end_to_end else None)
            report.results.append(_batch_result(report, b, t_model, t_e2e, dev))
    return report


def _batch_result(report: BenchReport, batch: int, t_model: Timing, t_e2e: Timing | None,
                  dev: torch.device) -> BatchResult:
    memory, kind = _peak_memory_mb(dev)
    achieved = report.flops_per_image * batch / (t_model.latency_ms_p50 / 1000.0) / 1e12
    share = achieved / report.peak_tflops if report.peak_tflops else None
    return BatchResult(batch, t_model, t_e2e, memory, kind, achieved, share)
