"""Label readers: darknet .data / image lists / YOLO folders, Pascal VOC XML, COCO JSON."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from detkit.data import darknet_label_path, read_dataset
from detkit.errors import DataError

DEEPFOREST = REPO / "assets" / "deepforest"
# A real (tiny) image: an empty file is now reported as an unreadable image.
TINY_PNG = cv2.imencode(".png", np.zeros((2, 2, 3), np.uint8))[1].tobytes()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(TINY_PNG)
    return path


@pytest.mark.parametrize("image, label", [
    ("data/images/a.jpg", "data/labels/a.txt"),
    ("VOC2007/JPEGImages/000005.jpg", "VOC2007/labels/000005.txt"),
    ("/x/images/b.JPEG", "/x/labels/b.txt"),
    ("set/images/c.png", "set/labels/c.txt"),
    ("set/images/d.bmp", "set/labels/d.txt"),              # not a darknet suffix: replaced anyway
    ("images/images/e.jpg", "labels/images/e.txt"),        # only the first occurrence, as darknet
    ("my.data/images/f", "my.data/labels/f.txt"),
])
def test_darknet_label_path(image, label):
    assert darknet_label_path(image) == label


@pytest.fixture
def darknet_tree(tmp_path):
    """A darknet-style tree: obj.data, train.txt (paths relative to the .data folder and to the
    list's own folder), images/ and labels/, obj.names."""
    root = tmp_path / "proj"
    image(root / "images" / "a.jpg")
    write(root / "labels" / "a.txt", "0 0.5 0.5 0.2 0.4\n1 0.25 0.75 0.1 0.1 0.93\n")
    image(root / "lists" / "images" / "b.png")
    write(root / "lists" / "labels" / "b.txt", "\n2 0.1 0.2 0.3 0.4\n")
    write(root / "lists" / "train.txt", "images/a.jpg\nimages/b.png\n\n")
    write(root / "obj.names", "cat\ndog\nbird\n")
    data = write(root / "obj.data", "classes= 3\ntrain = lists/train.txt\n# comment\n"
                                     "names = obj.names\nbackup = backup/\n")
    return data


def test_darknet_data_file(darknet_tree):
    ds = read_dataset(darknet_tree)
    assert ds.names == ["cat", "dog", "bird"] and len(ds) == 2
    a, b = ds.items
    assert a.image == darknet_tree.parent / "images" / "a.jpg"
    np.testing.assert_allclose(a.boxes, [[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1]])
    assert a.classes.tolist() == [0, 1] and b.classes.tolist() == [2]
    assert b.image == darknet_tree.parent / "lists" / "images" / "b.png"
    assert b.source.name == "b.txt" and not a.difficult.any()
    assert ds.boxes().shape == (3, 4) and ds.problems == []


def test_missing_label_file_names_list_line(darknet_tree):
    lst = darknet_tree.parent / "lists" / "train.txt"
    lst.write_text("images/a.jpg\nimages/nolabel.jpg\n")
    with pytest.raises(DataError, match=r"train.txt:2: no label file labels/nolabel.txt for image images/nolabel.jpg under .*proj, "):
        read_dataset(darknet_tree, strict=True)
    reported = read_dataset(darknet_tree)  # reported and left out
    assert len(reported) == 1 and [p.kind for p in reported.problems] == ["missing label file"]
    ds = read_dataset(darknet_tree, missing_labels="empty")
    assert len(ds.items[1]) == 0


@pytest.mark.parametrize("line, message", [
    ("0 0.5 0.5 0.2", "expected 'class cx cy w h', got 4 fields"),
    ("x 0.5 0.5 0.2 0.2", "class 'x' is not an integer"),
    ("3 0.5 0.5 0.2 0.2", r"class 3 is outside 0..2"),
    ("1 120 80 30 40", r"coordinates \[120.0, 80.0, 30.0, 40.0\] are not normalised"),
    ("1 0.5 nan 0.2 0.2", "non-finite"),
    ("1 0.5 0.5 -0.2 0.2", r"box of zero or negative size \(w -0.2, h 0.2\)"),
    ("1 0.5 0.5 0.2 0", r"box of zero or negative size"),
])
def test_bad_label_lines_name_file_and_line(darknet_tree, line, message):
    write(darknet_tree.parent / "labels" / "a.txt", "0 0.5 0.5 0.2 0.4\n" + line + "\n")
    with pytest.raises(DataError, match=r"a\.txt:2: " + message):
        read_dataset(darknet_tree, strict=True)
    kept = read_dataset(darknet_tree)  # the bad line is dropped, the rest of the image kept
    assert kept.items[0].classes.tolist() == [0] and len(kept.problems) == 1
    assert str(kept.problems[0]).startswith(f"{kept.items[0].source}:2: ")


def test_data_file_errors(tmp_path, darknet_tree):
    with pytest.raises(DataError, match="no 'valid=' line"):
        read_dataset(darknet_tree, split="valid")
    bad = write(tmp_path / "bad.data", "classes=2\ntrain=missing.txt\n")
    with pytest.raises(DataError, match=r"bad.data:2: train list 'missing.txt' not found"):
        read_dataset(bad)
    mismatch = write(darknet_tree.parent / "m.data", "classes=5\ntrain=lists/train.txt\n"
                                                     "names=obj.names\n")
    with pytest.raises(DataError, match=r"m.data:1: classes=5 but the names file has 3"):
        read_dataset(mismatch)
    junk = write(tmp_path / "junk.data", "train lists.txt\n")
    with pytest.raises(DataError, match=r"junk.data:1: expected 'key = value'"):
        read_dataset(junk)


def test_image_list_directly(darknet_tree):
    """A bare list resolves relative paths against its own folder."""
    root = darknet_tree.parent
    ds = read_dataset(write(root / "all.txt", "images/a.jpg\nlists/images/b.png\n"))
    assert [len(it) for it in ds.items] == [2, 1] and ds.names == []
    with pytest.raises(DataError, match=r"train.txt:1: no label file"):
        read_dataset(root / "lists" / "train.txt", strict=True)


def test_yolo_label_folder(tmp_path):
    folder = tmp_path / "labels"
    write(folder / "classes.txt", "car\nbus\n")
    write(folder / "x.txt", "1 0.5 0.5 0.5 0.5\n")
    write(folder / "y.txt", "")
    image(tmp_path / "images" / "x.jpg")
    ds = read_dataset(folder)
    assert ds.names == ["car", "bus"] and len(ds) == 2
    assert ds.items[0].image == tmp_path / "images" / "x.jpg" and ds.items[1].image is None
    assert ds.items[0].classes.tolist() == [1] and len(ds.items[1]) == 0


def test_pascal_voc_real_files():
    ds = read_dataset(DEEPFOREST)
    assert ds.names == sorted(ds.names) and len(ds) == 4
    assert sum(len(it) for it in ds.items) == 574 + 279 + 61 + 37
    crop2 = next(it for it in ds.items if it.source.name.startswith("2019_YELL_2_528000"))
    assert crop2.image == DEEPFOREST / "2019_YELL_2_528000_4978000_image_crop2.png"
    # first object: xmin 681, ymin 369, xmax 699, ymax 386 in a 2299 x 2472 image
    w, h = 2299, 2472
    expected = [((681 + 699) / 2 - 1) / w, ((369 + 386) / 2 - 1) / h, 18 / w, 17 / h]
    np.testing.assert_allclose(crop2.boxes[0], expected, rtol=1e-6)
    single = read_dataset(crop2.source)
    assert len(single.items[0]) == 574


VOC = """<annotation><filename>{fn}</filename>{size}
<object><name>dog</name><difficult>1</difficult>
<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>{xmax}</xmax><ymax>61</ymax></bndbox></object>
</annotation>"""


def test_voc_folder_with_annotations_and_errors(tmp_path):
    size = "<size><width>100</width><height>200</height></size>"
    write(tmp_path / "VOC" / "Annotations" / "1.xml", VOC.format(fn="1.jpg", size=size, xmax=31))
    image(tmp_path / "VOC" / "JPEGImages" / "1.jpg")
    ds = read_dataset(tmp_path / "VOC")
    item = ds.items[0]
    assert ds.names == ["dog"] and item.difficult.tolist() == [True]
    assert item.image == tmp_path / "VOC" / "JPEGImages" / "1.jpg"
    np.testing.assert_allclose(item.boxes[0], [0.2, 0.2, 0.2, 0.2])
    assert len(ds.boxes(include_difficult=False)) == 0
    with pytest.raises(DataError, match=r"1.xml: object 1 'dog' is not one of the class names"):
        read_dataset(tmp_path / "VOC", names=["cat"], strict=True)
    assert len(read_dataset(tmp_path / "VOC", names=["cat"]).items[0]) == 0
    nosize = write(tmp_path / "2.xml", VOC.format(fn="2.jpg", size="", xmax=31))
    with pytest.raises(DataError, match=r"2.xml: missing <size><width>"):
        read_dataset(nosize, strict=True)
    assert len(read_dataset(nosize)) == 0  # cannot be normalised: left out
    empty = write(tmp_path / "3.xml", VOC.format(fn="3.jpg", size=size, xmax=5))
    with pytest.raises(DataError, match=r"3.xml: object 1 \(dog\): inverted or empty box"):
        read_dataset(empty, strict=True)


def coco(images, annotations, categories):
    return {"images": images, "annotations": annotations, "categories": categories}


def test_coco_json(tmp_path):
    root = tmp_path / "coco"
    image(root / "val2017" / "a.jpg")
    data = coco(
        [{"id": 5, "file_name": "a.jpg", "width": 200, "height": 100},
         {"id": 6, "file_name": "b.jpg", "width": 50, "height": 50}],
        [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [20, 10, 40, 20], "iscrowd": 0},
         {"id": 2, "image_id": 5, "category_id": 1, "bbox": [0, 0, 200, 100], "iscrowd": 1}],
        [{"id": 7, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}])
    path = write(root / "annotations" / "instances_val2017.json", json.dumps(data))
    ds = read_dataset(path)
    assert ds.names == ["person", "car", "zebra"] and len(ds) == 2
    a, b = ds.items
    assert a.image == root / "val2017" / "a.jpg" and b.image is None
    np.testing.assert_allclose(a.boxes, [[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    assert a.classes.tolist() == [2, 0] and a.difficult.tolist() == [False, True]
    assert len(b) == 0
    data["annotations"][1]["image_id"] = 99
    bad = write(tmp_path / "bad.json", json.dumps(data))
    with pytest.raises(DataError, match=r"bad.json: annotations\[1\] \(id 2\): image_id 99"):
        read_dataset(bad, strict=True)
    assert [len(it) for it in read_dataset(bad).items] == [1, 0]
    with pytest.raises(DataError, match="no 'images' list"):
        read_dataset(write(tmp_path / "x.json", "{}"))


def test_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="unknown data set format"):
        read_dataset(write(tmp_path / "a.csv", ""))
    with pytest.raises(DataError, match="no .xml"):
        read_dataset(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope")
