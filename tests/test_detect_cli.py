"""`detkit detect` end to end, as a user runs it: a subprocess, real files, real outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DARKNET_DATA = Path("/usr/share/darknet/data")
TINY_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
BIKES = REPO / "assets" / "video" / "bikes.mp4"
REQUIRE_REFERENCE = os.environ.get("DETKIT_REQUIRE_REFERENCE") == "1"


@pytest.fixture(scope="module")
def official_weights() -> Path:
    if not TINY_WEIGHTS.is_file():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{TINY_WEIGHTS} missing: run `make assets`")
        pytest.skip("official yolov3-tiny weights not fetched (make assets)")
    return TINY_WEIGHTS


def photo(name: str) -> Path:
    path = DARKNET_DATA / f"{name}.jpg"
    if not path.is_file():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{path} missing (apt-get install darknet)")
        pytest.skip(f"{path} missing (apt-get install darknet)")
    return path


def start_detkit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start the CLI exactly as installed (`python -m detkit` is the `detkit` entry point)."""
    full_env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", **(env or {})}
    full_env.pop("DISPLAY", None)
    return subprocess.Popen([sys.executable, "-m", "detkit", "detect", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def detkit(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = start_detkit(*args, cwd=cwd, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_photo_folder_with_a_corrupt_file(official_weights, tmp_path):
    """Folder in, annotated images + labels + COCO JSON out; the corrupt file is warned
    about, skipped, counted and fails the run at the end; the default output is a new
    runs/detect/expN."""
    from pycocotools.coco import COCO

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(photo("dog"), photos / "000000000042.jpg")  # numeric stem -> image_id 42
    shutil.copy(photo("person"), photos / "person.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    (tmp_path / "runs" / "detect" / "exp").mkdir(parents=True)  # an earlier run
    result = detkit(str(photos), "--device", "cpu", "--save-json", "results.json", "--save-txt",
                    "--save-conf", "--precision", "fp32", cwd=tmp_path)   # darknet's scores
    # the unreadable file fails the run at the end (exit 2); the readable ones are all saved
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 source(s) could not be read")
    out = tmp_path / "runs" / "detect" / "exp2"
    lines = result.stdout.splitlines()
    dog_line = next(line for line in lines if line.startswith("000000000042.jpg: "))
    for label in ("dog 0.56", "bicycle 0.59", "car 0.62", "truck 0.55"):
        assert label in dog_line
    assert dog_line.endswith(" ms)")
    assert any(line.startswith("person.jpg: ") and "person" in line for line in lines)
    assert "warning: cannot read image" in result.stderr and "broken.jpg" in result.stderr
    summary = "\n".join(lines[-4:])
    assert "2 images" in summary and "1 unreadable image(s) skipped" in summary
    assert f"results saved to {Path('runs/detect/exp2')}" in summary

    for name in ("000000000042.jpg", "person.jpg"):
        annotated = cv2.imread(str(out / name))
        assert annotated is not None and annotated.shape == cv2.imread(str(photos / name)).shape
    assert not (out / "broken.jpg").exists()

    labels = sorted((out / "labels").glob("*.txt"))
    assert [p.name for p in labels] == ["000000000042.txt", "person.txt"]
    rows = [line.split() for p in labels for line in p.read_text().splitlines()]
    assert rows
    for row in rows:
        assert len(row) == 6 and 0 <= int(row[0]) < 80
        values = [float(v) for v in row[1:]]
        assert all(0.0 <= v <= 1.0 for v in values[:4]) and 0.25 < values[4] <= 1.0

    records = json.loads((tmp_path / "results.json").read_text())
    image_ids = sorted({r["image_id"] for r in records})
    assert 42 in image_ids and len(image_ids) == 2
    dog_rows = [r for r in records if r["image_id"] == 42]
    assert {r["category_id"] for r in dog_rows} >= {2, 3, 8, 18}  # COCO ids: bicycle car truck dog
    gt = {"images": [{"id": i, "width": 768, "height": 576, "file_name": f"{i}.jpg"} for i in image_ids],
          "annotations": [],
          "categories": [{"id": c, "name": str(c)} for c in range(1, 91)]}
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    loaded = coco.loadRes(str(tmp_path / "results.json"))
    assert len(loaded.getAnnIds()) == len(records)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The first 30 frames of bikes.mp4 (a synthetic clip when the asset is absent)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    if BIKES.is_file():
        cap = cv2.VideoCapture(str(BIKES))
        size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        frames = [cap.read()[1] for _ in range(30)]
        cap.release()
    else:
        size = (320, 192)
        dog = cv2.resize(cv2.imread(str(photo("dog"))), size)
        frames = [np.roll(dog, 4 * i, axis=1) for i in range(30)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, size)
    for frame in frames:
        writer.write(frame)
    writer.release()
    assert count_frames(path) == 30
    return path


def test_video_frame_count_size_and_fps_are_kept(official_weights, clip, tmp_path):
    result = detkit(str(clip), "--device", "cpu", "--batch", "4", "--img-size", "320", "--out",
                    "out", "--save-txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "30 video frames" in result.stdout
    # stderr is a pipe, not a terminal: no progress bar redrawn with \r into the captured log
    assert "\r" not in result.stderr and "frame/s" not in result.stderr, result.stderr
    out = tmp_path / "out" / "clip.mp4"
    assert count_frames(out) == 30
    src, dst = cv2.VideoCapture(str(clip)), cv2.VideoCapture(str(out))
    for prop in (cv2.CAP_PROP_FRAME_WIDTH, cv2.CAP_PROP_FRAME_HEIGHT, cv2.CAP_PROP_FPS):
        assert dst.get(prop) == pytest.approx(src.get(prop))
    src.release()
    dst.release()
    labels = list((tmp_path / "out" / "labels").glob("clip_*.txt"))
    assert len(labels) == 30
    rows = [line.split() for p in labels for line in p.read_text().splitlines()]
    assert rows and {len(row) for row in rows} == {5}  # no --save-conf: no score column


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The three error cases, started together: each is ~all interpreter start-up, so running
    them side by side keeps the suite fast on a small CI machine."""
    cases: dict[str, tuple[list[str], dict]] = {}
    dirs: dict[str, Path] = {}
    for name in ("missing", "unwritable", "weights"):
        dirs[name] = tmp_path_factory.mktemp(name)
    cases["missing"] = ([str(dirs["missing"] / "photos"), "nope.jpg"], {})
    blocker = dirs["unwritable"] / "a_file"
    blocker.write_text("")
    cases["unwritable"] = ([str(photo("dog")), "--out", str(blocker / "out")], {})
    home = dirs["weights"] / "home"
    (home / "cfg").mkdir(parents=True)
    shutil.copy(REPO / "cfg" / "yolov3-tiny.cfg", home / "cfg" / "yolov3-tiny.cfg")
    cases["weights"] = ([str(photo("dog"))], {"DETKIT_HOME": str(home)})
    procs = {name: start_detkit(*args, cwd=dirs[name], env=env)
             for name, (args, env) in cases.items()}
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                         dirs[name])
    return results


def test_missing_source_fails_before_any_work(error_runs):
    result, cwd = error_runs["missing"]
    line = one_error_line(result)
    assert "not found" in line and "photos" in line
    assert not (cwd / "runs").exists()  # no run folder was created


def test_unwritable_out_fails_before_any_work(error_runs):
    result, _ = error_runs["unwritable"]
    line = one_error_line(result)
    assert "--out" in line and "not writable" in line
    assert result.stdout == ""


def test_missing_default_weights_say_how_to_get_them(error_runs):
    result, _ = error_runs["weights"]
    line = one_error_line(result)
    assert "make assets" in line and "yolov3-tiny.weights" in line
