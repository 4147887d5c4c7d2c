"""Darknet .weights read and write, and detkit checkpoints.

Header: int32 major, minor, revision, then `seen` as uint64 when major*10+minor >= 2 (and both
are below 1000), else uint32. Then float32 arrays, layer by layer, in cfg order (darknet.c
parser.c load_weights_upto). The file is read once; tensors are filled from views into it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import WeightsError
from .layers.conv import Connected, darknet_tensors

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


def expected_floats(model, cutoff: int | None = None) -> int:
    return sum(t.numel() for layer in _loadable_layers(model, cutoff) for t in darknet_tensors(layer))


def load_darknet_weights(model, path: str | Path, cutoff: int | None = None,
                         partial: bool = False) -> LoadReport:
    """Fill `model` from a darknet .weights file.

    Without `cutoff` or `partial` the file must hold exactly the floats the cfg needs. `cutoff=N`
    loads layers 0..N-1 (the file may hold more, as darknet's `partial` does). `partial=True` loads
    whole layers until the file ends (darknet53.conv.74 and friends).
    """
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
    floats = body.view("<f4")
    layers = _loadable_layers(model, cutoff)
    needed = sum(t.numel() for layer in layers for t in darknet_tensors(layer))
    if cutoff is None and not partial and needed != floats.size:
        raise WeightsError(
            f"{path}: the cfg needs {needed:,} floats but the file holds {floats.size:,} "
            f"(use cutoff/partial loading for a truncated backbone file)")
    if cutoff is not None and floats.size < needed:
        raise WeightsError(f"{path}: layers 0..{cutoff - 1} need {needed:,} floats but the file "
                           f"holds only {floats.size:,}")
    offset, loaded = _fill(model, layers, floats, header.transpose)
    log.info("loaded %d layers (%d floats) from %s", loaded, offset, path)
    return LoadReport(header, loaded, offset, int(floats.size))


def _fill(model, layers, floats: np.ndarray, transpose: bool) -> tuple[int, int]:
    offset = loaded = 0
    with torch.no_grad():
        for layer in layers:
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
    atomic_write_bytes(Path(path), b"".join(chunks))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
