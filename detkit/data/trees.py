"""Build the tree-crown data set (deepforest's aerial photos, Pascal VOC XML) as darknet data.

Two splits, both as darknet `.data` files (YOLO txt labels, tile names `<photo>_<x0>_<y0>.png`
with the tile's origin in pixels of its photo):

- `trees.data`, the spatial hold-out: every labelled photo (both YELL crops, OSBS_029, SOAP_061)
  is cut at 70 % of its width; the left part trains (416 px tiles, 25 % overlap), the right 30 %
  validates (416 px tiles a tile apart, the last column and row moved back to end at the part's
  edge, so they overlap their neighbours). Tiles stay inside their part, so a validation tile shares
  no pixel with a training tile of its photo. This split tells a training defect from a data gap:
  the validation crowns come from the same photos, lighting and sites as the training crowns.
- `cross.data`, the cross-photo test (harder: generalisation): 416 px tiles of one whole YELL
  photo train, the second YELL photo validates; `osbs.data` validates on OSBS_029 (another site)
  and `trees-whole.data` on the uncut second YELL photo, for `detkit eval --tile 416`.
- `trees-strips.data`: the spatial split's training tiles, validated on each photo's right 30 %
  uncut (`strips/`), for `detkit eval --tile 416`: the same crowns as `trees.data`'s validation
  tiles, none clipped by a tile's cut.

A tile keeps a box when at least half of it is inside, clipped to the tile.

    python -m detkit.data.trees assets/deepforest data/trees
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..engine.slicing import tile_origins

TRAIN = "2019_YELL_2_528000_4978000_image_crop2"
VALID = "2019_YELL_2_541000_4977000_image_crop"
OTHER_SITE = "OSBS_029"
SPATIAL_PHOTOS = (TRAIN, VALID, OTHER_SITE, "SOAP_061")
VALIDATION_SHARE = 0.3  # the right 30 % of each photo validates in the spatial split
TILE = 416


@dataclass(frozen=True)
class Region:
    """A rectangle of a photo, in pixels: [x0, x1) x [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int


def read_voc_boxes(xml_path: Path) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 pixels of every object in a VOC annotation."""
    root = ET.parse(xml_path).getroot()
    boxes = [[float(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
             for obj in root.iter("object")]
    return np.array(boxes, np.float64).reshape(-1, 4)


def boxes_in(boxes: np.ndarray, window: Region) -> np.ndarray:
    """The boxes at least half inside `window`, clipped to it, in the window's own pixels."""
    w, h = window.x1 - window.x0, window.y1 - window.y0
    shifted = boxes - np.array([window.x0, window.y0, window.x0, window.y0])
    clipped = np.clip(shifted, 0, [w, h, w, h])
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside >= 0.5 * area) & (clipped[:, 2] - clipped[:, 0] > 1) & (clipped[:, 3] - clipped[:, 1] > 1)
    return clipped[keep]


def tile_windows(region: Region, tile: int, stride: int) -> list[Region]:
    """Windows of at most `tile` px covering `region`, every `stride` px, none crossing its edge."""
    width, height = region.x1 - region.x0, region.y1 - region.y0
    return [Region(region.x0 + dx, region.y0 + dy, region.x0 + dx + min(tile, width),
                   region.y0 + dy + min(tile, height))
            for dy in tile_origins(height, tile, stride) for dx in tile_origins(width, tile, stride)]


def spatial_regions(width: int, height: int) -> tuple[Region, Region]:
    """The training part (left) and the validation part (right 30 %) of a photo."""
    border = round(width * (1.0 - VALIDATION_SHARE))
    return Region(0, 0, border, height), Region(border, 0, width, height)


def write_sample(out: Path, name: str, image: np.ndarray, boxes: np.ndarray) -> Path:
    h, w = image.shape[:2]
    image_path = out / "images" / f"{name}.png"
    cv2.imwrite(str(image_path), image)
    lines = [f"0 {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
             f"{(b[3] - b[1]) / h:.6f}" for b in boxes]
    (out / "labels" / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    return image_path


def read_photo(source: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """A photo and its VOC boxes (x1, y1, x2, y2 pixels)."""
    image = cv2.imread(str(source / f"{stem}.png"), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(source / f"{stem}.png")
    return image, read_voc_boxes(source / f"{stem}.xml")


def write_windows(out: Path, stem: str, image: np.ndarray, boxes: np.ndarray,
                  windows: list[Region]) -> list[Path]:
    return [write_sample(out, f"{stem}_{win.x0}_{win.y0}", image[win.y0:win.y1, win.x0:win.x1],
                         boxes_in(boxes, win)) for win in windows]


def tiles(source: Path, out: Path, stem: str, tile: int, stride: int) -> list[Path]:
    image, boxes = read_photo(source, stem)
    whole_photo = Region(0, 0, image.shape[1], image.shape[0])
    return write_windows(out, stem, image, boxes, tile_windows(whole_photo, tile, stride))


def whole(source: Path, out: Path, stem: str) -> Path:
    """The photo uncut with all its boxes, for `detkit eval --tile` (sliced inference)."""
    return write_sample(out, stem, *read_photo(source, stem))


def spatial_windows(width: int, height: int, tile: int = TILE) -> tuple[list[Region], list[Region]]:
    """The training tiles (25 % overlap) and validation tiles (none) of a photo's two parts."""
    train_part, valid_part = spatial_regions(width, height)
    return tile_windows(train_part, tile, int(tile * 0.75)), tile_windows(valid_part, tile, tile)


def part_boxes(boxes: np.ndarray, part: Region) -> np.ndarray:
    """The boxes at least half inside a part of the photo, clipped to it (photo pixels): a crown
    on the border belongs to one side, and its tiles judge it by its share of that side."""
    return boxes_in(boxes, part) + np.array([part.x0, part.y0, part.x0, part.y0])


def spatial_split(source: Path, out: Path, tile: int) -> tuple[list[Path], list[Path]]:
    train, valid = [], []
    for stem in SPATIAL_PHOTOS:
        image, boxes = read_photo(source, stem)
        train_part, valid_part = spatial_regions(image.shape[1], image.shape[0])
        train_windows, valid_windows = spatial_windows(image.shape[1], image.shape[0], tile)
        train += write_windows(out, stem, image, part_boxes(boxes, train_part), train_windows)
        valid += write_windows(out, stem, image, part_boxes(boxes, valid_part), valid_windows)
    return train, valid


def validation_strips(source: Path, out: Path) -> list[Path]:
    """Each photo's validation part uncut (named after its origin, as a tile), with its crowns:
    scored with `eval --tile 416` every crown is seen whole in some window, where the 416 px
    validation tiles clip those their cuts cross (92 of 421)."""
    strips = []
    for stem in SPATIAL_PHOTOS:
        image, boxes = read_photo(source, stem)
        part = spatial_regions(image.shape[1], image.shape[0])[1]
        strips += write_windows(out, stem, image, boxes, [part])  # the part is the one window
    return strips


def write_list(path: Path, images: list[Path], root: Path) -> None:
    path.write_text("".join(f"{p.relative_to(root).as_posix()}\n" for p in images))


def make_dirs(out: Path) -> None:
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def write_strips(source: Path, out: Path) -> None:
    """strips/ and valid-strips.txt: the spatial split's validation parts uncut (trees-strips.data)."""
    strips = out / "strips"
    make_dirs(strips)
    write_list(out / "valid-strips.txt", validation_strips(source, strips), out)


def build(source: Path, out: Path, tile: int = TILE) -> Path:
    make_dirs(out)
    train, valid = spatial_split(source, out, tile)
    write_list(out / "train.txt", train, out)
    write_list(out / "valid.txt", valid, out)
    cross = out / "cross"
    make_dirs(cross)
    write_list(out / "cross-train.txt", tiles(source, cross, TRAIN, tile, int(tile * 0.75)), out)
    write_list(out / "cross-valid.txt", tiles(source, cross, VALID, tile, tile), out)
    write_list(out / "osbs.txt", tiles(source, cross, OTHER_SITE, tile, tile), out)
    write_list(out / "valid-whole.txt", [whole(source, cross, VALID)], out)
    write_strips(source, out)
    (out / "trees.names").write_text("Tree\n")
    data = out / "trees.data"
    data.write_text("classes=1\ntrain=train.txt\nvalid=valid.txt\nnames=trees.names\nbackup=backup\n")
    (out / "cross.data").write_text("classes=1\ntrain=cross-train.txt\nvalid=cross-valid.txt\n"
                                    "names=trees.names\nbackup=backup\n")
    (out / "osbs.data").write_text("classes=1\ntrain=cross-train.txt\nvalid=osbs.txt\nnames=trees.names\n")
    (out / "trees-strips.data").write_text("classes=1\ntrain=train.txt\nvalid=valid-strips.txt\n"
                                           "names=trees.names\n")
    (out / "trees-whole.data").write_text("classes=1\ntrain=cross-train.txt\nvalid=valid-whole.txt\n"
                                          "names=trees.names\n")
    return data


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
