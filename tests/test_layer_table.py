"""`detkit benchmark --no-fps` prints darknet's own layer table, BFLOPs and shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DARKNET_CFG, REPO

from detkit.bench import layer_table
from detkit.model import model_from_cfg

CFGS = ["yolov2", "yolov2-voc", "yolov2-tiny", "yolov2-tiny-voc", "yolov3", "yolov3-voc",
        "yolov3-tiny", "yolov3-spp", "yolov3-openimages", "darknet19", "darknet53"]

DARKNET_TABLE = """
import ctypes, sys
lib = ctypes.CDLL("/usr/lib/darknet/libdarknet.so")
lib.load_network.restype = ctypes.c_void_p
lib.load_network(sys.argv[1].encode(), None, 0)
"""


def darknet_printed_table(cfg) -> list[str]:
    """The table libdarknet prints to stderr while it parses a cfg."""
    run = subprocess.run([sys.executable, "-c", DARKNET_TABLE, str(cfg)], capture_output=True,
                         text=True, timeout=120)
    lines = run.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer     filters"))
    return [line for line in lines[start:] if line.startswith(("layer", "  "))
            and not line.strip().isdigit()]


@pytest.mark.reference
@pytest.mark.parametrize("name", CFGS)
def test_table_equals_darknets(name):
    cfg = DARKNET_CFG / f"{name}.cfg"
    ours = layer_table(model_from_cfg(cfg)).format().splitlines()
    theirs = darknet_printed_table(cfg)
    assert ours[:len(theirs)] == theirs


@pytest.mark.parametrize("name,size,pj,ab", [("yolov3", 416, 65.864, 65.879),
                                             ("yolov2-voc", 416, 29.360, 29.371),
                                             ("yolov3-tiny", 416, 5.565, 5.571),
                                             ("yolov3", 608, 140.692, None)])
def test_totals_both_conventions(name, size, pj, ab):
    table = layer_table(model_from_cfg(DARKNET_CFG / f"{name}.cfg"), (size, size))
    assert round(table.bflops, 3) == pytest.approx(pj, abs=0.002)
    if ab is not None:
        assert round(table.bflops_alexeyab, 3) == pytest.approx(ab, abs=0.002)


def test_benchmark_cli_json_and_size(tmp_path):
    out = tmp_path / "t.json"
    run = subprocess.run([sys.executable, "-m", "detkit", "benchmark", str(REPO / "cfg" / "yolov3.cfg"),
                          "--no-fps", "--img-size", "416", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Total BFLOPs (FLOPs = 2 x MACs, conv only, as pjreddie): 65.864" in run.stdout
    data = json.loads(out.read_text())
    assert data["input_size"] == [416, 416] and len(data["layers"]) == 107
    assert data["params"] == 61_949_149
    assert data["layers"][0]["output"] == [416, 416, 32]
