"""What `detkit detect` reads: images, folders, globs, .txt lists, videos, cameras, streams.

Every argument is resolved and checked before any work starts, so a typo fails in a second with
one line naming it instead of after an hour of video. Images are decoded later, in the reader
thread; one that cannot be decoded is warned about and skipped, never fatal.
"""

from __future__ import annotations

import glob
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ..errors import SourceError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
              ".pnm", ".jp2", ".jpe", ".dib", ".sr", ".ras", ".exr", ".hdr", ".pic"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
              ".ts", ".mts", ".m2ts", ".3gp", ".ogv", ".gif", ".asf", ".vob"}
LIST_EXTS = {".txt"}
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
GLOB_CHARS = set("*?[")

ImageInput = str | Path | np.ndarray


class SourceWarning(UserWarning):
    """A source problem that does not stop the run (an unreadable image or video frame)."""


@dataclass
class Source:
    """One thing to read. `kind` is image, video, camera or stream."""

    kind: str
    location: str            # file path, camera index or URL
    origin: str = ""         # the command-line argument it came from
    capture: object | None = field(default=None, repr=False)  # opened while validating

    @property
    def path(self) -> Path | None:
        return Path(self.location) if self.kind in ("image", "video") else None

    @property
    def is_video(self) -> bool:
        return self.kind in ("video", "camera", "stream")


def classify_file(path: Path) -> str | None:
    """image / video / list by extension (OpenCV decides by content later)."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in LIST_EXTS:
        return "list"
    return None


def images_in_folder(folder: Path, recursive: bool) -> list[Path]:
    """Image files in a folder, sorted by path; subfolders only with recursive."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_list_file(list_path: Path) -> list[Path]:
    """darknet-style list: one image path a line; relative paths are relative to the list file.

    Every listed file must exist: a list is usually a data set split, and a missing entry is a
    broken data set that should be reported with its line number, not silently skipped.
    """
    try:
        lines = list_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SourceError(f"cannot read list file {list_path}: {exc.strerror or exc}") from None
    paths = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line).expanduser()
        if not path.is_absolute():
            path = list_path.parent / path
        if not path.is_file():
            raise SourceError(f"{list_path}:{lineno}: image '{line}' not found")
        paths.append(path)
    if not paths:
        raise SourceError(f"list file {list_path} lists no images")
    return paths


@contextmanager
def quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's own multi-line logs while probing a capture: our SourceError says it."""
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is None:
        yield
        return
    level = logging_api.getLogLevel()
    logging_api.setLogLevel(logging_api.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        logging_api.setLogLevel(level)


def open_capture(location: str | int) -> cv2.VideoCapture:
    """cv2.VideoCapture for a file, camera index or URL; raises SourceError if it won't open."""
    with quiet_opencv():
        cap = cv2.VideoCapture(int(location) if str(location).isdigit() else str(location))
        opened = cap.isOpened()
    if not opened:
        cap.release()
        what = ("camera" if str(location).isdigit()
                else "stream" if URL_RE.match(str(location)) else "video")
        raise SourceError(f"cannot open {what} '{location}'")
    return cap


def _file_sources(path: Path, origin: str) -> list[Source]:
    kind = classify_file(path)
    if kind == "image":
        return [Source("image", str(path), origin)]
    if kind == "video":
        open_capture(str(path)).release()
        return [Source("video", str(path), origin)]
    if kind == "list":
        return [_image_or_video(p, origin) for p in read_list_file(path)]
    raise SourceError(f"'{path}' is not an image, a video or a .txt list (unknown extension "
                      f"'{path.suffix}')")


def _image_or_video(path: Path, origin: str) -> Source:
    kind = "video" if classify_file(path) == "video" else "image"
    if kind == "video":
        open_capture(str(path)).release()
    return Source(kind, str(path), origin)


def resolve_source(arg: str, recursive: bool = False) -> list[Source]:
    """One command-line argument -> the sources it names (validated, in order)."""
    path = Path(arg).expanduser()
    if URL_RE.match(arg):
        return [Source("stream", arg, arg)]
    if path.is_dir():
        images = images_in_folder(path, recursive)
        if not images:
            hint = "" if recursive else " (use --recursive for subfolders)"
            raise SourceError(f"no images in folder '{arg}'{hint}")
        return [Source("image", str(p), arg) for p in images]
    if path.is_file():
        return _file_sources(path, arg)
    if arg.isdigit():
        return [Source("camera", arg, arg)]
    if GLOB_CHARS & set(arg):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() and classify_file(p) in ("image", "video")]
        if not files:
            raise SourceError(f"no images or videos match '{arg}'")
        return [_image_or_video(p, arg) for p in files]
    if path.exists():
        raise SourceError(f"source '{arg}' is not a regular file or folder")
    raise SourceError(f"source '{arg}' not found")


def resolve_sources(args: list[str], recursive: bool = False) -> list[Source]:
    """All arguments -> validated sources, in argument order. Raises SourceError up front.

    Files first, then cameras and streams are opened (slow, and kept open for the run), so a
    typo in a file name never waits for a network timeout.
    """
    sources, problems = _resolve_arguments(args, recursive)
    if problems:
        raise SourceError(problems[0])
    _open_captures(sources, problems)
    if problems:
        release_sources(sources)
        raise SourceError(problems[0])
    return sources


def resolve_sources_skipping(args: list[str], recursive: bool = False
                             ) -> tuple[list[Source], list[str]]:
    """The CLI's rule for many sources: each argument that cannot be resolved (missing file,
    empty folder, unknown extension, camera or stream that will not open) is left out and
    reported, so one typo does not stop the others; (usable sources, one reason per argument
    left out). Files first, then captures are opened, as resolve_sources."""
    sources, problems = _resolve_arguments(args, recursive)
    return _open_captures(sources, problems), problems


def _resolve_arguments(args: list[str], recursive: bool) -> tuple[list[Source], list[str]]:
    if not args:
        raise SourceError("no source given")
    sources: list[Source] = []
    problems: list[str] = []
    for arg in args:
        try:
            sources.extend(resolve_source(arg, recursive))
        except SourceError as exc:
            problems.append(str(exc))
    return sources, problems


def _open_captures(sources: list[Source], problems: list[str]) -> list[Source]:
    """Open the cameras and streams; those that will not open are left out, their reason
    appended to `problems`. The sources that are ready."""
    ready = []
    for source in sources:
        if source.kind in ("camera", "stream"):
            try:
                source.capture = open_capture(source.location)
            except SourceError as exc:
                problems.append(str(exc))
                continue
        ready.append(source)
    return ready


def release_sources(sources: list[Source]) -> None:
    """Close captures opened while validating (cameras, streams) that were never used."""
    for source in sources:
        if source.capture is not None:
            source.capture.release()
            source.capture = None


def read_image(path: str | Path) -> np.ndarray | None:
    """Decode an image as BGR uint8 (3 channels); None if it cannot be read or decoded.

    np.fromfile + imdecode instead of imread: it copes with non-ASCII paths everywhere.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def read_image_or_raise(path: str | Path) -> np.ndarray:
    """read_image for the Python API: a bad path is an error, not a warning."""
    if not Path(path).is_file():
        raise SourceError(f"image '{path}' not found")
    image = read_image(path)
    if image is None:
        raise SourceError(f"cannot decode image '{path}'")
    return image


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Accept gray (H, W), BGR (H, W, 3) or BGRA (H, W, 4) uint8 arrays; return BGR uint8."""
    if not isinstance(image, np.ndarray):
        raise SourceError(f"expected a path or a numpy BGR image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise SourceError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    raise SourceError(f"expected an (H, W, 3) BGR image, got shape {image.shape}")


def warn_unreadable_image(path: str | Path) -> None:
    warnings.warn(f"cannot read image '{path}' (skipped)", SourceWarning, stacklevel=2)
