"""A 3-iteration smoke of the side-by-side training benchmark (bench/train_vs_darknet.py): both
trainers start from the same pretrained convolutions on the same cfg file, and darknet's
weights load into `detkit eval` (the figures themselves are a benchmark, not a test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, REQUIRE_REFERENCE

sys.path.insert(0, str(REPO / "bench"))
import train_vs_darknet as side_by_side  # noqa: E402


@pytest.fixture()
def three_iteration_cfg(tmp_path: Path) -> Path:
    if not side_by_side.TREES.exists():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{side_by_side.TREES} missing: run `make trees`")
        pytest.skip("tree data set not built (make trees)")
    text = side_by_side.CFG.read_text()
    assert "max_batches=200" in text
    cfg = tmp_path / side_by_side.CFG.name
    cfg.write_text(text.replace("max_batches=200", "max_batches=3"))
    return cfg


@pytest.mark.slow
@pytest.mark.reference
def test_both_trainers_run_and_are_scored_the_same_way(three_iteration_cfg, tiny_weights, tmp_path):
    darknet = side_by_side.run_darknet(1, three_iteration_cfg, tmp_path)
    detkit = side_by_side.run_detkit(0, three_iteration_cfg, tmp_path)
    for result in (darknet, detkit):
        assert result["iterations"] == 3 and result["images"] == 24, result
        assert Path(result["weights"]).stat().st_size > 0
        assert 0.0 <= result["ap50"] <= 1.0 and 0.0 <= result["ap"] <= result["ap50"]
        assert 0.0 <= result["darknet_recall"]["recall"] <= 1.0
        assert result["darknet_recall"]["proposals_per_image"] > 0  # darknet read the weights
    saved = json.loads((tmp_path / "darknet-1" / "result.json").read_text())
    assert saved["trainer"] == "darknet" and saved["ap50"] == darknet["ap50"]
    # darknet trained through its own loop: one progress line per iteration, 8 images each
    log = (tmp_path / "darknet-1" / "train.log").read_text()
    assert [int(m[0]) for m in side_by_side.DARKNET_LINE.findall(log)] == [1, 2, 3]


@pytest.mark.reference
def test_the_pretrained_convolutions_are_cut_without_leaving_files_in_the_repository(
        tiny_weights, tmp_path, monkeypatch):
    """`darknet partial` runs in the repository's root; its output goes beside the weights it
    writes (once it went to a stray command.log in the root). `tiny_weights`: the COCO weights
    it cuts must be there; the `reference` mark skips the test without darknet."""
    monkeypatch.setattr(side_by_side, "CONV15", tmp_path / "yolov3-tiny.conv.15")
    before = sorted(p.name for p in REPO.iterdir())
    conv15 = side_by_side.ensure_conv15()
    assert conv15.stat().st_size > 0
    assert "Saving weights to" in (tmp_path / "yolov3-tiny.conv.15.log").read_text()
    assert sorted(p.name for p in REPO.iterdir()) == before
