"""Label problems: collected while a data set is read, summarised once, fatal only on request.

A data set of thousands of images with three bad lines should not stop at the first one (the
user fixes one line, reruns, finds the next) nor lose them silently. Readers record every
problem as a `Problem` (file, line where there is one, kind, message), drop what cannot be used
(a bad box, a line, an image without labels) and keep the rest; `summarize` turns the list into
one message: the counts per kind, then the first few problems with file:line.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Kinds of problem. A label line or annotation that cannot be parsed at all:
MALFORMED = "malformed label"
# Finite numbers that do not make a box: out of range, zero or negative size, inverted corners:
BAD_BOX = "bad box"
UNKNOWN_CLASS = "unknown class"
MISSING_LABELS = "missing label file"
UNREADABLE_LABELS = "unreadable label file"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
KINDS = (MALFORMED, BAD_BOX, UNKNOWN_CLASS, MISSING_LABELS, UNREADABLE_LABELS, MISSING_IMAGE,
         UNREADABLE_IMAGE)

# A normalised coordinate this far outside [0, 1] is certainly wrong (pixels, or a wrong
# column); within it, it is rounding or a box drawn to the image edge.
NORMALISED_SLACK = 0.01


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a data set. line: 1-based, or None where the file has no lines to
    point at (an XML object, a JSON annotation: the message then says which one)."""

    file: str
    line: int | None
    kind: str
    message: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"

    def to_json(self) -> list:
        return [self.file, self.line, self.kind, self.message]

    @classmethod
    def from_json(cls, row: Sequence) -> Problem:
        """The inverse of to_json; ValueError on anything else (a damaged cache)."""
        file, line, kind, message = row
        if not (isinstance(file, str) and isinstance(message, str) and kind in KINDS
                and (line is None or isinstance(line, int))):
            raise ValueError(f"not a problem record: {row!r}")
        return cls(file, line, kind, message)


def summarize(problems: Sequence[Problem], source: Path | str, limit: int = 10) -> str:
    """One message for all problems: a header with the count per kind, then the first `limit`
    problems (file:line: message), one an indented line."""
    if not problems:
        return f"{source}: no label problems"
    counts = Counter(p.kind for p in problems)
    kinds = ", ".join(f"{kind} {counts[kind]}" for kind in KINDS if counts[kind])
    noun = "problem" if len(problems) == 1 else "problems"
    lines = [f"{len(problems)} label {noun} in {source} ({kinds}):"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def summarize_line(problems: Sequence[Problem], source: Path | str) -> str:
    """The summary's header and first problem on one line: what a fatal error prints (the CLI
    shows errors as one line; the full list goes to the log)."""
    header = summarize(problems, source, limit=0).splitlines()[0].rstrip(":")
    return f"{header}; the first: {problems[0]}" if problems else header


def box_problem(values: Sequence[float]) -> str | None:
    """Why normalised ``cx, cy, w, h`` is not a usable box, or None. Used by every format after
    its own conversion, so that one rule (AlexeyAB's loader, with a little slack) holds."""
    if not all(math.isfinite(v) for v in values):
        return f"non-finite coordinate {list(values)}"
    _, _, w, h = values
    if w <= 0 or h <= 0:
        return f"box of zero or negative size (w {w:g}, h {h:g})"
    if min(values) < -NORMALISED_SLACK or max(values) > 1 + NORMALISED_SLACK:
        return (f"coordinates {[round(v, 6) for v in values]} are not normalised to [0, 1] "
                f"(cx cy w h as fractions of the image size)")
    return None


def image_problem(path: Path) -> tuple[str, str] | None:
    """(kind, message) when `path` is not an image OpenCV can open, else None.

    Cheap on purpose: a stat, then OpenCV's own signature check (cv2.haveImageReader reads the
    header only, a few microseconds), not a decode. It catches missing, empty and non-image
    files (an HTML error page saved as .jpg); a truncated image body is found at load time.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return MISSING_IMAGE, f"image {path} not found"
    if size == 0:
        return UNREADABLE_IMAGE, f"image {path} is an empty file"
    import cv2

    if not cv2.haveImageReader(str(path)):
        return UNREADABLE_IMAGE, f"image {path} is not an image OpenCV can read"
    return None
