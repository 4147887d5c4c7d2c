"""ONNX export of a detkit network, checked against PyTorch with onnxruntime.

The exported graph is `Model.forward` in eval mode, decode included: input `images`
(B, 3, H, W) float32 RGB in [0, 1], output `preds` (B, N, 5+C) = cx, cy, w, h in input pixels,
objectness, class probabilities (DESIGN.md's contract); NMS stays outside (`detkit.postprocess`)
so the model is usable from any runtime. The batch dimension is dynamic; H and W are fixed at
export time (the decode grid is baked in). Batch norm is folded into the convolutions first
(detkit.fast), so the graph has no BatchNormalization nodes. Opset 17 (ONNX 1.12+,
onnxruntime 1.12+) by default, through torch's TorchScript-based exporter, which needs no
extra package.

onnx and onnxruntime are optional: `pip install detkit[export]`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DetkitError
from .model import Model

ONNX_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "preds"
CHECK_TOLERANCE = 1e-4   # rtol and atol of the onnxruntime check


class ExportError(DetkitError):
    """The exported model does not reproduce PyTorch's output."""


@dataclass
class ExportReport:
    """Where the model went and how closely onnxruntime reproduces PyTorch."""

    path: Path
    opset: int
    input_size: tuple[int, int]
    output_shape: tuple[int, ...]   # at batch 1
    max_abs_diff: float | None      # onnxruntime vs PyTorch, None when not checked
    max_rel_diff: float | None


def _require(module: str):
    """Import an optional dependency or say how to install it."""
    try:
        return __import__(module)
    except ImportError:
        raise DetkitError(f"ONNX export needs the '{module}' package: "
                          "pip install 'detkit[export]'") from None


def export_model(model: Model) -> torch.nn.Module:
    """The exportable form: an inference copy with BN folded, plain convolutions, NCHW, CPU."""
    from .fast import optimize_for_inference

    return optimize_for_inference(model, "cpu", fuse=False, winograd=False, channels_last=False,
                                  cuda_graphs=False)


def export_onnx(model: Model, path: str | Path, size: tuple[int, int] | None = None,
                opset: int = ONNX_OPSET, check: bool = True) -> ExportReport:
    """Write `model` as ONNX at `path` (batch dynamic, input size `size` (w, h) or the cfg's).

    With `check`, onnxruntime runs the file at batch 1 and 2 on a random input and must agree
    with PyTorch within CHECK_TOLERANCE (relative and absolute); else ExportError is raised.
    """
    onnx = _require("onnx")
    path = Path(path)
    w, h = size or model.input_size
    model.shapes((w, h))  # a size the graph cannot take fails here, clearly
    net = export_model(model).eval()
    example = torch.rand(1, model.input_channels, h, w, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    from .weights import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    with torch.no_grad():
        out_shape = tuple(net(example).shape)
    report = ExportReport(path, opset, (w, h), out_shape, None, None)
    if check:
        report.max_abs_diff, report.max_rel_diff = check_onnx(path, net, (w, h))
    return report


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session with all graph optimisations; `threads` intra-op threads,
    idle threads sleeping rather than spinning."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # no spinning between ops: on a shared CPU it steals cores (as OMP_WAIT_POLICY, detkit/__init__)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tolerance(expected: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What "equal to 1e-4" means per element of a (B, N, 5+C) output.

    Box columns (pixels): 1e-4 of the larger of the input size and the value itself, i.e.
    0.04 px at 416 and 1e-4 relative for boxes larger than the input; probabilities: 1e-4
    absolute. (Convolution algorithms of the two runtimes differ by ~1e-6 relative per layer;
    exp() in the w/h decode turns an absolute error of the logit into a relative one of the box.)
    """
    tol = np.full(expected.shape, CHECK_TOLERANCE, dtype=np.float64)
    if expected.ndim == 3 and expected.shape[-1] >= 5:
        scale = np.maximum(np.abs(expected[..., :4]), float(max(size)))
        tol[..., :4] = CHECK_TOLERANCE * scale
    else:
        tol += CHECK_TOLERANCE * np.abs(expected)
    return tol


def check_onnx(path: str | Path, net: torch.nn.Module, size: tuple[int, int],
               batches: tuple[int, ...] = (1, 2)) -> tuple[float, float]:
    """Max absolute and relative difference onnxruntime vs PyTorch; raises past `tolerance`."""
    session = ort_session(path)
    w, h = size
    worst_abs = worst_rel = 0.0
    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        x = torch.rand(batch, 3, h, w, generator=gen)
        with torch.no_grad():
            expected = net(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime output {got.shape} != PyTorch {expected.shape} at "
                              f"batch {batch}")
        diff = np.abs(got.astype(np.float64) - expected)
        worst_abs = max(worst_abs, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / np.maximum(np.abs(expected), 1.0)).max()))
        if not (diff <= tolerance(expected, size)).all():
            raise ExportError(f"{path}: onnxruntime differs from PyTorch by up to {worst_abs:.3g} "
                              f"at batch {batch} (tolerance {CHECK_TOLERANCE}, see "
                              "detkit.export.tolerance)")
    return worst_abs, worst_rel


def _cache_dir() -> Path:
    import os

    root = os.environ.get("DETKIT_CACHE") or Path.home() / ".cache" / "detkit"
    return Path(root) / "onnx"


def cached_onnx(model: Model, cfg: str | Path, weights: str | Path | None,
                size: tuple[int, int]) -> Path:
    """The checked ONNX export of (cfg, weights, size), exported once and reused.

    The key hashes the cfg text, the weights file's path, size and mtime, the input size and
    the opset, so a changed file is exported again.
    """
    import hashlib

    key = hashlib.sha256()
    key.update(Path(cfg).read_bytes())
    if weights is not None:
        stat = Path(weights).stat()
        key.update(f"{Path(weights).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    key.update(f"{size}:{ONNX_OPSET}:{torch.__version__}".encode())
    path = _cache_dir() / f"{Path(cfg).stem}-{key.hexdigest()[:16]}.onnx"
    if not path.is_file():
        export_onnx(model, path, size)
    return path


class OnnxRuntimeModel:
    """Model.forward through onnxruntime on the CPU: `(B,3,H,W)` tensor in, `(B,N,5+C)` out.

    Used by `Detector(backend="onnxruntime")`; the session uses as many intra-op threads as
    torch does, so `--threads`/OMP settings mean the same for both backends.
    """

    def __init__(self, model: Model, cfg: str | Path, weights: str | Path | None,
                 size: tuple[int, int]) -> None:
        self.path = cached_onnx(model, cfg, weights, size)
        self.session = ort_session(self.path, torch.get_num_threads())
        self.num_classes = model.num_classes
        self.input_size = size
        self.input_channels = model.input_channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        feed = {INPUT_NAME: x.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run([OUTPUT_NAME], feed)[0])
