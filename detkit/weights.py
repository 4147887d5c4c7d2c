"""Darknet .weights read and write, and detkit checkpoints.

Header: int32 major, minor, revision, then `seen` as uint64 when major*10+minor >= 2 (and both
are below 1000), else uint32. Then float32 arrays, layer by layer, in cfg order (darknet.c
parser.c load_weights_upto). The file is read once; tensors are filled from views into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_bytes
from .errors import WeightsError
from .layers.conv import Connected, Convolutional, darknet_tensors

log = logging.getLogger("detkit")


@dataclass
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_64bit(self) -> bool:
        return (self.major * 10 + self.minor) >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def transpose(self) -> bool:
        return self.major > 1000 or self.minor > 1000

    @property
    def nbytes(self) -> int:
        return 12 + (8 if self.seen_is_64bit else 4)


@dataclass
class LoadReport:
    header: WeightsHeader
    layers_loaded: int
    floats_loaded: int
    floats_in_file: int
    reinitialised: list[int] = field(default_factory=list)  # layer indices left at their init
    source_classes: int | None = None


def read_header(data: bytes, path: str) -> WeightsHeader:
    if len(data) < 16:
        raise WeightsError(f"{path}: too short for a darknet .weights header ({len(data)} bytes)")
    major, minor, revision = np.frombuffer(data, "<i4", 3).tolist()
    header = WeightsHeader(major, minor, revision)
    dtype = "<u8" if header.seen_is_64bit else "<u4"
    if len(data) < header.nbytes:
        raise WeightsError(f"{path}: truncated header")
    header.seen = int(np.frombuffer(data, dtype, 1, offset=12)[0])
    return header


def _loadable_layers(model, cutoff: int | None) -> list:
    stop = len(model.layers) if cutoff is None else min(cutoff, len(model.layers))
    return [layer for layer in list(model.layers)[:stop] if not _dontload(layer)]


def _dontload(layer) -> bool:
    section = getattr(layer, "section", None)
    return bool(section is not None and section.options.get("dontload", ("0", 0))[0] not in ("0", ""))


def _size_hint(layers: list, available: int) -> str:
    """What a file of the wrong size most likely is: the first layers of this cfg (a backbone
    such as darknet53.conv.74, loadable with --cutoff) or weights of another network."""
    total = 0
    for layer in layers:
        total += sum(t.numel() for t in darknet_tensors(layer))
        if total == available:
            return (f"exactly layers 0..{layer.index} of this cfg: load them with --cutoff "
                    f"{layer.index + 1}")
        if total > available:
            break
    return "it fits no whole number of this cfg's layers: weights of another network?"


def expected_floats(model, cutoff: int | None = None) -> int:
    return sum(t.numel() for layer in _loadable_layers(model, cutoff) for t in darknet_tensors(layer))


def load_darknet_weights(model, path: str | Path, cutoff: int | None = None,
                         partial: bool = False) -> LoadReport:
    """Fill `model` from a darknet .weights file.

    Without `cutoff` or `partial` the file must hold exactly the floats the cfg needs. `cutoff=N`
    loads layers 0..N-1 (the file may hold more, as darknet's `partial` does). `partial=True` loads
    whole layers until the file ends (darknet53.conv.74 and friends).
    """
    header, floats = _read_floats(path)
    layers = _loadable_layers(model, cutoff)
    needed = sum(t.numel() for layer in layers for t in darknet_tensors(layer))
    if cutoff is None and not partial and needed != floats.size:
        raise WeightsError(f"{path}: the cfg needs {needed:,} floats but the file holds "
                           f"{floats.size:,} ({_size_hint(layers, floats.size)})")
    if cutoff is not None and floats.size < needed:
        raise WeightsError(f"{path}: layers 0..{cutoff - 1} need {needed:,} floats but the file "
                           f"holds only {floats.size:,}")
    offset, loaded = _fill(model, layers, floats, header.transpose)
    log.info("loaded %d layers (%d floats) from %s", loaded, offset, path)
    return LoadReport(header, loaded, offset, int(floats.size))


def load_darknet_weights_transfer(model, path: str | Path) -> LoadReport:
    """Every layer of a file trained for another class count; the class-sized convs re-initialised.

    A darknet file has no shapes, so the file's class count is solved from its length: only the
    convolution right before each [yolo]/[region] layer depends on the classes, linearly. Users
    fine-tune COCO's yolov3-tiny.weights on a 1-class cfg this way without knowing a cutoff; a file
    whose length fits no whole class count is refused with both counts, as in strict loading.
    """
    header, floats = _read_floats(path)
    layers = _loadable_layers(model, None)
    needed = expected_floats(model)
    if needed == floats.size:
        offset, loaded = _fill(model, layers, floats, header.transpose)
        return LoadReport(header, loaded, offset, int(floats.size), source_classes=model.num_classes)
    per_class = _floats_per_class(model)
    difference = int(floats.size) - needed
    source_classes = model.num_classes + difference // per_class if per_class else 0
    if not per_class or difference % per_class or source_classes < 1:
        raise WeightsError(
            f"{path}: the cfg needs {needed:,} floats but the file holds {floats.size:,}, which fits "
            f"no other class count either (use --cutoff N to load only the first N layers)")
    skips = {conv.index: per_filter * anchors * (fixed + source_classes)
             for conv, anchors, fixed, per_filter in _class_sized_convs(model)}
    offset, loaded = _fill(model, layers, floats, header.transpose, skips=skips)
    _check_statistics(model, path, source_classes)
    log.warning("loaded %d layers from %s (trained for %d classes; layers %s re-initialised for %d)",
                loaded, path, source_classes, sorted(skips), model.num_classes)
    return LoadReport(header, loaded, offset, int(floats.size), reinitialised=sorted(skips),
                      source_classes=source_classes)


def _check_statistics(model, path, source_classes: int) -> None:
    """A file whose length only happens to fit another class count loads shifted floats: its
    batch-norm variances then come out negative or non-finite somewhere. Refuse it."""
    for layer in model.layers:
        bn = getattr(layer, "bn", None)
        if bn is not None and not bool(torch.isfinite(bn.running_var).all() and (bn.running_var >= 0).all()):
            raise WeightsError(f"{path}: read as a {source_classes}-class file, layer {layer.index} gets "
                               f"negative or non-finite batch-norm variances: not a file for this cfg")


def _read_floats(path: str | Path) -> tuple[WeightsHeader, np.ndarray]:
    path = Path(path)
    try:
        raw = np.fromfile(path, np.uint8)  # one read; a writable buffer the tensors copy from
    except FileNotFoundError:
        raise WeightsError(f"{path}: weights file not found") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a folder, not a weights file") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights ({exc.strerror})") from None
    header = read_header(raw[:20].tobytes(), str(path))
    body = raw[header.nbytes:]
    if body.size % 4:
        raise WeightsError(f"{path}: body is not a whole number of float32 values "
                           f"({body.size} bytes after the header)")
    return header, body.view("<f4")


def _class_sized_convs(model) -> list[tuple[Convolutional, int, int, int]]:
    """(conv, anchors, class-independent entries per anchor, floats per filter) per YOLO head."""
    found = []
    for head in model.heads:
        conv = model.layers[head.index - 1]
        anchors = getattr(head, "num_anchors", None)
        if head.kind not in ("yolo", "detection") or not isinstance(conv, Convolutional) or not anchors:
            raise WeightsError(f"layer {head.index} ({head.kind}): class-count transfer needs a "
                               f"convolution right before each [yolo]/[region] layer")
        fixed = 5 if head.kind == "yolo" else head.coords + 1
        found.append((conv, anchors, fixed, sum(t.numel() for t in darknet_tensors(conv)) // conv.filters))
    return found


def _floats_per_class(model) -> int:
    return sum(anchors * per_filter for _, anchors, _, per_filter in _class_sized_convs(model))


def _fill(model, layers, floats: np.ndarray, transpose: bool,
          skips: dict[int, int] | None = None) -> tuple[int, int]:
    """Copy layer by layer; a layer in `skips` passes over that many floats and keeps its init."""
    offset = loaded = 0
    with torch.no_grad():
        for layer in layers:
            if skips and layer.index in skips:
                offset += skips[layer.index]
                continue
            tensors = darknet_tensors(layer)
            size = sum(t.numel() for t in tensors)
            if offset + size > floats.size:
                break  # partial: stop at the last whole layer
            for t in tensors:
                chunk = floats[offset: offset + t.numel()]
                if transpose and isinstance(layer, Connected) and t is layer.linear.weight:
                    chunk = chunk.reshape(t.shape[1], t.shape[0]).T
                t.copy_(torch.from_numpy(np.ascontiguousarray(chunk)).view_as(t))
                offset += t.numel()
            loaded += 1
    return offset, loaded


def save_darknet_weights(model, path: str | Path, seen: int = 0, cutoff: int | None = None) -> None:
    """Write version 0.2.0 .weights (seen as uint64) that darknet loads; atomically."""
    header = np.array([0, 2, 0], "<i4").tobytes() + np.array([seen], "<u8").tobytes()
    chunks = [header]
    stop = len(model.layers) if cutoff is None else cutoff
    for layer in list(model.layers)[:stop]:
        for t in darknet_tensors(layer):
            chunks.append(t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    try:
        atomic_write_bytes(Path(path), b"".join(chunks))
    except OSError as exc:  # disk full, folder removed or read-only: the old file is intact
        raise WeightsError(f"{path}: cannot write the weights ({exc.strerror or exc})") from None
