"""bench/peers.py keeps the latest figures and one history file, not a file per run."""

from __future__ import annotations

import importlib.util
import json
import sys

from conftest import REPO


def load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_run(date: str, median_ms: float) -> dict:
    peer = {"label": "detkit fast path", "info": "", "error": None, "median_ms": median_ms,
            "samples_ms": [median_ms]}
    return {"date": date, "threads": 2, "rounds": 1, "command": "peers.py",
            "machine": {"cpu": "test", "logical_cpus": 2, "platform": "test", "python": "3"},
            "load_before": 0.0, "load_after": 0.0, "models": {"yolov3-tiny": {"detkit-fast": peer}}}


def test_each_run_replaces_latest_and_appends_one_history_line(tmp_path):
    peers = load_peers()
    peers.write_results(fake_run("2026-12-07T01:00:00", 30.0), tmp_path)
    peers.write_results(fake_run("2026-12-07T02:00:00", 25.0), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers-history.jsonl", "peers-latest.json",
                                                          "peers-latest.md"]
    history = [json.loads(line) for line in (tmp_path / "peers-history.jsonl").read_text().splitlines()]
    assert [run["date"] for run in history] == ["2026-12-07T01:00:00", "2026-12-07T02:00:00"]
    assert json.loads((tmp_path / "peers-latest.json").read_text())["date"] == "2026-12-07T02:00:00"
    assert "| detkit fast path | 25.0 |" in (tmp_path / "peers-latest.md").read_text()


def test_the_committed_history_ends_with_the_latest_runs():
    """Each kind of run's latest file (batch size, end to end) is its last history line."""
    peers = load_peers()
    results = REPO / "bench" / "results"
    history = [json.loads(line) for line in (results / "peers-history.jsonl").read_text().splitlines()]
    latest_by_stem = {peers.latest_stem(run): run for run in history}
    for stem, run in latest_by_stem.items():
        if (results / f"{stem}.json").exists() or stem == "peers-latest":
            assert run == json.loads((results / f"{stem}.json").read_text()), stem
    allowed = {"peers-history.jsonl"} | {f"{stem}.{ext}" for stem in latest_by_stem
                                         for ext in ("json", "md")}
    peers_files = {p.name for p in results.iterdir() if p.name.startswith("peers")}
    assert peers_files <= allowed and "peers-latest.json" in peers_files


def test_batch_runs_have_their_own_latest_files(tmp_path):
    peers = load_peers()
    run = fake_run("2026-12-07T03:00:00", 90.0)
    run["batch"] = 8
    peers.write_results(run, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "peers-history.jsonl", "peers-latest-batch8.json", "peers-latest-batch8.md"]
    assert "batch 8" in (tmp_path / "peers-latest-batch8.md").read_text()


def test_end_to_end_runs_have_their_own_latest_files(tmp_path):
    peers = load_peers()
    run = fake_run("2026-12-07T04:00:00", 40.0)
    run["end_to_end"] = True
    run["models"]["yolov3-tiny"]["detkit-fast"].update(detections=3, matched=3)
    peers.write_results(run, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "peers-history.jsonl", "peers-latest-e2e.json", "peers-latest-e2e.md"]
    assert "| 3 | 3 of 3 |" in (tmp_path / "peers-latest-e2e.md").read_text()


def test_boxes_are_matched_by_class_iou_and_score():
    peers = load_peers()
    reference = [[0, 0, 100, 100, 0.9, 1], [200, 200, 300, 300, 0.5, 2]]
    assert peers.count_matched(reference, [[1, 1, 100, 100, 0.88, 1], [200, 200, 300, 300, 0.5, 2]]) == 2
    assert peers.count_matched(reference, [[1, 1, 100, 100, 0.88, 0]]) == 0       # other class
    assert peers.count_matched(reference, [[20, 0, 100, 100, 0.9, 1]]) == 0       # IoU 0.8
    assert peers.count_matched(reference, [[0, 0, 100, 100, 0.8, 1]]) == 0        # score off by 0.1
    assert peers.count_matched(reference + reference[:1], [[0, 0, 100, 100, 0.9, 1]]) == 1  # once
