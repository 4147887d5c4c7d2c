"""Labels validated once: every problem in one summary (file:line), bad boxes dropped by default,
strict makes any problem fatal, empty label files are negatives, and the validated result of an
image list is cached next to it and rebuilt when a label file changes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO

from detkit.data import label_cache, labels, read_dataset
from detkit.errors import DataError

JPEG = cv2.imencode(".jpg", np.zeros((4, 4, 3), np.uint8))[1].tobytes()

# label file name -> its text (None: no label file); every image exists unless named below.
LABELS = {
    "good": "0 0.5 0.5 0.2 0.2\n",
    "mixed": ("0 0.5 0.5 0.2 0.2\n"          # 1 kept
              "1 1.5 0.5 0.2 0.2\n"          # 2 out of range
              "1 0.5 0.5 0 0.2\n"            # 3 zero size
              "1 nan 0.5 0.2 0.2\n"          # 4 non-finite
              "7 0.5 0.5 0.2 0.2\n"          # 5 unknown class
              "1 0.5 0.5\n"                  # 6 wrong field count
              "1 a 0.5 0.2 0.2\n"            # 7 non-numeric
              "\n"
              "2 0.3 0.3 0.1 0.1\n"),        # 9 kept
    "negative": "",
    "nolabel": None,
    "missing": "1 0.5 0.5 0.2 0.2\n",
    "broken": "1 0.5 0.5 0.2 0.2\n",
    "empty": "1 0.5 0.5 0.2 0.2\n",
}
IMAGES = {"missing": None, "broken": b"<html>not an image</html>", "empty": b""}
EXPECTED_KINDS = {"bad box": 3, "unknown class": 1, "malformed label": 2,
                  "missing label file": 1, "missing image": 1, "unreadable image": 2}


def make_tree(root: Path, labels_by_name: dict[str, str | None] = LABELS) -> Path:
    """obj.data (3 classes) -> train.txt -> images/<name>.jpg, labels/<name>.txt."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, text in labels_by_name.items():
        content = IMAGES.get(name, JPEG)
        if content is not None:
            (root / "images" / f"{name}.jpg").write_bytes(content)
        if text is not None:
            (root / "labels" / f"{name}.txt").write_text(text)
    (root / "train.txt").write_text("".join(f"images/{n}.jpg\n" for n in labels_by_name))
    (root / "obj.names").write_text("a\nb\nc\n")
    data = root / "obj.data"
    data.write_text("classes = 3\ntrain = train.txt\nvalid = train.txt\nnames = obj.names\n")
    return data


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "set")


def no_parsing(*args, **kwargs):
    raise AssertionError("labels parsed again despite a valid cache")


def by_name(dataset) -> dict[str, labels.Item]:
    return {item.source.stem: item for item in dataset.items}


def kinds(dataset) -> dict[str, int]:
    counts: dict[str, int] = {}
    for problem in dataset.problems:
        counts[problem.kind] = counts.get(problem.kind, 0) + 1
    return counts


def test_default_drops_bad_boxes_and_keeps_the_rest(tree):
    ds = read_dataset(tree)
    items = by_name(ds)
    assert set(items) == set(LABELS) - {"nolabel"}          # no label file: left out
    np.testing.assert_allclose(items["mixed"].boxes, [[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]])
    assert items["mixed"].classes.tolist() == [0, 2]
    assert items["good"].image == tree.parent / "images" / "good.jpg"
    # no image, or not an image: the labels stay (anchors), the image is None (training skips it)
    assert [items[n].image for n in ("missing", "broken", "empty")] == [None] * 3
    assert len(items["missing"]) == 1 and ds.missing_images == 3
    assert kinds(ds) == EXPECTED_KINDS


def test_summary_names_file_and_line_and_is_logged_once(tree, caplog):
    caplog.set_level(logging.WARNING, logger="detkit")
    ds = read_dataset(tree)
    records = [r for r in caplog.records if r.name == "detkit"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    mixed = tree.parent / "labels" / "mixed.txt"
    summary = ds.summary()
    assert summary in records[0].getMessage()
    header, *lines = summary.splitlines()
    assert header == (f"10 label problems in {tree} (malformed label 2, bad box 3, unknown class 1,"
                      f" missing label file 1, missing image 1, unreadable image 2):")
    assert f"  {mixed}:2: coordinates [1.5, 0.5, 0.2, 0.2] are not normalised" in summary
    assert f"  {mixed}:3: box of zero or negative size (w 0, h 0.2)" in lines
    assert f"  {mixed}:5: class 7 is outside 0..2" in lines
    assert f"  {mixed}:6: expected 'class cx cy w h', got 3 fields" in lines
    assert any(line.startswith(f"  {tree.parent / 'train.txt'}:4: no label file labels/nolabel.txt")
               for line in lines)
    assert f"  {tree.parent / 'train.txt'}:5: image {tree.parent / 'images' / 'missing.jpg'} " \
           f"not found" in lines
    assert len(lines) == 10


def test_summary_shows_the_first_ten(tmp_path):
    data = make_tree(tmp_path, {"many": "".join(f"9 0.5 0.5 0.{k + 1} 0.1\n" for k in range(25))})
    summary = read_dataset(data).summary()
    lines = summary.splitlines()
    assert lines[0].startswith("25 label problems") and "unknown class 25" in lines[0]
    assert len(lines) == 12 and lines[-1] == "  ... and 15 more"
    assert lines[10].endswith("many.txt:10: class 9 is outside 0..2")


def test_strict_raises_one_line_error_and_logs_the_summary(tree, caplog):
    dataset = read_dataset(tree)
    summary, first = dataset.summary(), dataset.problems[0]
    caplog.clear()
    with pytest.raises(DataError) as raised:
        read_dataset(tree, strict=True)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(summary.splitlines()[0].rstrip(":"))
    assert message.endswith(f"the first: {first}")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [summary]


def test_empty_label_file_is_a_valid_negative(tmp_path, caplog):
    data = make_tree(tmp_path, {"good": LABELS["good"], "negative": ""})
    ds = read_dataset(data, strict=True)
    negative = by_name(ds)["negative"]
    assert len(negative) == 0 and negative.image is not None and negative.boxes.shape == (0, 4)
    assert ds.problems == [] and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_labels_empty_makes_negatives_not_problems(tree):
    ds = read_dataset(tree, missing_labels="empty")
    assert "missing label file" not in kinds(ds)
    assert len(ds) == len(LABELS)


def test_cache_is_written_and_reused(tree, monkeypatch):
    first = read_dataset(tree)
    cache = tree.parent / "train.txt.cache"
    assert cache.is_file() and json.loads(cache.read_text())["version"] == 1

    monkeypatch.setattr(labels, "read_yolo_labels", no_parsing)
    monkeypatch.setattr(labels, "image_problem", no_parsing)
    second = read_dataset(tree)
    assert second.problems == first.problems and second.names == first.names
    for a, b in zip(first.items, second.items, strict=True):
        assert (a.image, a.source) == (b.image, b.source)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)
    with pytest.raises(DataError):  # cached problems are still problems
        read_dataset(tree, strict=True)


def test_cache_is_rebuilt_when_a_label_file_changes(tree, monkeypatch):
    read_dataset(tree)
    label = tree.parent / "labels" / "mixed.txt"
    label.write_text("2 0.5 0.5 0.4 0.4\n")
    later = label.stat().st_mtime_ns + 5_000_000_000
    os.utime(label, ns=(later, later))
    calls = []
    parse = labels.read_yolo_labels
    monkeypatch.setattr(labels, "read_yolo_labels",
                        lambda *a, **k: calls.append(a[0]) or parse(*a, **k))
    ds = read_dataset(tree)
    assert label in calls and by_name(ds)["mixed"].classes.tolist() == [2]
    assert not any(p.file == str(label) for p in ds.problems)


@pytest.mark.parametrize("damage", ["not json", "wrong payload"])
def test_damaged_cache_is_ignored_and_rebuilt(tree, damage):
    expected = read_dataset(tree)
    cache = tree.parent / "train.txt.cache"
    if damage == "not json":
        cache.write_text("{ no")
    else:  # the right key, a payload that is not ours
        stored = json.loads(cache.read_text())
        stored["payload"]["items"][0] = ["x", "y", [[1, 2, 3]], [0]]
        cache.write_text(json.dumps(stored))
    ds = read_dataset(tree)
    assert ds.problems == expected.problems and len(ds) == len(expected)
    assert json.loads(cache.read_text())["payload"]["items"][0][0] is not None


@pytest.mark.parametrize("how", ["read-only folder", "cache path is a folder"])
def test_unwritable_cache_is_skipped_quietly(tree, monkeypatch, caplog, how):
    cache = tree.parent / "train.txt.cache"
    if how == "read-only folder":  # (chmod does not stop root, so refuse the open itself)
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(label_cache, "open", refuse, raising=False)
    else:
        cache.mkdir()
    caplog.set_level(logging.DEBUG, logger="detkit")
    for _ in range(2):
        assert kinds(read_dataset(tree)) == EXPECTED_KINDS
    assert not cache.is_file() and not list(tree.parent.glob("*.tmp"))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("label cache not written" in m for m in debug)


def test_yolo_folder_is_cached_too(tmp_path, monkeypatch):
    folder = tmp_path / "labels"
    folder.mkdir()
    (folder / "classes.txt").write_text("car\n")
    (folder / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
    first = read_dataset(folder)
    assert (folder / "labels.cache").is_file() and kinds(first) == {"unknown class": 1}
    monkeypatch.setattr(labels, "read_yolo_labels", no_parsing)
    assert read_dataset(folder).problems == first.problems


VOC = """<annotation><filename>1.jpg</filename><size><width>100</width><height>200</height></size>
<object><name>dog</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>31</xmax><ymax>61</ymax>
</bndbox></object>
<object><name>dog</name><bndbox><xmin>50</xmin><ymin>21</ymin><xmax>20</xmax><ymax>61</ymax>
</bndbox></object>
<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>900</xmax><ymax>61</ymax>
</bndbox></object>
</annotation>"""


def test_voc_inverted_and_out_of_range_boxes_are_dropped_and_reported(tmp_path):
    xml = tmp_path / "1.xml"
    xml.write_text(VOC)
    (tmp_path / "1.jpg").write_bytes(JPEG)
    ds = read_dataset(xml)
    item = ds.items[0]
    assert len(item) == 1 and ds.names == ["cat", "dog"] and item.classes.tolist() == [1]
    assert [str(p) for p in ds.problems] == [
        f"{xml}: object 2 (dog): inverted or empty box (50.0, 21.0, 20.0, 61.0) "
        f"(xmax <= xmin or ymax <= ymin)",
        f"{xml}: object 3 (cat): coordinates [4.495, 0.15, 8.99, 0.3] are not normalised to "
        f"[0, 1] (cx cy w h as fractions of the image size)"]
    assert kinds(ds) == {"bad box": 2}
    with pytest.raises(DataError, match=r"1\.xml: object 2 \(dog\): inverted"):
        read_dataset(xml, strict=True)


def test_coco_bad_annotations_are_dropped_and_reported(tmp_path):
    (tmp_path / "a.jpg").write_bytes(JPEG)
    ann = [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [10, 10, 20, 20]},
           {"id": 2, "image_id": 5, "category_id": 1, "bbox": [10, 10, 0, 20]},
           {"id": 3, "image_id": 5, "category_id": 9, "bbox": [10, 10, 20, 20]},
           {"id": 4, "image_id": 5, "category_id": 1, "bbox": "wide"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"images": [{"id": 5, "file_name": "a.jpg", "width": 100,
                                            "height": 100}],
                                "annotations": ann, "categories": [{"id": 1, "name": "x"}]}))
    ds = read_dataset(path)
    assert len(ds.items[0]) == 1
    assert kinds(ds) == {"bad box": 1, "unknown class": 1, "malformed label": 1}
    assert str(ds.problems[0]).startswith(f"{path}: annotations[1] (id 2): bbox [10, 10, 0, 20]")


@pytest.mark.parametrize("command", [["eval", "--weights", "none.weights"],
                                     ["train", "--max-batches", "1", "--workers", "0"]])
def test_cli_strict_exits_2_on_a_bad_label(tree, command):
    """--strict stops before a model is loaded: the summary logged, one error line, exit code 2."""
    run = subprocess.run([sys.executable, "-m", "detkit", *command, "--cfg",
                          str(REPO / "cfg" / "yolov3-tiny.cfg"), "--data", str(tree), "--strict"],
                         capture_output=True, text=True, timeout=120, cwd=tree.parent)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: 10 label problems in {tree}"), run.stderr
    assert "mixed.txt:2: coordinates" in run.stderr and "Traceback" not in run.stderr


def test_voc_file_that_is_not_xml_is_left_out_with_its_line(tmp_path):
    (tmp_path / "1.xml").write_text(VOC)
    (tmp_path / "1.jpg").write_bytes(JPEG)
    (tmp_path / "2.xml").write_text("<annotation>\n<object>\n</annotation>\n")
    ds = read_dataset(tmp_path)
    assert [it.source.name for it in ds.items] == ["1.xml"]
    broken = [p for p in ds.problems if p.kind == "unreadable label file"]
    assert len(broken) == 1 and broken[0].where == f"{tmp_path / '2.xml'}:3"
