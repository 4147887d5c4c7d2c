"""Read detection labels from every data-set format detkit supports into one shape.

`read_dataset(path)` accepts:

* a darknet ``.data`` file: its ``train=`` (or ``valid=``) image list, ``names=`` and
  ``classes=``; each image's labels come from darknet's path rule (see `darknet_label_path`);
* a darknet image list (``.txt``, one image path a line);
* a folder of YOLO ``.txt`` label files (``cls cx cy w h`` normalised; ``classes.txt`` or a
  ``.names`` file beside them gives the names);
* a Pascal VOC ``.xml`` file, or a folder of them (or a VOC root with ``Annotations/``);
* a COCO ``.json`` file.

Every format becomes a `Dataset` of `Item`s whose boxes are ``cx, cy, w, h`` normalised to their
image, so anchors, training and evaluation never care where labels came from.

Labels are validated as they are read. A bad label (a malformed line, an unknown class, a box out
of range, of zero size or inverted), a missing label file and a missing or unreadable image is
recorded as a `Problem` (file, line, kind, message) in `Dataset.problems`; the bad boxes are
dropped and the rest of the image kept. `read_dataset` logs one summary of all of them as a
warning, or with ``strict=True`` raises one `DataError` carrying that summary. A file that makes
the whole data set unreadable (a .data file, an image list, a COCO JSON) still raises at once.
An image whose label file is empty is a valid negative. Darknet image lists and YOLO label
folders are cached once validated (see `label_cache`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from .label_cache import cache_key, file_state, label_state, read_cache, write_cache
from .problems import (
    BAD_BOX,
    MALFORMED,
    MISSING_IMAGE,
    MISSING_LABELS,
    UNKNOWN_CLASS,
    UNREADABLE_LABELS,
    Problem,
    box_problem,
    image_problem,
    summarize,
    summarize_line,
)

log = logging.getLogger("detkit")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NAME_FILES = ("classes.txt", "obj.names", "classes.names")
LIST_CACHE_SUFFIX = ".cache"       # train.txt -> train.txt.cache
FOLDER_CACHE_NAME = "labels.cache"  # a YOLO label folder's cache, inside it


@dataclass
class Item:
    """One image and its boxes.

    boxes: (N, 4) float32 cx, cy, w, h normalised to the image; classes: (N,) int64;
    difficult: (N,) bool (VOC <difficult>, COCO iscrowd; always False for YOLO labels).
    image: the image file, or None when it cannot be found (labels alone are enough for anchors).
    source: the annotation file the boxes came from.
    """

    image: Path | None
    boxes: np.ndarray
    classes: np.ndarray
    difficult: np.ndarray
    source: Path

    def __len__(self) -> int:
        return len(self.classes)


@dataclass
class Dataset:
    """Items in a stable order, the class names (index = class id) and where they were read.

    problems: everything wrong that was found and left out while reading (see `summary`).
    """

    items: list[Item]
    names: list[str]
    source: Path
    missing_images: int = field(default=0)
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def boxes(self, include_difficult: bool = True) -> np.ndarray:
        """All boxes, (N, 4) cx, cy, w, h normalised, concatenated over the items."""
        parts = [it.boxes if include_difficult else it.boxes[~it.difficult] for it in self.items]
        return np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)

    def summary(self, limit: int = 10) -> str:
        """All problems in one message: counts per kind, then the first `limit` with file:line
        (one message, so a thousand bad lines do not bury the log)."""
        return summarize(self.problems, self.source, limit)


def read_dataset(path: str | Path, *, split: str = "train", names: Sequence[str] | None = None,
                 missing_labels: str = "error", progress: bool = False,
                 strict: bool = False) -> Dataset:
    """Read any supported data set (see the module docstring) into a Dataset.

    split: which list of a ``.data`` file (``train`` or ``valid``). names: class names to use
    instead of the data set's own (VOC names must then all be in it). missing_labels: for image
    lists, ``error`` (darknet's behaviour, the usual cause of "Couldn't open file" at training
    time: the image is reported and left out) or ``empty`` (an image without a label file has
    no boxes, as AlexeyAB allows). strict: any problem raises one DataError with the summary;
    otherwise the summary is logged once as a warning and the bad parts are left out.
    """
    path = Path(path)
    if missing_labels not in ("error", "empty"):
        raise ValueError(f"missing_labels={missing_labels!r}: use 'error' or 'empty'")
    dataset = _read_any(path, split, names, missing_labels, progress)
    if dataset.problems:
        if strict:
            log.error("%s", dataset.summary())
            raise DataError(summarize_line(dataset.problems, dataset.source))
        log.warning("%s\nBad lines and boxes were dropped (the rest of each image kept), images "
                    "without labels left out; strict mode makes any problem an error.",
                    dataset.summary())
    return dataset


def _read_any(path: Path, split: str, names: Sequence[str] | None, missing_labels: str,
              progress: bool) -> Dataset:
    if path.is_dir():
        return _read_folder(path, names, progress)
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".data":
        return read_darknet_data(path, split=split, names=names, missing_labels=missing_labels,
                                 progress=progress)
    if suffix == ".json":
        return read_coco(path, names=names)
    if suffix == ".xml":
        return read_voc([path], path, names=names)
    if suffix in (".txt", ".list"):
        return read_image_list(path, names=list(names) if names else [],
                               missing_labels=missing_labels, progress=progress)
    raise DataError(f"{path}: unknown data set format (expected .data, .txt image list, .xml, "
                    f".json or a folder)")


# --------------------------------------------------------------------------- darknet / YOLO


def darknet_label_path(image: str) -> str:
    """darknet's fill_truth_detection rule: the first "images", "JPEGImages" and "raw" each
    become "labels", then the first ".jpg", ".png", ".JPG", ".JPEG" becomes ".txt". A path still
    not ending in .txt (another image type) gets its suffix replaced, as AlexeyAB does."""
    out = image
    for old, new in (("images", "labels"), ("JPEGImages", "labels"), ("raw", "labels"),
                     (".jpg", ".txt"), (".png", ".txt"), (".JPG", ".txt"), (".JPEG", ".txt")):
        out = out.replace(old, new, 1)
    root, ext = os.path.splitext(out)
    return out if ext == ".txt" else root + ".txt"


def read_darknet_data(path: Path, *, split: str = "train", names: Sequence[str] | None = None,
                      missing_labels: str = "error", progress: bool = False) -> Dataset:
    """A darknet .data file: key = value lines (``#`` comments), as read_data_cfg reads them."""
    options = _read_data_options(path)
    if split not in options:
        raise DataError(f"{path}: no '{split}=' line (the image list to read)")
    list_value, list_line = options[split]
    list_path = _resolve_existing(list_value, [path.parent, Path.cwd()])
    if list_path is None:
        raise DataError(f"{path}:{list_line}: {split} list '{list_value}' not found (looked next "
                        f"to {path.name} and in the current folder)")
    class_names = list(names) if names else _data_names(path, options)
    count = _data_class_count(path, options, class_names)
    dataset = read_image_list(list_path, names=class_names, missing_labels=missing_labels,
                              bases=[path.parent, list_path.parent], progress=progress,
                              class_count=count)
    dataset.source = path
    return dataset


def _read_data_options(path: Path) -> dict[str, tuple[str, int]]:
    options: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise DataError(f"{path}:{number}: expected 'key = value', got '{line.strip()}'")
        options[key.strip()] = (value.strip(), number)
    return options


def _data_names(path: Path, options: dict[str, tuple[str, int]]) -> list[str]:
    if "names" not in options:
        return []
    value, number = options["names"]
    names_path = _resolve_existing(value, [path.parent, Path.cwd()])
    if names_path is None:
        raise DataError(f"{path}:{number}: names file '{value}' not found")
    return read_names(names_path)


def _data_class_count(path: Path, options: dict[str, tuple[str, int]], names: list[str]) -> int:
    if "classes" not in options:
        return len(names)
    value, number = options["classes"]
    try:
        count = int(value)
    except ValueError:
        raise DataError(f"{path}:{number}: classes={value} is not an integer") from None
    if names and count != len(names):
        raise DataError(f"{path}:{number}: classes={count} but the names file has "
                        f"{len(names)} names")
    return count


def read_names(path: Path) -> list[str]:
    """A class-names file: one name a line (darknet's get_labels); blank lines are ignored."""
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def read_image_list(path: Path, *, names: list[str], missing_labels: str = "error",
                    bases: Sequence[Path] | None = None, progress: bool = False,
                    class_count: int | None = None, cache: bool = True) -> Dataset:
    """A darknet image list: one image path a line; labels by `darknet_label_path`.

    A relative path is tried against each of `bases` (default: the list's folder) and finally
    the current folder, where darknet itself resolves it; the first base where the image or its
    label file exists wins. The validated result is cached next to the list (`label_cache`);
    cache=False neither reads nor writes it.
    """
    bases = list(bases) if bases else [path.parent]
    count = class_count if class_count is not None else len(names)
    entries = [(number, entry, *_locate(entry, bases)) for number, entry in _list_entries(path)]
    key = cache_key(["image list", str(path), count, missing_labels,
                     [[n, e, file_state(i), label_state(lb)] for n, e, i, lb in entries]])
    cache_file = path.with_name(path.name + LIST_CACHE_SUFFIX) if cache else None
    items, problems = _cached(cache_file, key, lambda: _parse_list(
        path, entries, count, missing_labels, bases, progress))
    return _dataset(items, names, path, problems)


def _list_entries(path: Path) -> list[tuple[int, str]]:
    """(line number, image path) for each non-blank, non-comment line."""
    lines = ((number, line.strip()) for number, line in enumerate(
        _read_text(path).splitlines(), 1))
    return [(number, entry) for number, entry in lines if entry and not entry.startswith("#")]


def _parse_list(path: Path, entries: list, count: int, missing_labels: str,
                bases: Sequence[Path], progress: bool) -> tuple[list[Item], list[Problem]]:
    """Items and problems of a located image list: an entry without a label file is a problem
    (and left out) unless missing_labels='empty' makes it a negative."""
    items, problems = [], []
    for number, entry, image, label in tqdm(entries, desc="labels", disable=not progress):
        if label is None and missing_labels == "error":
            looked = "" if os.path.isabs(entry) else (
                " under " + ", ".join(dict.fromkeys(str(b) for b in [*bases, Path.cwd()])))
            problems.append(Problem(str(path), number, MISSING_LABELS,
                                    f"no label file {darknet_label_path(entry)} for image "
                                    f"{entry}{looked} (darknet's rule: images/ or JPEGImages/ "
                                    f"-> labels/, image suffix -> .txt)"))
            continue
        boxes, classes = read_yolo_labels(label, count, problems) if label else ([], [])
        image = _checked_image(image, problems, str(path), number)
        items.append(_item(image, boxes, classes, [False] * len(classes), label or path))
    return items, problems


def _locate(entry: str, bases: Sequence[Path]) -> tuple[Path, Path | None]:
    """(image, label file or None) for one list entry, trying each base for relative paths."""
    label_rel = darknet_label_path(entry)
    if os.path.isabs(entry):
        label = Path(label_rel)
        return Path(entry), label if label.is_file() else None
    for base in [*bases, Path.cwd()]:
        image, label = base / entry, base / label_rel
        if label.is_file():
            return image, label
        if image.exists():
            return image, None
    return bases[0] / entry, None


def read_yolo_labels(path: Path, class_count: int = 0, problems: list[Problem] | None = None
                     ) -> tuple[list[list[float]], list[int]]:
    """One YOLO label file: ``cls cx cy w h`` a line (a 6th column, a score, is ignored).

    Checked like AlexeyAB's loader: an integer class (below `class_count` when known), finite
    coordinates within [0, 1] (a little slack), and a positive size. A bad line is appended to
    `problems` and left out, the other lines kept; without a `problems` list, any bad line
    raises DataError (a lone file has no data set to report to). An empty file is a valid
    negative: no boxes.
    """
    found: list[Problem] = [] if problems is None else problems
    first = len(found)
    boxes, classes = [], []
    for number, line in enumerate((_label_text(path, found) or "").splitlines(), 1):
        row = _yolo_row(line, str(path), number, class_count, found)
        if row is not None:
            classes.append(row[0])
            boxes.append(row[1])
    if problems is None and len(found) > first:
        raise DataError(summarize(found, path))
    return boxes, classes


def _yolo_row(line: str, file: str, number: int, class_count: int,
              problems: list[Problem]) -> tuple[int, list[float]] | None:
    """(class, cx cy w h) of one label line, or None (blank, or a problem recorded)."""
    fields = line.split()
    if not fields:
        return None
    kind, message = MALFORMED, None
    if len(fields) not in (5, 6):
        message = f"expected 'class cx cy w h', got {len(fields)} fields"
    elif not _is_int(fields[0]):
        message = f"class '{fields[0]}' is not an integer"
    elif not all(_is_float(v) for v in fields[1:5]):
        message = f"'{line.strip()}' has a non-numeric coordinate"
    else:
        cls, values = int(fields[0]), [float(v) for v in fields[1:5]]
        if cls < 0 or (class_count and cls >= class_count):
            kind, message = UNKNOWN_CLASS, (f"class {cls} is outside 0..{class_count - 1}"
                                            if class_count else f"class {cls} is negative")
        elif (bad := box_problem(values)) is not None:
            kind, message = BAD_BOX, bad
        else:
            return cls, values
    problems.append(Problem(file, number, kind, message))
    return None


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_folder(path: Path, names: Sequence[str] | None, progress: bool) -> Dataset:
    """A folder: VOC (Annotations/ or *.xml) or YOLO label files (*.txt)."""
    annotations = path / "Annotations"
    if annotations.is_dir() and any(annotations.glob("*.xml")):
        return read_voc(sorted(annotations.glob("*.xml")), path, names=names)
    xmls = sorted(path.glob("*.xml"))
    if xmls:
        return read_voc(xmls, path, names=names)
    texts = sorted(p for p in path.glob("*.txt") if p.name not in NAME_FILES)
    if texts:
        return read_yolo_folder(path, texts, names, progress)
    raise DataError(f"{path}: no .xml (Pascal VOC) or .txt (YOLO) label files in this folder")


def read_yolo_folder(path: Path, labels: Iterable[Path], names: Sequence[str] | None = None,
                     progress: bool = False, cache: bool = True) -> Dataset:
    """YOLO label files in one folder; the image is the same stem beside it or in ../images.

    An image that is not there is no problem here (labels alone are enough for anchors; nothing
    named it), one that is there but unreadable is. Cached in the folder like an image list.
    """
    class_names = list(names) if names else _folder_names(path)
    pairs = [(label, _image_beside(label)) for label in labels]
    key = cache_key(["yolo folder", len(class_names),
                     [[label_state(label), file_state(image)] for label, image in pairs]])
    cache_file = path / FOLDER_CACHE_NAME if cache else None
    items, problems = _cached(cache_file, key, lambda: _parse_folder(pairs, len(class_names),
                                                                     progress))
    return _dataset(items, class_names, path, problems)


def _parse_folder(pairs: list[tuple[Path, Path | None]], count: int,
                  progress: bool) -> tuple[list[Item], list[Problem]]:
    items, problems = [], []
    for label, image in tqdm(pairs, desc="labels", disable=not progress):
        boxes, classes = read_yolo_labels(label, count, problems)
        if image is not None:
            image = _checked_image(image, problems, str(image), None)
        items.append(_item(image, boxes, classes, [False] * len(classes), label))
    return items, problems


def _folder_names(path: Path) -> list[str]:
    for folder in (path, path.parent):
        for name in NAME_FILES:
            if (folder / name).is_file():
                return read_names(folder / name)
        found = sorted(folder.glob("*.names"))
        if found:
            return read_names(found[0])
    return []


def _image_beside(label: Path) -> Path | None:
    folders = [label.parent]
    if label.parent.name == "labels":
        folders.append(label.parent.parent / "images")
    for folder in folders:
        for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
            candidate = folder / (label.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


# --------------------------------------------------------------------------- Pascal VOC


def read_voc(files: Sequence[Path], source: Path, names: Sequence[str] | None = None) -> Dataset:
    """Pascal VOC XML files. Boxes are converted as darknet's scripts/voc_label.py does
    (1-based pixel corners: cx = ((xmin + xmax)/2 - 1)/width, w = (xmax - xmin)/width).

    Without `names`, the classes are the sorted set of object names (for VOC itself that is the
    order of voc.names). Difficult objects are kept and flagged. A file that cannot be read or
    has no usable <size> is left out; a bad object (no name, a missing or inverted corner, an
    unknown name) is dropped from its image. Problems name the object (XML has no line
    numbers here), except an XML syntax error, which has one.
    """
    problems: list[Problem] = []
    parsed = [(path, _parse_voc(path, problems)) for path in files]
    parsed = [(path, found) for path, found in parsed if found is not None]
    class_names = list(names) if names else sorted(
        {obj[1] for _, (_, _, objects) in parsed for obj in objects})
    index = {name: i for i, name in enumerate(class_names)}
    items = [_voc_item(path, found, index, problems) for path, found in parsed]
    return _dataset(items, class_names, source, problems)


class _Skip(Exception):
    """A part of an annotation file that is left out: kind and message for its Problem."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _parse_voc(path: Path, problems: list[Problem]):
    """(filename, (width, height), [(k, name, difficult, corners)]) or None (file left out)."""
    text = _label_text(path, problems)
    if text is None:
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        problems.append(Problem(str(path), exc.position[0] or None, UNREADABLE_LABELS,
                                f"not valid XML ({exc})"))
        return None
    try:
        size = (_voc_number(root, "size/width"), _voc_number(root, "size/height"))
    except _Skip as exc:
        problems.append(Problem(str(path), None, exc.kind, str(exc)))
        return None
    if min(size) <= 0:
        problems.append(Problem(str(path), None, MALFORMED, "<size> width and height must be "
                                "positive (needed to normalise the boxes)"))
        return None
    objects = []
    for k, obj in enumerate(root.iter("object"), 1):
        try:
            objects.append(_voc_object(k, obj))
        except _Skip as exc:
            problems.append(Problem(str(path), None, exc.kind, str(exc)))
    return (root.findtext("filename") or "").strip(), size, objects


def _voc_object(k: int, obj) -> tuple[int, str, bool, tuple[float, ...]]:
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise _Skip(MALFORMED, f"object {k} has no <name>")
    where = f"object {k} ({name})"
    corners = tuple(_voc_number(obj, f"bndbox/{t}", where) for t in ("xmin", "ymin", "xmax",
                                                                       "ymax"))
    if corners[2] <= corners[0] or corners[3] <= corners[1]:
        raise _Skip(BAD_BOX, f"{where}: inverted or empty box {corners} (xmax <= xmin or "
                             f"ymax <= ymin)")
    hard = (obj.findtext("difficult") or "0").strip() not in ("0", "")
    return k, name, hard, corners


def _voc_number(node, tag: str, where: str | None = None) -> float:
    prefix = f"{where}: " if where else ""
    text = node.findtext(tag)
    if text is None:
        raise _Skip(MALFORMED, f"{prefix}missing <{tag.replace('/', '><')}>")
    try:
        value = float(text)
    except ValueError:
        raise _Skip(MALFORMED, f"{prefix}<{tag}> '{text.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise _Skip(BAD_BOX, f"{prefix}<{tag}> is not finite")
    return value


def _voc_item(path: Path, parsed, index: dict[str, int], problems: list[Problem]) -> Item:
    """One VOC file's item: objects with an unknown name or a box out of range are dropped."""
    filename, (width, height), objects = parsed
    boxes, classes, difficult = [], [], []
    for k, name, hard, (x1, y1, x2, y2) in objects:
        box = [((x1 + x2) / 2 - 1) / width, ((y1 + y2) / 2 - 1) / height,
               (x2 - x1) / width, (y2 - y1) / height]
        if name not in index:
            problems.append(Problem(str(path), None, UNKNOWN_CLASS,
                                    f"object {k} '{name}' is not one of the class names"))
        elif (bad := box_problem(box)) is not None:
            problems.append(Problem(str(path), None, BAD_BOX, f"object {k} ({name}): {bad}"))
        else:
            boxes.append(box)
            classes.append(index[name])
            difficult.append(hard)
    image = _voc_image(path, filename)
    if image is None:
        problems.append(Problem(str(path), None, MISSING_IMAGE,
                                f"image '{filename}' not found beside it or in ../JPEGImages or "
                                f"../images" if filename else "no <filename> (the image)"))
    else:
        image = _checked_image(image, problems, str(path), None)
    return _item(image, boxes, classes, difficult, path)


def _voc_image(path: Path, filename: str) -> Path | None:
    if not filename:
        return None
    for folder in (path.parent, path.parent.parent / "JPEGImages", path.parent.parent / "images"):
        if (folder / filename).is_file():
            return folder / filename
    return None


# --------------------------------------------------------------------------- COCO


def read_coco(path: Path, names: Sequence[str] | None = None) -> Dataset:
    """A COCO instances JSON. Categories sorted by id become classes 0..K-1 (so COCO's 91-id
    space maps to darknet's 80); iscrowd boxes are kept and flagged difficult; every image is an
    item, with or without annotations. A file that is not COCO raises; a bad image record is
    left out with its annotations, a bad annotation is dropped (problems name ``images[k]`` or
    ``annotations[k]``: JSON has no useful line numbers)."""
    data = _coco_json(path)
    category_index, category_names = _coco_categories(path, data["categories"])
    class_names = list(names) if names else category_names
    problems: list[Problem] = []
    images: dict = {}
    skipped: set = set()
    for k, image in enumerate(data["images"]):
        _coco_image(path, k, image, images, skipped, problems)
    for k, ann in enumerate(data["annotations"]):
        _coco_annotation(path, k, ann, images, skipped, category_index, problems)
    roots = _coco_image_roots(path)
    items = [_item(_coco_image_file(path, k, roots, file_name, problems),
                   [b for b, _, _ in anns], [c for _, c, _ in anns], [d for _, _, d in anns], path)
             for k, file_name, _, _, anns in images.values()]
    return _dataset(items, class_names, path, problems)


def _coco_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list (not a COCO instances file)")
    return data


def _coco_categories(path: Path, categories: list) -> tuple[dict, list[str]]:
    """{category id: class index} and the names, by id; a category without an id is fatal
    (every class index after it would shift)."""
    try:
        ordered = sorted(categories, key=lambda c: c["id"])
    except (KeyError, TypeError):
        raise DataError(f"{path}: every entry of 'categories' needs a comparable 'id'") from None
    return ({c["id"]: i for i, c in enumerate(ordered)},
            [str(c.get("name", c["id"])) for c in ordered])


def _coco_image(path: Path, k: int, image, images: dict, skipped: set,
                problems: list[Problem]) -> None:
    """Record images[k] as (k, file_name, width, height, annotations), or report it."""
    try:
        record = (k, str(image["file_name"]), float(image["width"]), float(image["height"]), [])
        image_id = image["id"]
        hash(image_id)
    except (KeyError, TypeError, ValueError):
        problems.append(Problem(str(path), None, MALFORMED,
                                f"images[{k}] needs id, file_name, width and height"))
        return
    if not (record[2] > 0 and record[3] > 0):
        problems.append(Problem(str(path), None, MALFORMED,
                                f"images[{k}] (id {image_id}) has a non-positive size"))
        skipped.add(image_id)
        return
    images[image_id] = record


def _coco_annotation(path: Path, k: int, ann, images: dict, skipped: set,
                     category_index: dict, problems: list[Problem]) -> None:
    """Append annotations[k] to its image as (box, class, iscrowd), or report why not."""
    ann = ann if isinstance(ann, dict) else {}
    where = f"annotations[{k}] (id {ann.get('id', '?')})"
    image_id, category_id = ann.get("image_id"), ann.get("category_id")
    try:
        if not isinstance(image_id, Hashable) or image_id not in images:
            if isinstance(image_id, Hashable) and image_id in skipped:
                return  # its image was reported already
            raise _Skip(MALFORMED, f"image_id {image_id} is not in 'images'")
        if not isinstance(category_id, Hashable) or category_id not in category_index:
            raise _Skip(UNKNOWN_CLASS, f"category_id {category_id} is not in 'categories'")
        _, _, width, height, anns = images[image_id]
        box = _coco_box(ann.get("bbox"), width, height)
    except _Skip as exc:
        problems.append(Problem(str(path), None, exc.kind, f"{where}: {exc}"))
        return
    anns.append((box, category_index[category_id], bool(ann.get("iscrowd", 0))))


def _coco_box(bbox, width: float, height: float) -> list[float]:
    """COCO's [x, y, w, h] in pixels as normalised cx, cy, w, h; _Skip when it is not a box."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise _Skip(MALFORMED, "bbox must be [x, y, width, height]") from None
    box = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
    bad = box_problem(box)
    if bad is not None:
        raise _Skip(BAD_BOX, f"bbox {bbox}: {bad}")
    return box


def _coco_image_file(path: Path, k: int, roots: Sequence[Path], name: str,
                     problems: list[Problem]) -> Path | None:
    image = _first_file(roots, name)
    if image is None:
        problems.append(Problem(str(path), None, MISSING_IMAGE, f"images[{k}]: {name} not found "
                                f"under {', '.join(str(r) for r in roots)}"))
        return None
    return _checked_image(image, problems, str(path), None)


def _coco_image_roots(path: Path) -> list[Path]:
    """Where COCO images usually are: beside the JSON, or annotations/../<split> for
    instances_<split>.json, or ../images."""
    roots = [path.parent, path.parent.parent, path.parent.parent / "images"]
    if path.stem.startswith("instances_"):
        roots.insert(1, path.parent.parent / path.stem[len("instances_"):])
    return roots


def _first_file(roots: Sequence[Path], name: str) -> Path | None:
    for root in roots:
        if (root / name).is_file():
            return root / name
    return None


# --------------------------------------------------------------------------- shared


def _item(image: Path | None, boxes, classes, difficult, source: Path) -> Item:
    item = Item(image=image,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                classes=np.asarray(classes, dtype=np.int64).reshape(-1),
                difficult=np.asarray(difficult, dtype=bool).reshape(-1),
                source=source)
    if not len(item.boxes) == len(item.classes) == len(item.difficult):
        raise ValueError(f"{source}: {len(item.boxes)} boxes but {len(item.classes)} classes")
    return item


def _dataset(items: list[Item], names: list[str], source: Path,
             problems: list[Problem]) -> Dataset:
    return Dataset(items=items, names=names, source=source, problems=problems,
                   missing_images=sum(it.image is None for it in items))


def _checked_image(image: Path, problems: list[Problem], file: str,
                   line: int | None) -> Path | None:
    """`image` when it can be opened; else None, with a problem at file:line (where it was
    named), so that training never meets it."""
    found = image_problem(image)
    if found is None:
        return image
    problems.append(Problem(file, line, *found))
    return None


def _cached(cache_file: Path | None, key: str,
            build: Callable[[], tuple[list[Item], list[Problem]]]
            ) -> tuple[list[Item], list[Problem]]:
    """build()'s result, from `cache_file` when it holds one for `key` (see label_cache);
    a fresh result is written back. cache_file None: no cache."""
    if cache_file is not None:
        loaded = _from_payload(read_cache(cache_file, key))
        if loaded is not None:
            return loaded
    items, problems = build()
    if cache_file is not None:
        write_cache(cache_file, key, _to_payload(items, problems))
    return items, problems


def _to_payload(items: list[Item], problems: list[Problem]) -> dict:
    """JSON-able items of a YOLO-style set (no difficult flags) and problems."""
    return {"items": [[None if it.image is None else str(it.image), str(it.source),
                       it.boxes.tolist(), it.classes.tolist()] for it in items],
            "problems": [p.to_json() for p in problems]}


def _from_payload(payload) -> tuple[list[Item], list[Problem]] | None:
    """The inverse of _to_payload; None for anything else (a damaged or foreign cache)."""
    if payload is None:
        return None
    try:
        items = [_item(None if image is None else Path(image), boxes, classes,
                       [False] * len(classes), Path(source))
                 for image, source, boxes, classes in payload["items"]]
        problems = [Problem.from_json(row) for row in payload["problems"]]
    except (KeyError, TypeError, ValueError) as exc:
        log.debug("label cache ignored: %s", exc)
        return None
    return items, problems


def _resolve_existing(value: str, bases: Sequence[Path]) -> Path | None:
    candidate = Path(value)
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for base in bases:
        if (base / candidate).exists():
            return base / candidate
    return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _label_text(path: Path, problems: list[Problem]) -> str | None:
    """A label file's text, or None with an unreadable-label-file problem."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        problems.append(Problem(str(path), None, UNREADABLE_LABELS,
                                f"cannot read ({exc.strerror})"))
        return None
