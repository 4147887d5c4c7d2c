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
image, so anchors, training and evaluation never care where labels came from. Bad input raises
`DataError` naming the file (and line, object or annotation) instead of being skipped.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
NAME_FILES = ("classes.txt", "obj.names", "classes.names")
# A YOLO coordinate this far above 1 is certainly not normalised (pixels, or a wrong column).
_NORMALISED_SLACK = 0.01


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
    """Items in a stable order, the class names (index = class id) and where they were read."""

    items: list[Item]
    names: list[str]
    source: Path
    missing_images: int = field(default=0)

    def __len__(self) -> int:
        return len(self.items)

    def boxes(self, include_difficult: bool = True) -> np.ndarray:
        """All boxes, (N, 4) cx, cy, w, h normalised, concatenated over the items."""
        parts = [it.boxes if include_difficult else it.boxes[~it.difficult] for it in self.items]
        return np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)


def read_dataset(path: str | Path, *, split: str = "train", names: Sequence[str] | None = None,
                 missing_labels: str = "error", progress: bool = False) -> Dataset:
    """Read any supported data set (see the module docstring) into a Dataset.

    split: which list of a ``.data`` file (``train`` or ``valid``). names: class names to use
    instead of the data set's own (VOC names must then all be in it). missing_labels: for image
    lists, ``error`` (darknet's behaviour, the usual cause of "Couldn't open file" at training
    time) or ``empty`` (an image without a label file has no boxes, as AlexeyAB allows).
    """
    path = Path(path)
    if missing_labels not in ("error", "empty"):
        raise ValueError(f"missing_labels={missing_labels!r}: use 'error' or 'empty'")
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
                    class_count: int | None = None) -> Dataset:
    """A darknet image list: one image path a line; labels by `darknet_label_path`.

    A relative path is tried against each of `bases` (default: the list's folder) and finally
    the current folder, where darknet itself resolves it; the first base where the image or its
    label file exists wins.
    """
    bases = list(bases) if bases else [path.parent]
    count = class_count if class_count is not None else len(names)
    items = []
    lines = _read_text(path).splitlines()
    for number, line in enumerate(tqdm(lines, desc="labels", disable=not progress), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        image, label = _locate(entry, bases)
        where = f"{path}:{number}"
        if label is None:
            if missing_labels == "error":
                looked = "" if os.path.isabs(entry) else (
                    " under " + ", ".join(str(b) for b in [*bases, Path.cwd()]))
                raise DataError(f"{where}: no label file {darknet_label_path(entry)} for image "
                                f"{entry}{looked} (darknet's rule: images/ or JPEGImages/ -> "
                                f"labels/, image suffix -> .txt)")
            items.append(_item(image if image and image.exists() else None, [], [], [],
                               path))
            continue
        boxes, classes = read_yolo_labels(label, count)
        items.append(_item(image if image.exists() else None, boxes, classes,
                           [False] * len(classes), label))
    return Dataset(items=items, names=names, source=path,
                   missing_images=sum(it.image is None for it in items))


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


def read_yolo_labels(path: Path, class_count: int = 0) -> tuple[list[list[float]], list[int]]:
    """One YOLO label file: ``cls cx cy w h`` a line (a 6th column, a score, is ignored).

    Checked like AlexeyAB's loader: an integer class (below `class_count` when known), finite
    coordinates within [0, 1] (a little slack), and no negative size.
    """
    boxes, classes = [], []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) not in (5, 6):
            raise DataError(f"{where}: expected 'class cx cy w h', got {len(fields)} fields")
        cls = _parse_class(fields[0], where, class_count)
        try:
            values = [float(v) for v in fields[1:5]]
        except ValueError:
            raise DataError(f"{where}: '{line.strip()}' has a non-numeric coordinate") from None
        _check_normalised(values, where)
        boxes.append(values)
        classes.append(cls)
    return boxes, classes


def _parse_class(text: str, where: str, class_count: int) -> int:
    try:
        cls = int(text)
    except ValueError:
        raise DataError(f"{where}: class '{text}' is not an integer") from None
    if cls < 0 or (class_count and cls >= class_count):
        raise DataError(f"{where}: class {cls} is outside 0..{class_count - 1}"
                        if class_count else f"{where}: class {cls} is negative")
    return cls


def _check_normalised(values: list[float], where: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"{where}: non-finite coordinate {values}")
    if min(values) < 0 or max(values) > 1 + _NORMALISED_SLACK:
        raise DataError(f"{where}: coordinates {values} are not normalised to [0, 1] (cx cy w h "
                        f"as fractions of the image size)")


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
                     progress: bool = False) -> Dataset:
    """YOLO label files in one folder; the image is the same stem beside it or in ../images."""
    class_names = list(names) if names else _folder_names(path)
    items = []
    for label in tqdm(list(labels), desc="labels", disable=not progress):
        boxes, classes = read_yolo_labels(label, len(class_names))
        items.append(_item(_image_beside(label), boxes, classes, [False] * len(classes), label))
    return Dataset(items=items, names=class_names, source=path,
                   missing_images=sum(it.image is None for it in items))


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
    order of voc.names). Difficult objects are kept and flagged.
    """
    parsed = [_parse_voc(path) for path in files]
    class_names = list(names) if names else sorted({o[0] for _, _, objs in parsed for o in objs})
    index = {name: i for i, name in enumerate(class_names)}
    items = []
    for path, (image, size, objects) in zip(files, parsed, strict=True):
        boxes, classes, difficult = [], [], []
        width, height = size
        for name, hard, (x1, y1, x2, y2) in objects:
            if name not in index:
                raise DataError(f"{path}: object '{name}' is not one of the class names")
            boxes.append([((x1 + x2) / 2 - 1) / width, ((y1 + y2) / 2 - 1) / height,
                          (x2 - x1) / width, (y2 - y1) / height])
            classes.append(index[name])
            difficult.append(hard)
        items.append(_item(image, boxes, classes, difficult, path))
    return Dataset(items=items, names=class_names, source=source,
                   missing_images=sum(it.image is None for it in items))


def _parse_voc(path: Path):
    try:
        root = ET.fromstring(_read_text(path))
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from None
    size = (_voc_number(root, "size/width", path), _voc_number(root, "size/height", path))
    if min(size) <= 0:
        raise DataError(f"{path}: <size> width and height must be positive (needed to "
                        f"normalise the boxes)")
    objects = []
    for k, obj in enumerate(root.iter("object"), 1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path}: object {k} has no <name>")
        where = f"{path}: object {k} ({name})"
        corners = tuple(_voc_number(obj, f"bndbox/{t}", path, where)
                        for t in ("xmin", "ymin", "xmax", "ymax"))
        if corners[2] <= corners[0] or corners[3] <= corners[1]:
            raise DataError(f"{where}: empty box {corners} (xmax <= xmin or ymax <= ymin)")
        hard = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        objects.append((name, hard, corners))
    filename = (root.findtext("filename") or "").strip()
    return _voc_image(path, filename), size, objects


def _voc_number(node, tag: str, path: Path, where: str | None = None) -> float:
    text = node.findtext(tag)
    if text is None:
        raise DataError(f"{where or path}: missing <{tag.replace('/', '><')}>")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where or path}: <{tag}> '{text.strip()}' is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{where or path}: <{tag}> is not finite")
    return value


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
    item, with or without annotations."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: no '{key}' list (not a COCO instances file)")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_index = {c["id"]: i for i, c in enumerate(categories)}
    class_names = list(names) if names else [str(c.get("name", c["id"])) for c in categories]
    images = {}
    for k, image in enumerate(data["images"]):
        try:
            images[image["id"]] = (str(image["file_name"]), float(image["width"]),
                                   float(image["height"]), [])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: images[{k}] needs id, file_name, width and height") from None
        if images[image["id"]][1] <= 0 or images[image["id"]][2] <= 0:
            raise DataError(f"{path}: images[{k}] (id {image['id']}) has a non-positive size")
    for k, ann in enumerate(data["annotations"]):
        _coco_annotation(path, k, ann, images, category_index)
    roots = _coco_image_roots(path)
    items = [_item(_first_file(roots, file_name), [b for b, _, _ in anns],
                   [c for _, c, _ in anns], [d for _, _, d in anns], path)
             for file_name, _, _, anns in images.values()]
    return Dataset(items=items, names=class_names, source=path,
                   missing_images=sum(it.image is None for it in items))


def _coco_annotation(path: Path, k: int, ann: dict, images: dict, category_index: dict) -> None:
    where = f"{path}: annotations[{k}] (id {ann.get('id', '?')})"
    if ann.get("image_id") not in images:
        raise DataError(f"{where}: image_id {ann.get('image_id')} is not in 'images'")
    if ann.get("category_id") not in category_index:
        raise DataError(f"{where}: category_id {ann.get('category_id')} is not in 'categories'")
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: bbox must be [x, y, width, height]") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < 0 or h < 0:
        raise DataError(f"{where}: bad bbox {ann['bbox']}")
    _, width, height, anns = images[ann["image_id"]]
    box = [(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
    anns.append((box, category_index[ann["category_id"]], bool(ann.get("iscrowd", 0))))


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
    return Item(image=image,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                classes=np.asarray(classes, dtype=np.int64).reshape(-1),
                difficult=np.asarray(difficult, dtype=bool).reshape(-1),
                source=source)


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
