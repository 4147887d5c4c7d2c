"""Video in and out: frames from a file, camera or stream; an annotated mp4 (H.264 where the
OpenCV build can write it) at the input's size, frame rate and frame count."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ..errors import DetkitError
from .pipeline import Frame
from .sources import Source, SourceWarning, open_capture

log = logging.getLogger("detkit")

# H.264 first: browsers and most players only play that in an mp4. OpenCV's pip wheels have no
# H.264 encoder, so mp4v (MPEG-4 Part 2), which every build writes, is the last resort.
MP4_FOURCCS = ("avc1", "H264", "mp4v")
MP4_SUFFIXES = (".mp4", ".m4v", ".mov")
FOURCC = "mp4v"  # what a build without H.264, and any other container, gets
CODEC_NAMES = {"avc1": "H.264", "H264": "H.264", "mp4v": "MPEG-4 Part 2"}
DEFAULT_FPS = 25.0
MAX_FAILED_READS = 25  # consecutive failed reads inside a file before the rest counts as lost


@dataclass
class VideoInfo:
    """What the output must match: frame size, frame rate and (files only) frame count."""

    width: int
    height: int
    fps: float
    frame_count: int  # 0 when unknown (cameras, streams)


def video_info(cap: cv2.VideoCapture, source: Source) -> VideoInfo:
    fps = cap.get(cv2.CAP_PROP_FPS)
    if not fps or fps != fps or fps <= 0 or fps > 1000:
        fps = DEFAULT_FPS
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if source.kind == "video" else 0
    return VideoInfo(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                     float(fps), max(count, 0))


def output_stem(source: Source) -> str:
    """bikes.mp4 -> bikes; camera 0 -> camera0; rtsp://host/live/cam1 -> cam1."""
    if source.kind == "video":
        return Path(source.location).stem
    if source.kind == "camera":
        return f"camera{source.location}"
    tail = source.location.split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tail).strip("._") or "stream"


class VideoFrames:
    """Iterates the readable frames of a capture; counts (and warns once about) unreadable ones.

    A failed read inside a file whose length is known is a damaged frame: it is skipped and the
    reading goes on; after MAX_FAILED_READS failures in a row the rest of the file counts as
    unreadable. For cameras and streams a failed read is the end.
    """

    def __init__(self, source: Source, info: VideoInfo, cap: cv2.VideoCapture, name: str,
                 out_stem: str) -> None:
        self.source, self.info, self.cap = source, info, cap
        self.name, self.out_stem = name, out_stem
        self.read = 0
        self.unreadable = 0

    def __iter__(self) -> Iterator[Frame]:
        position, failed_in_row = 0, 0
        total = self.info.frame_count if self.source.kind == "video" else 0
        try:
            while True:
                ok, image = self.cap.read()
                if ok and image is not None:
                    self.unreadable += failed_in_row
                    failed_in_row = 0
                    self.read += 1
                    yield Frame(image, self.name, self.out_stem, None, position)
                    position += 1
                    continue
                if not total or position >= total:
                    break
                failed_in_row += 1
                position += 1
                if failed_in_row >= MAX_FAILED_READS:
                    self.unreadable += failed_in_row + max(0, total - position)
                    failed_in_row = 0
                    break
        finally:
            self.unreadable += failed_in_row  # only counted while inside the known length
            if self.unreadable:
                warnings.warn(f"{self.name}: {self.unreadable} unreadable frame(s) skipped",
                              SourceWarning, stacklevel=2)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: OpenCV and FFmpeg print a screen of errors, below
    Python, for each codec a build lacks, which would bury detect's own lines."""
    with _STDERR_LOCK:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def codec_name(fourcc: str) -> str:
    """'H.264 (avc1)', 'MPEG-4 Part 2 (mp4v)': what a user needs to know of a fourcc."""
    return f"{CODEC_NAMES.get(fourcc, fourcc)} ({fourcc})"


def fourcc_candidates(path: Path) -> tuple[str, ...]:
    """The fourccs to try for `path`, best first; the last one is used without a trial."""
    return MP4_FOURCCS if path.suffix.lower() in MP4_SUFFIXES else (FOURCC,)


@lru_cache(maxsize=64)
def fourcc_writes(fourcc: str, size: tuple[int, int], suffix: str = ".mp4") -> bool:
    """True if this OpenCV build encodes `fourcc` at `size`: one black frame written to a
    temporary file and read back. isOpened() alone is not proof (an encoder can open and then
    write nothing), and some encoders refuse odd sizes, hence the size in the cache key."""
    with tempfile.TemporaryDirectory(prefix="detkit-codec-") as folder, quiet_stderr():
        path = str(Path(folder) / f"probe{suffix}")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), DEFAULT_FPS, size)
        if not writer.isOpened():
            return False
        writer.write(np.zeros((size[1], size[0], 3), np.uint8))
        writer.release()
        cap = cv2.VideoCapture(path)
        ok = cap.isOpened() and cap.read()[0]
        cap.release()
        return bool(ok)


def choose_fourcc(path: Path, size: tuple[int, int]) -> str:
    """The first of fourcc_candidates(path) this build writes at `size` (H.264 where it can)."""
    candidates = fourcc_candidates(path)
    for fourcc in candidates[:-1]:
        if fourcc_writes(fourcc, tuple(size), path.suffix.lower()):
            return fourcc
    return candidates[-1]


class VideoSink:
    """Annotated video at the input's size and frame rate; opened on the first frame.

    An mp4 is H.264 where the OpenCV build has an encoder, else mp4v; `fourcc` says which (the
    codec is chosen when the size is known, so the CLI can say it once). `close()` must run in a
    `finally`: releasing the writer finalises the container, which is what makes the file
    playable after Ctrl-C.
    """

    def __init__(self, path: Path, info: VideoInfo) -> None:
        self.path = path
        self.info = info
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        known = info.width > 0 and info.height > 0
        self.fourcc: str | None = choose_fourcc(path, (info.width, info.height)) if known else None

    def _open(self, image: np.ndarray) -> None:
        h, w = image.shape[:2]
        self._size = (self.info.width or w, self.info.height or h)
        self.fourcc = self.fourcc or choose_fourcc(self.path, self._size)
        writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*self.fourcc),
                                 self.info.fps, self._size)
        if not writer.isOpened():
            raise DetkitError(f"cannot write video {self.path} (OpenCV VideoWriter, "
                              f"{self.fourcc})")
        self._writer = writer

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            self._open(image)
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_LINEAR)
        self._writer.write(image)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def open_source_capture(source: Source) -> cv2.VideoCapture:
    """The capture opened while validating (cameras, streams) or a fresh one for files."""
    if source.capture is not None:
        cap, source.capture = source.capture, None
        return cap
    return open_capture(source.location)
