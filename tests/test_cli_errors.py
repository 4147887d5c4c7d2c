"""Bad cfgs and weights through the CLI: one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"
BAD_CFGS = {
    "unknown section": ("[bogus]\n", "bad.cfg:5: unknown section [bogus]"),
    "unsupported section": ("[local]\n", "bad.cfg:5: section [local] is not supported"),
    "malformed line": ("[convolutional]\nfilters 8\n", "bad.cfg:6: malformed line 'filters 8'"),
    "non-numeric": ("[convolutional]\nsize=big\n", "bad.cfg:6: [convolutional] 'size=big' is not an integer"),
    "route out of range": ("[convolutional]\n[route]\nlayers=4\n", "bad.cfg:7: [route] 'layers' refers to layer 4"),
    "shortcut out of range": ("[convolutional]\n[shortcut]\nfrom=-9\n", "bad.cfg:7: [shortcut] 'from' refers to layer -9"),
    "yolo filters": ("[convolutional]\nfilters=18\n[yolo]\nmask=0,1,2\nnum=3\nclasses=2\nanchors=1,1,2,2,3,3\n",
                     "len(mask)*(classes+5) = 3*(2+5) = 21"),
    "region filters": ("[convolutional]\nfilters=18\n[region]\nnum=2\nclasses=2\nanchors=1,1,2,2\n",
                       "num*(classes+coords+1) = 2*(2+4+1) = 14"),
}


def detkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detkit", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def assert_one_line_error(run: subprocess.CompletedProcess, expected: str) -> None:
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert expected in lines[0]
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("kind", list(BAD_CFGS))
def test_bad_cfg(tmp_path, kind):
    body, expected = BAD_CFGS[kind]
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(NET + body)
    assert_one_line_error(detkit("benchmark", str(cfg), "--no-fps"), expected)


def test_missing_cfg(tmp_path):
    assert_one_line_error(detkit("benchmark", str(tmp_path / "none.cfg"), "--no-fps"), "cfg file not found")


@pytest.mark.parametrize("payload,expected", [
    (b"\x01\x02", "too short for a darknet .weights header"),
    (np.array([0, 2, 0, 0, 0], "<i4").tobytes() + np.zeros(7, "<f4").tobytes(),
     "the cfg needs 8,858,734 floats but the file holds 7"),
    (np.array([0, 2, 0, 0, 0], "<i4").tobytes() + b"\x00" * 6, "whole number of float32"),
])
def test_bad_weights(tmp_path, payload, expected):
    weights = tmp_path / "bad.weights"
    weights.write_bytes(payload)
    run = detkit("benchmark", str(REPO / "cfg" / "yolov3-tiny.cfg"), "--weights", str(weights), "--no-fps")
    assert_one_line_error(run, expected)


def test_unused_key_is_one_warning_line(tmp_path):
    cfg = tmp_path / "warn.cfg"
    cfg.write_text(NET + "[convolutional]\nfilters=4\nsparkle=1\n")
    run = detkit("benchmark", str(cfg), "--no-fps")
    assert run.returncode == 0
    assert run.stderr.strip() == f"warning: {cfg}:7: unused field 'sparkle = 1' in [convolutional]"


def test_help_keeps_darknet_section_names():
    """Help texts name cfg sections in brackets ([net]); they must not be read as rich markup
    and vanish (an earlier help printed "iterations (overrides )")."""
    run = detkit("train", "--help")
    assert run.returncode == 0, run.stderr
    assert "(overrides [net])" in " ".join(run.stdout.split())


@pytest.mark.parametrize("args", [
    ("train", "--data", "nothing.data", "--cfg", "cfg/yolov3-tiny.cfg", "--eval-tile", "8"),
    ("eval", "--data", "nothing.data", "--cfg", "cfg/yolov3-tiny.cfg", "--weights", "x.weights",
     "--tile-overlap", "1.5"),  # refused without --tile too
], ids=["train --eval-tile", "eval --tile-overlap"])
def test_bad_tiling_fails_before_any_work(args):
    expected = "--eval-tile 8: windows" if "--eval-tile" in args else "--tile-overlap 1.5 must be"
    assert_one_line_error(detkit(*args), expected)
