"""Detector: a network plus darknet's pre- and postprocessing, answering in original-image pixels.

The CLI's `detect` command and library users share this one class, so what the command prints
is exactly what `Detector.detect` returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DetkitError, WeightsError
from ..memory import check_fits
from .checkpoint import load_model
from .detection import Detection
from .letterbox import correct_boxes, default_letterbox, letterbox_batch
from .slicing import check_tiling, predict_sliced
from .sources import ImageInput, as_bgr, read_image_or_raise

log = logging.getLogger("detkit")

DEFAULT_CFG = "cfg/yolov3-tiny.cfg"
DEFAULT_WEIGHTS = "weights/yolov3-tiny.weights"
# 90: torchvision's COCO SSD (cfg/ssd300-coco.cfg), class c = COCO category id c + 1, so the
# file is torchvision's COCO_V1 categories without '__background__' ('N/A' for unused ids).
NAMES_BY_CLASSES = {80: "data/coco.names", 20: "data/voc.names", 90: "data/coco91.names"}


def detkit_home() -> Path:
    """Where the default cfg, weights and names live: $DETKIT_HOME, else the repository root.

    The repository root is the parent of the detkit package directory (an editable install).
    When DETKIT_HOME is set it is the only place looked at, so a deployment is self-contained.
    """
    env = os.environ.get("DETKIT_HOME")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2]


def default_model_files() -> tuple[Path, Path]:
    """The default cfg and weights (yolov3-tiny, COCO); a clear error says how to get them."""
    home = detkit_home()
    cfg, weights = home / DEFAULT_CFG, home / DEFAULT_WEIGHTS
    if not cfg.is_file():
        raise DetkitError(f"default cfg {cfg} not found; pass --cfg (or set DETKIT_HOME to the "
                          "detkit checkout)")
    if not weights.is_file():
        raise WeightsError(f"default weights {weights} not found: run `make assets` in {home} to "
                           "fetch the official yolov3-tiny weights, or pass --cfg and --weights")
    return cfg, weights


def resolve_model_file(path: str | Path) -> Path:
    """`path` as given when it exists; else, for a relative path, the same path under the detkit
    checkout ($DETKIT_HOME): `Detector("cfg/yolov3-tiny.cfg", ...)` works from any directory,
    as the CLI's defaults do. A path found nowhere is returned as given, for the loader's error."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    under_home = detkit_home() / given
    return under_home if under_home.exists() else given


def read_names(path: str | Path) -> list[str]:
    """Class names, one a line (darknet's get_labels); blank trailing lines are dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DetkitError(f"cannot read names file {path}: {exc.strerror or exc}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def resolve_names(names: str | Path | Sequence[str] | None, num_classes: int) -> list[str]:
    """Names from a file or a list; by default coco.names for 80 classes, voc.names for 20 and
    coco91.names (torchvision's COCO category ids 1..90) for 90.

    Falls back to the class numbers when no names file fits, so detection never fails on it.
    """
    if names is None:
        default = NAMES_BY_CLASSES.get(num_classes)
        path = detkit_home() / default if default else None
        if path is not None and path.is_file():
            names = path
        else:
            return [str(i) for i in range(num_classes)]
    labels = read_names(names) if isinstance(names, (str, Path)) else [str(n) for n in names]
    if len(labels) < num_classes:
        where = f"names file {names}" if isinstance(names, (str, Path)) else "names"
        raise DetkitError(f"{where} has {len(labels)} names but the model has {num_classes} classes")
    return labels[:num_classes]


def parse_classes(spec: str | Sequence[str | int] | None, names: Sequence[str]) -> list[int] | None:
    """--classes 'person,car' or '0,2' (mixed is fine) -> sorted class ids; None keeps all."""
    if spec is None:
        return None
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    lookup = {name.lower(): i for i, name in enumerate(names)}
    ids: set[int] = set()
    for item in items:
        if item == "":
            continue
        if isinstance(item, int) or str(item).isdigit():
            cid = int(item)
            if not 0 <= cid < len(names):
                raise DetkitError(f"--classes: class id {cid} is outside 0..{len(names) - 1}")
        elif str(item).lower() in lookup:
            cid = lookup[str(item).lower()]
        else:
            raise DetkitError(f"--classes: unknown class '{item}'")
        ids.add(cid)
    if not ids:
        raise DetkitError("--classes is empty")
    return sorted(ids)


def pick_device(device: str | torch.device | None) -> torch.device:
    """cuda when available unless told otherwise; a clear error for an unusable device."""
    if device is None or str(device) == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DetkitError(f"--device '{device}' is not cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DetkitError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DetkitError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_img_size(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """Input size (w, h); both must be positive multiples of 32 (the YOLO strides)."""
    if size is None:
        return None
    w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise DetkitError(f"--img-size {w}x{h}: width and height must be positive multiples of 32")
    return (w, h)


class Detector:
    """A darknet network ready to detect: letterbox in, boxes in original-image pixels out.

    `letterbox=None` (default) uses the geometry the model was trained on (default_letterbox:
    darknet's letterbox for YOLO, a stretch for SSD); True or False forces one. Either way the
    boxes are mapped back to the original image.

    `cfg`/`weights` default to yolov3-tiny (COCO) from the detkit checkout or $DETKIT_HOME.
    `fast` (default) runs an inference-optimised copy of the network (detkit.fast: batch norm
    folded, channels-last, fused/Winograd convolutions on the CPU, CUDA graphs on the GPU);
    `fast=False` runs the eager model exactly as trained. `backend="onnxruntime"` (CPU) runs
    the network's ONNX export (detkit.export, cached) in onnxruntime instead of PyTorch.
    `precision` (fast path on the CPU): fp32, bf16, or auto (default: bf16 where the CPU has bf16
    instructions and the network passes the bf16 guard, see detkit.fast.resolve_precision);
    `precision_note` says what was chosen. On CUDA `half` picks float16 as before.
    `tta` runs every view of `engine.tta` (flips, quarter turns) and merges their boxes.
    `tile` (px) detects in overlapping tile x tile windows of each image (`tile_overlap` of a
    window shared with the next) and merges them (engine.slicing): for photos far larger than
    the network input, such as aerial photos, with a model trained on tiles of that size.
    """

    def __init__(self, cfg: str | Path | None = None, weights: str | Path | None = None,
                 device: str | torch.device | None = None, conf_thresh: float = 0.25,
                 nms_thresh: float = 0.45, half: bool = False,
                 img_size: int | tuple[int, int] | None = None, letterbox: bool | None = None,
                 names: str | Path | Sequence[str] | None = None, max_det: int = 300,
                 classes: str | Sequence[str | int] | None = None, fast: bool = True,
                 backend: str = "torch", tta: bool = False, tile: int | None = None,
                 tile_overlap: float = 0.25, precision: str = "auto") -> None:
        if cfg is None:
            default_cfg, default_weights = default_model_files()
            cfg = default_cfg
            weights = default_weights if weights is None else weights
        elif weights is None:
            raise DetkitError(f"no weights given for {cfg}: pass --weights")
        cfg, weights = resolve_model_file(cfg), resolve_model_file(weights)
        from ..fast import PRECISIONS

        if precision not in PRECISIONS:
            raise DetkitError(f"--precision {precision}: choose fp32, bf16 or auto")
        if not 0.0 <= conf_thresh <= 1.0 or not 0.0 <= nms_thresh <= 1.0:
            raise DetkitError("--conf and --nms must be between 0 and 1")
        if max_det < 1:
            raise DetkitError("--max-det must be at least 1")
        check_tiling(tile, tile_overlap)
        self.device = pick_device(device)
        self.model = load_model(cfg, weights, device=str(self.device))
        self.input_size = check_img_size(img_size) or self.model.input_size
        self.model.shapes(self.input_size)  # a size the graph cannot take fails here, clearly
        check_fits(self.model.activation_bytes(self.input_size), self.device,
                   f"{Path(cfg).name} at {self.input_size[0]}x{self.input_size[1]}")
        # read from the cfg-built model, before it is swapped for a fast or onnxruntime copy
        self.letterbox = default_letterbox(self.model) if letterbox is None else bool(letterbox)
        self.half = bool(half) and self.device.type == "cuda"
        if half and not self.half:
            log.warning("warning: --half needs a CUDA device; running in float32 on %s", self.device)
        if backend not in ("torch", "onnxruntime"):
            raise DetkitError(f"--backend {backend}: choose torch or onnxruntime")
        self.backend = backend
        self.fast = bool(fast) and backend == "torch"
        if precision == "bf16" and not self.fast:
            raise DetkitError("--precision bf16 runs on the fast path: drop --no-fast / "
                              "--backend onnxruntime, or use --precision fp32")
        self.precision_note = "fp32"
        if backend == "onnxruntime":
            self._use_onnxruntime(cfg, weights)
        elif self.fast:  # folded, channels-last, fused copy; casts its input itself
            from ..fast import optimize_for_inference

            self.model = optimize_for_inference(self.model, self.device, half=self.half,
                                                size=self.input_size, precision=precision)
            self.precision_note = self.model.fast_options.precision_note
        elif self.half:
            self.model.half()
        self.dtype = torch.float16 if self.half and not self.fast else torch.float32
        self.conf_thresh = float(conf_thresh)
        self.nms_thresh = float(nms_thresh)
        self.max_det = int(max_det)
        self.tta = bool(tta)
        self.tile = None if tile is None else int(tile)
        self.tile_overlap = float(tile_overlap)
        self.num_classes = self.model.num_classes
        self.names = resolve_names(names, self.num_classes)
        self.classes = parse_classes(classes, self.names)
        self._class_mask = None
        if self.classes is not None:
            mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
            mask[self.classes] = True
            self._class_mask = mask

    def _use_onnxruntime(self, cfg: str | Path, weights: str | Path | None) -> None:
        """Run the network's ONNX export (cached, checked against PyTorch) in onnxruntime."""
        from ..export import OnnxRuntimeModel

        if self.device.type != "cpu":
            raise DetkitError("--backend onnxruntime runs on the CPU: add --device cpu")
        self.model = OnnxRuntimeModel(self.model, cfg, weights, self.input_size)

    def __repr__(self) -> str:
        return (f"Detector({self.num_classes} classes, input {self.input_size[0]}x"
                f"{self.input_size[1]}, {self.device}, conf {self.conf_thresh}, nms {self.nms_thresh})")

    @torch.inference_mode()
    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """BGR uint8 images -> per image a CPU (K, 6) tensor x1, y1, x2, y2, score, class in
        original-image pixels, sorted by score. Without `tile` the whole batch is one forward
        pass; with it each image is cut into windows (engine.slicing), batched per image."""
        if self.tile is None:
            return self._predict_whole(images)
        return [predict_sliced(image, self.tile, self.tile_overlap, self._predict_whole,
                               self.nms_thresh) for image in images]

    def _predict_whole(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return predict_letterboxed(self.model, images, self.input_size, self.device,
                                   self.letterbox, self.conf_thresh, self.nms_thresh,
                                   self.max_det, tta=self.tta, dtype=self.dtype,
                                   class_mask=self._class_mask)

    def to_detections(self, rows: torch.Tensor) -> list[Detection]:
        """(K, 6) rows -> Detection objects with class names."""
        out = []
        for x1, y1, x2, y2, score, cls in rows.tolist():
            cid = int(cls)
            out.append(Detection((x1, y1, x2, y2), score, cid, self.names[cid]))
        return out

    def detect_batch(self, images: Sequence[ImageInput]) -> list[list[Detection]]:
        """Detect in several images (paths or BGR arrays) with one forward pass."""
        arrays = [as_bgr(read_image_or_raise(im) if isinstance(im, (str, Path)) else im)
                  for im in images]
        return [self.to_detections(rows) for rows in self.predict_arrays(arrays)]

    def detect(self, image: ImageInput | Sequence[ImageInput]
               ) -> list[Detection] | list[list[Detection]]:
        """Detect in one image (a path or a BGR uint8 ndarray); boxes in its pixels. Given a
        list or tuple of images, one list of detections per image (as detect_batch)."""
        if isinstance(image, (list, tuple)):
            return self.detect_batch(image)
        return self.detect_batch([image])[0]

    def annotate(self, image: ImageInput, detections: Sequence[Detection] | None = None
                 ) -> np.ndarray:
        """A BGR copy of `image` with its detections drawn as `detkit detect` saves them
        (detected now when `detections` is None)."""
        from .draw import draw_detections

        array = as_bgr(read_image_or_raise(image) if isinstance(image, (str, Path)) else image)
        found = self.detect(array) if detections is None else detections
        return draw_detections(array.copy(), found, self.num_classes)

    def save(self, image: ImageInput, path: str | Path,
             detections: Sequence[Detection] | None = None) -> Path:
        """Write `annotate(image, detections)` to `path` (format from its suffix); the path."""
        import cv2

        path = Path(path)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            written = cv2.imwrite(str(path), self.annotate(image, detections))
        except cv2.error:   # OpenCV raises for a suffix it has no writer for
            written = False
        if not written:
            raise DetkitError(f"cannot write {path} (unknown image suffix or unwritable folder)")
        return path


@torch.inference_mode()
def predict_letterboxed(model: torch.nn.Module, images: Sequence[np.ndarray],
                        input_size: tuple[int, int], device: torch.device | str, letterbox: bool,
                        conf_thresh: float, nms_thresh: float, max_det: int, tta: bool = False,
                        dtype: torch.dtype = torch.float32,
                        class_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`Detector.predict_arrays` without slicing, for any model (eval runs its own): BGR uint8
    images -> per image a CPU (K, 6) tensor x1, y1, x2, y2, score, class in image pixels.
    The whole batch is one forward pass and one device-to-host copy."""
    from ..boxes import MAX_NMS, postprocess
    from .tta import predict_views

    if not images:
        return []
    batch, places = letterbox_batch(images, input_size, device, letterbox, dtype)
    preds = (predict_views(model, batch) if tta else model(batch)).float()
    if class_mask is not None:
        preds[..., 5:] = preds[..., 5:] * class_mask
    per_image = postprocess(preds, conf_thresh, nms_thresh, max_det, merge=tta, max_nms=MAX_NMS)
    corrected = [correct_boxes(d, p, input_size) for d, p in zip(per_image, places, strict=True)]
    return list(torch.cat(corrected).cpu().split([len(d) for d in corrected]))
