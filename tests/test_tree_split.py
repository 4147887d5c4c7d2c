"""The tree-crown split builder's rules (issue 20): a spatial hold-out where every labelled photo
gives both training and validation tiles, no validation tile shares a pixel with a training tile
of its photo, and no crown is lost at a border beyond the half-inside rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO, REQUIRE_REFERENCE

from detkit.data.trees import (
    SPATIAL_PHOTOS,
    TILE,
    Region,
    boxes_in,
    part_boxes,
    read_photo,
    spatial_regions,
    spatial_windows,
    validation_strips,
)

ASSETS = REPO / "assets" / "deepforest"
BUILT = REPO / "data" / "trees"
PHOTO_SIZES = [(2299, 2472), (1249, 1035), (400, 400), (417, 833)]  # width, height


def overlaps(a: Region, b: Region) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def inside(window: Region, part: Region) -> bool:
    return part.x0 <= window.x0 < window.x1 <= part.x1 and part.y0 <= window.y0 < window.y1 <= part.y1


def coverage(windows: list[Region], width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    for w in windows:
        mask[w.y0:w.y1, w.x0:w.x1] = True
    return mask


@pytest.mark.parametrize("width,height", PHOTO_SIZES)
def test_validation_tiles_share_no_pixel_with_training_tiles(width, height):
    train, valid = spatial_windows(width, height)
    train_part, valid_part = spatial_regions(width, height)
    assert train and valid
    assert valid_part.x1 - valid_part.x0 == pytest.approx(0.3 * width, abs=1)
    assert all(inside(w, train_part) for w in train) and all(inside(w, valid_part) for w in valid)
    assert not any(overlaps(a, b) for a in train for b in valid)
    assert all(w.x1 - w.x0 <= TILE and w.y1 - w.y0 <= TILE for w in train + valid)
    # together they cover each part exactly: no pixel of a photo is left out of both splits
    assert coverage(train, width, height).sum() == (train_part.x1 - train_part.x0) * height
    assert coverage(valid, width, height).sum() == (valid_part.x1 - valid_part.x0) * height
    assert (coverage(train, width, height) | coverage(valid, width, height)).all()


def test_a_crown_on_the_border_goes_to_the_side_holding_most_of_it():
    train_part, valid_part = spatial_regions(1000, 400)  # border at x=700
    crowns = np.array([[680.0, 10, 720, 50],   # half and half: both sides keep it, clipped
                       [670.0, 60, 710, 100],  # 3/4 training side
                       [695.0, 110, 735, 150]])  # 7/8 validation side
    assert part_boxes(crowns, train_part).tolist() == [[680, 10, 700, 50], [670, 60, 700, 100]]
    assert part_boxes(crowns, valid_part).tolist() == [[700, 10, 720, 50], [700, 110, 735, 150]]


@pytest.fixture(scope="module")
def photos() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not (ASSETS / "OSBS_029.xml").exists():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{ASSETS} missing: run `make assets`")
        pytest.skip("tree photos not fetched (make assets)")
    return {stem: read_photo(ASSETS, stem) for stem in SPATIAL_PHOTOS}


def test_no_crown_is_lost_beyond_the_half_inside_rule(photos):
    for stem, (image, boxes) in photos.items():
        height, width = image.shape[:2]
        for part, windows in zip(spatial_regions(width, height), spatial_windows(width, height), strict=True):
            crowns = part_boxes(boxes, part)
            kept = [any(len(boxes_in(crowns[i:i + 1], w)) for w in windows) for i in range(len(crowns))]
            assert all(kept), f"{stem}: {kept.count(False)} of {len(crowns)} crowns in no tile"
        # every crown at least half inside the photo is on one side or the other
        sides = sum(len(part_boxes(boxes, part)) for part in spatial_regions(width, height))
        assert sides >= len(boxes_in(boxes, Region(0, 0, width, height)))


def tiles_of(list_file: Path) -> list[Path]:
    return [BUILT / line for line in list_file.read_text().split()]


def test_built_split_holds_every_photo_on_both_sides_and_names_tiles_by_origin(photos):
    if not (BUILT / "trees.data").exists():
        pytest.skip("tree data set not built (make trees)")
    train, valid = tiles_of(BUILT / "train.txt"), tiles_of(BUILT / "valid.txt")
    for stem in SPATIAL_PHOTOS:
        assert any(p.name.startswith(stem + "_") for p in train), stem
        assert any(p.name.startswith(stem + "_") for p in valid), stem
    assert not set(train) & set(valid)
    for tile in train + valid:
        stem, x0, y0 = tile.stem.rsplit("_", 2)
        photo = photos[stem][0]
        pixels = cv2.imread(str(tile), cv2.IMREAD_COLOR)
        h, w = pixels.shape[:2]
        assert np.array_equal(pixels, photo[int(y0):int(y0) + h, int(x0):int(x0) + w]), tile.name
    for data in ("trees.data", "cross.data", "osbs.data", "trees-whole.data", "trees-strips.data"):
        assert "classes=1" in (BUILT / data).read_text(), data


def test_validation_strips_are_the_uncut_validation_parts_with_every_crown(photos, tmp_path):
    """trees-strips.data: each photo's right 30 % in one piece; its crowns are the validation
    part's, each once (the 416 px validation tiles count the crowns in their overlaps twice)."""
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    strips = validation_strips(ASSETS, tmp_path)
    assert [p.stem.rsplit("_", 2)[0] for p in strips] == list(SPATIAL_PHOTOS)
    for strip in strips:
        stem, x0, y0 = strip.stem.rsplit("_", 2)
        photo, boxes = photos[stem]
        part = spatial_regions(photo.shape[1], photo.shape[0])[1]
        assert (int(x0), int(y0)) == (part.x0, part.y0)
        assert np.array_equal(cv2.imread(str(strip), cv2.IMREAD_COLOR), photo[:, part.x0:]), stem
        rows = np.loadtxt(tmp_path / "labels" / f"{strip.stem}.txt", ndmin=2)
        crowns = part_boxes(boxes, part) - np.array([part.x0, 0, part.x0, 0])
        height, width = photo.shape[0], photo.shape[1] - part.x0
        centres = np.stack([(crowns[:, 0] + crowns[:, 2]) / 2 / width, (crowns[:, 1] + crowns[:, 3]) / 2 / height], 1)
        assert len(rows) == len(crowns) > 0
        assert np.allclose(rows[:, 1:3], centres, atol=1e-5)
