"""Where detection results go: run folders, annotated files, COCO JSON and YOLO label files."""

from __future__ import annotations

import json
import re
import tempfile
import threading
from pathlib import Path

from ..atomic import NotRegularFile, atomic_write_bytes, write_target
from ..errors import DetkitError
from .predict import Detection

# darknet examples/detector.c coco_ids: COCO's 91-id numbering of its 80 detection classes.
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
            27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51,
            52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76,
            77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


def next_run_dir(base: str | Path = "runs/detect", name: str = "exp") -> Path:
    """Create and return a new numbered folder base/exp, exp2, exp3...: never an earlier run's.

    mkdir without exist_ok is the atomic claim, so two runs started together get two folders.
    """
    base = Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DetkitError(f"cannot create output folder {base}: {exc.strerror or exc}") from None
    taken = [p.name for p in base.iterdir()] if base.is_dir() else []
    numbers = [int(m.group(1) or 1) for n in taken if (m := re.fullmatch(rf"{name}(\d*)", n))]
    n = max(numbers, default=0) + 1
    while True:
        candidate = base / (name if n == 1 else f"{name}{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as exc:
            raise DetkitError(f"cannot create output folder {candidate}: "
                              f"{exc.strerror or exc}") from None


def check_writable_dir(folder: Path, what: str = "--out") -> bool:
    """Create `folder` if needed and prove a file can be written there; True if it was created.

    Done before any work so an unwritable destination fails at once with one line.
    """
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".detkit-write-test-"):
            pass
    except OSError as exc:
        raise DetkitError(f"{what} {folder} is not writable: {exc.strerror or exc}") from None
    return created


def check_writable_file(path: Path, what: str = "--save-json") -> None:
    """Before any work: the file's folder must exist (or be creatable) and be writable, and the
    path must be a regular file or nothing (a symlink counts as its target; see detkit.atomic)."""
    try:
        target, _ = write_target(path)
    except NotRegularFile as exc:
        raise DetkitError(f"{what} {path} is {exc.strerror}") from None
    check_writable_dir(target.parent if str(target.parent) else Path("."), what)


def atomic_write_text(path: Path, text: str, what: str = "output") -> None:
    """Write whole or not at all, keeping the old file's mode (detkit.atomic); a failure (disk
    full at the target, a path that turned into a FIFO) is one clear error."""
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as exc:
        raise DetkitError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None


OUTPUTS_MANIFEST = ".detkit-outputs"


class UniqueNames:
    """Output file names, deduplicated: a/x.jpg and b/x.jpg become x.jpg and x_2.jpg.

    With a `folder`, a stem is also taken when a file of that stem (any of `suffixes`, or
    labels/<stem>.txt) is already there and detkit did not write it: the user's own dog.jpg in
    an --out folder is never overwritten. What detkit writes is listed in the folder's
    .detkit-outputs, so a second run into the same folder replaces its own earlier results.
    """

    def __init__(self, folder: Path | None = None, suffixes: tuple[str, ...] = ()) -> None:
        self._used: set[str] = set()
        self._lock = threading.Lock()
        self.folder = folder
        self.suffixes = suffixes
        self._ours = self._read_manifest()

    def _read_manifest(self) -> set[str]:
        if self.folder is None:
            return set()
        try:
            return set((self.folder / OUTPUTS_MANIFEST).read_text(encoding="utf-8").splitlines())
        except OSError:
            return set()

    def _someone_elses(self, stem: str) -> bool:
        if self.folder is None:
            return False
        names = [f"{stem}{suffix}" for suffix in self.suffixes] + [f"labels/{stem}.txt"]
        return any(name not in self._ours and (self.folder / name).exists() for name in names)

    def claim(self, stem: str, suffix: str) -> str:
        with self._lock:
            candidate, n = stem, 1
            while f"{candidate}{suffix}".lower() in self._used or self._someone_elses(candidate):
                n += 1
                candidate = f"{stem}_{n}"
            self._used.add(f"{candidate}{suffix}".lower())
            return f"{candidate}{suffix}"

    def record(self, name: str) -> None:
        """`name` (relative to the folder) was written by detkit: later runs may replace it."""
        if self.folder is None:
            return
        with self._lock:
            if name in self._ours:
                return
            self._ours.add(name)
            with open(self.folder / OUTPUTS_MANIFEST, "a", encoding="utf-8") as manifest:
                manifest.write(name + "\n")


def image_id_for(stem: str, running_index: int) -> int:
    """COCO image_id: the file name's number (000000397133.jpg -> 397133), else the running index."""
    return int(stem) if stem.isdigit() else running_index


class CocoJsonWriter:
    """Collects detections in COCO results format and writes them (atomically) at the end.

    category_id is COCO's 91-numbering so the file evaluates directly against COCO annotations:
    darknet's coco_ids for 80 classes, index + 1 for torchvision's 90 (class 0 = id 1, person);
    otherwise it is the class index.
    """

    def __init__(self, path: Path, num_classes: int) -> None:
        self.path = path
        self.coco_ids = COCO_IDS if num_classes == 80 else tuple(range(1, 91)) if num_classes == 90 else None
        self.records: list[dict] = []

    def category_id(self, class_id: int) -> int:
        return self.coco_ids[class_id] if self.coco_ids else class_id

    def add(self, image_id: int, detections: list[Detection]) -> None:
        for det in detections:
            x, y, w, h = det.xywh
            self.records.append({"image_id": image_id, "category_id": self.category_id(det.class_id),
                                 "bbox": [round(x, 3), round(y, 3), round(w, 3), round(h, 3)],
                                 "score": round(det.score, 5)})

    def close(self) -> None:
        atomic_write_text(self.path, json.dumps(self.records), "--save-json")


def yolo_label_lines(detections: list[Detection], img_w: int, img_h: int,
                     save_conf: bool = False) -> str:
    """YOLO label text, one `cls cx cy w h` line per box, normalised to the image.

    Five columns, as ultralytics' --save-txt, so the files read back as training labels;
    `save_conf` appends the score as a sixth column (ultralytics' --save-conf).
    """
    lines = []
    for det in detections:
        x1, y1, x2, y2 = det.box
        cx, cy = (x1 + x2) / 2 / img_w, (y1 + y2) / 2 / img_h
        w, h = (x2 - x1) / img_w, (y2 - y1) / img_h
        score = f" {det.score:.5f}" if save_conf else ""
        lines.append(f"{det.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}{score}\n")
    return "".join(lines)
