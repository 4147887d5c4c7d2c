"""bench/gpu_check.py on a machine without CUDA: the skip path, and the record it writes, built
from a real CPU `detkit benchmark --json` file and a fake pytest report (fake figures)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_gpu" name="test_a[fp16]"/>
<testcase classname="tests.test_gpu" name="test_b"><failure message="boom">x</failure></testcase>
<testcase classname="tests.test_fast" name="test_c"><error message="setup">y</error></testcase>
<testcase classname="tests.test_gpu" name="test_d"><skipped message="no"/></testcase>
</testsuite></testsuites>"""


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_make_gpu_check_without_cuda_says_so_in_one_line_and_exits_0():
    run = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_the_pytest_report_is_counted_with_the_failures_named():
    summary = load_gpu_check().junit_summary(JUNIT)
    assert summary == {"tests": 3, "tests_failed": 2, "tests_skipped": 1,
                       "failed_tests": ["tests.test_gpu::test_b", "tests.test_fast::test_c"]}


def test_a_real_benchmark_json_gives_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "detkit", "benchmark", "cfg/yolov3-tiny.cfg",
                          "--device", "cpu", "--img-size", "96", "--batch", "1,2", "--warmup", "1",
                          "--iters", "2", "--no-e2e", "--json", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = load_gpu_check().benchmark_figures(json.loads(out.read_text()))
    assert set(figures) == {"b1", "b2"}
    for batch, f in zip((1, 2), figures.values(), strict=True):
        assert 0 < f["p50_ms"] <= f["p99_ms"]
        assert f["img_s"] == pytest.approx(batch * 1000 / f["p50_ms"])
        assert f["peak_share"] is None          # no known peak for a CPU


def test_the_record_has_the_issues_keys_and_lands_under_the_device_name(tmp_path):
    gpu_check = load_gpu_check()
    fp16 = {"b1": {"p50_ms": 1.5, "p99_ms": 2.0, "img_s": 666.7, "peak_share": 0.01},
            "b64": {"p50_ms": 12.8, "p99_ms": 13.5, "img_s": 5000.0, "peak_share": 0.4}}
    benchmarks = {"yolov3": {"fp16": fp16, "bf16": fp16},
                  "tiny": {"fp16": {"b1": {"p50_ms": 0.5}}},
                  "ssd300": {"fp16": {"b64": {"img_s": 9000.0}}}}
    tests = gpu_check.junit_summary(JUNIT)
    record = gpu_check.gpu_record({"name": "NVIDIA H100 80GB HBM3"}, tests, benchmarks, 1234.5,
                                  None, {"train": "RuntimeError: out of memory"})
    assert {k: record[k] for k in ("device", "tests", "tests_failed", "yolov3_b1_ms",
                                   "yolov3_b64_img_s", "tiny_b1_ms", "ssd300_b64_img_s",
                                   "video_tiny_fps", "train_img_s")} == {
        "device": "NVIDIA H100 80GB HBM3", "tests": 3, "tests_failed": 2, "yolov3_b1_ms": 1.5,
        "yolov3_b64_img_s": 5000.0, "tiny_b1_ms": 0.5, "ssd300_b64_img_s": 9000.0,
        "video_tiny_fps": 1234.5, "train_img_s": None}
    assert record["errors"] == {"train": "RuntimeError: out of memory"}
    paths = gpu_check.write_record(record, [tmp_path / "results", tmp_path / "out"])
    assert [p.name for p in paths] == ["gpu-nvidia-h100-80gb-hbm3.json"] * 2
    assert json.loads(paths[0].read_text()) == record


def test_a_failed_step_is_recorded_and_the_run_goes_on():
    gpu_check = load_gpu_check()
    errors: dict[str, str] = {}

    def broken():
        raise RuntimeError("no video")

    assert gpu_check.measure("video", errors, broken) is None
    assert gpu_check.measure("train", errors, lambda: 42.0) == 42.0
    assert errors == {"video": "RuntimeError: no video"}
