"""`detkit benchmark`: latency percentiles, throughput, memory and FLOP rates, and its JSON.

Only that the measurement is well-formed is tested here; speed claims live in bench/.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_fast import MINI_YOLO
from typer.testing import CliRunner

from detkit.bench import (
    PEAK_TFLOPS,
    BenchReport,
    peak_tflops,
    run_benchmark,
    synthetic_images,
    time_calls,
    timing_from_samples,
)
from detkit.cli import app
from detkit.errors import DetkitError
from detkit.model import model_from_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_percentiles_and_throughput():
    t = timing_from_samples(4, [float(v) for v in range(1, 102)])   # 1..101 ms
    assert (t.latency_ms_p50, t.latency_ms_p90, t.latency_ms_p99) == (51.0, 91.0, 100.0)
    assert t.images_per_s == pytest.approx(4 * 1000 / 51.0)
    with pytest.raises(DetkitError):
        timing_from_samples(1, [])


def test_time_calls_excludes_warmup():
    calls = []
    samples = time_calls(lambda: calls.append(1), torch.device("cpu"), warmup=3, iters=5)
    assert len(calls) == 8 and len(samples) == 5 and min(samples) >= 0


def test_peak_table_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "float16") == PEAK_TFLOPS["H100"]["float16"]
    assert peak_tflops("AMD EPYC", "float32") is None


def test_synthetic_images_are_deterministic_photos():
    a, b = synthetic_images(2), synthetic_images(2)
    assert a[0].shape == (480, 640, 3) and a[0].dtype.name == "uint8"
    assert (a[1] == b[1]).all() and not (a[0] == a[1]).all()


@pytest.mark.parametrize("fast", [True, False])
def test_run_benchmark_report(fast):
    model = model_from_text(MINI_YOLO).eval()
    report = run_benchmark(model, "mini", (96, 96), [1, 2], device="cpu", fast=fast, warmup=1,
                           iters=3, progress=False)
    assert isinstance(report, BenchReport) and report.fast is fast
    assert [r.batch for r in report.results] == [1, 2]
    for r in report.results:
        for t in (r.model, r.end_to_end):
            assert t.iters == 3 and 0 < t.latency_ms_p50 <= t.latency_ms_p90 <= t.latency_ms_p99
        assert r.peak_memory_mb > 0 and r.achieved_tflops > 0 and r.peak_share is None
    text = report.format()
    assert "end to end" in text and "p99 ms" in text and "FLOPs = 2 x MACs" in text
    json.dumps(report.to_dict())


def test_cli_benchmark_json(tmp_path):
    cfg = tmp_path / "mini.cfg"
    cfg.write_text(MINI_YOLO)
    out = tmp_path / "b.json"
    run = CliRunner().invoke(app, ["benchmark", str(cfg), "--batch", "1,2", "--device", "cpu",
                                   "--warmup", "1", "--iters", "2", "--json", str(out),
                                   "--precision", "fp32"])
    assert run.exit_code == 0, run.output
    assert "Total BFLOPs" in run.output and "images/s" in run.output
    assert "precision fp32; OpenMP wait policy " in run.output
    data = json.loads(out.read_text())
    bench = data["benchmark"]
    assert bench["dtype"] == "float32" and bench["fast"] is True and bench["precision"] == "fp32"
    assert bench["openmp_wait_policy"]
    assert [r["batch"] for r in bench["results"]] == [1, 2]
    assert set(bench["results"][0]["model"]) >= {"latency_ms_p50", "latency_ms_p90",
                                                  "latency_ms_p99", "images_per_s"}


@pytest.mark.parametrize("args,message", [(["--batch", "0"], "positive"),
                                          (["--batch", "a"], "integers"),
                                          (["--half", "--bf16"], "exclude")])
def test_cli_benchmark_bad_arguments(tmp_path, args, message):
    cfg = tmp_path / "mini.cfg"
    cfg.write_text(MINI_YOLO)
    run = CliRunner().invoke(app, ["benchmark", str(cfg), *args])
    assert isinstance(run.exception, DetkitError) and message in str(run.exception)


@pytest.mark.gpu
def test_cuda_benchmark_reports_flop_share():
    model = model_from_text(MINI_YOLO).eval()
    report = run_benchmark(model, "mini", (96, 96), [1, 4], device="cuda", half=True, warmup=2,
                           iters=5, progress=False)
    assert report.dtype == "float16"
    for r in report.results:
        assert r.peak_memory_kind == "cuda max allocated" and r.achieved_tflops > 0
        if report.peak_tflops:
            assert 0 < r.peak_share < 1
