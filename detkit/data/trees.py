"""Build the tree-crown data set (deepforest's aerial photos, Pascal VOC XML) as darknet data.

Training tiles (416 px, 25 % overlap) come from one YELL photo; validation is a second YELL photo
from the same site (tiled without overlap) and OSBS_029 from another site. A tile keeps a box
when at least half of it is inside, clipped to the tile. `trees-whole.data` validates on the
uncut YELL photo instead, for `detkit eval --tile 416` (windows cut and merged at inference).

    python -m detkit.data.trees assets/deepforest data/trees
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

from ..engine.slicing import tile_origins

TRAIN = "2019_YELL_2_528000_4978000_image_crop2"
VALID = "2019_YELL_2_541000_4977000_image_crop"
OTHER_SITE = "OSBS_029"


def read_voc_boxes(xml_path: Path) -> np.ndarray:
    """(N, 4) x1, y1, x2, y2 pixels of every object in a VOC annotation."""
    root = ET.parse(xml_path).getroot()
    boxes = [[float(obj.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
             for obj in root.iter("object")]
    return np.array(boxes, np.float64).reshape(-1, 4)


def cut(image: np.ndarray, boxes: np.ndarray, x0: int, y0: int, tile: int):
    crop = image[y0:y0 + tile, x0:x0 + tile]
    h, w = crop.shape[:2]
    shifted = boxes - np.array([x0, y0, x0, y0])
    clipped = np.clip(shifted, 0, [w, h, w, h])
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside >= 0.5 * area) & (clipped[:, 2] - clipped[:, 0] > 1) & (clipped[:, 3] - clipped[:, 1] > 1)
    return crop, clipped[keep]


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


def tiles(source: Path, out: Path, stem: str, tile: int, stride: int) -> list[Path]:
    image, boxes = read_photo(source, stem)
    paths = []
    for y0 in tile_origins(image.shape[0], tile, stride):
        for x0 in tile_origins(image.shape[1], tile, stride):
            crop, kept = cut(image, boxes, x0, y0, tile)
            paths.append(write_sample(out, f"{stem}_{x0}_{y0}", crop, kept))
    return paths


def whole(source: Path, out: Path, stem: str) -> Path:
    """The photo uncut with all its boxes, for `detkit eval --tile` (sliced inference)."""
    return write_sample(out, stem, *read_photo(source, stem))


def build(source: Path, out: Path, tile: int = 416) -> Path:
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    train = tiles(source, out, TRAIN, tile, int(tile * 0.75))
    valid = tiles(source, out, VALID, tile, tile)
    other = tiles(source, out, OTHER_SITE, tile, tile)
    (out / "train.txt").write_text("".join(f"images/{p.name}\n" for p in train))
    (out / "valid.txt").write_text("".join(f"images/{p.name}\n" for p in valid))
    (out / "osbs.txt").write_text("".join(f"images/{p.name}\n" for p in other))
    (out / "valid-whole.txt").write_text(f"images/{whole(source, out, VALID).name}\n")
    (out / "trees.names").write_text("Tree\n")
    data = out / "trees.data"
    data.write_text("classes=1\ntrain=train.txt\nvalid=valid.txt\nnames=trees.names\nbackup=backup\n")
    (out / "osbs.data").write_text("classes=1\ntrain=train.txt\nvalid=osbs.txt\nnames=trees.names\n")
    (out / "trees-whole.data").write_text("classes=1\ntrain=train.txt\nvalid=valid-whole.txt\n"
                                          "names=trees.names\n")
    return data


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))
