"""`make gpu-check`: the CUDA test set and the GPU timings in one prepared run.

Without CUDA it prints one line saying `no CUDA device` and exits 0. With CUDA, within about
eight minutes and installing nothing:
  1. `pytest -m gpu` (tests/test_gpu.py and the other gpu-marked tests);
  2. `detkit benchmark` of yolov3-tiny and yolov3 at 416 and ssd300 at 300, batch 1 and 64,
     fp16 and bf16 (p50/p99 latency, images/s, share of the device's peak);
  3. the video pipeline end to end on bikes.mp4 (yolov3-tiny, fp16): frames per second;
  4. training images/s of yolov3 at 416 with AMP (fp16), on synthetic squares;
and writes every figure to bench/results/gpu-<device>.json (a copy under $OUT when set, which is
where the device tool fetches files from). A step that fails is recorded with its error and the
run goes on. The GPU machine has no darknet: photos come from DETKIT_PHOTOS (default
assets/photos), the COCO weights from weights/, the video from assets/video/.

    python bench/gpu_check.py [--skip-tests] [--only tiny] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# network -> (cfg, input size); timed at batch 1 and 64 in fp16 and bf16
NETWORKS = {"tiny": ("cfg/yolov3-tiny.cfg", 416), "yolov3": ("cfg/yolov3.cfg", 416),
            "ssd300": ("cfg/ssd300.cfg", 300)}
PRECISIONS = {"fp16": "--half", "bf16": "--bf16"}
STEP_TIMEOUT_S = {"tests": 300, "benchmark": 60, "video": 90, "train": 90}


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (the JSON's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def environment() -> dict[str, str]:
    """The repo importable in every child, darknet's photos where the tests look for them."""
    photos = os.environ.get("DETKIT_PHOTOS") or str(REPO / "assets" / "photos")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, DETKIT_PHOTOS=photos, PYTHONUNBUFFERED="1")


# -- 1. the CUDA test set -------------------------------------------------------------------------

def junit_summary(xml_text: str) -> dict:
    """Counts and the failed tests' ids from pytest's --junitxml report."""
    root = ET.fromstring(xml_text)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = failed = skipped = 0
    failures = []
    for suite in suites:
        for case in suite.iter("testcase"):
            total += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("skipped") is not None:
                skipped += 1
            elif case.find("failure") is not None or case.find("error") is not None:
                failed += 1
                failures.append(name)
    return {"tests": total - skipped, "tests_failed": failed, "tests_skipped": skipped,
            "failed_tests": failures}


def run_tests(work: Path) -> dict:
    report = work / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests"]
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                         timeout=STEP_TIMEOUT_S["tests"])
    summary = junit_summary(report.read_text()) if report.exists() else {
        "tests": 0, "tests_failed": 1, "tests_skipped": 0, "failed_tests": ["pytest did not run"]}
    summary["tests_seconds"] = round(time.perf_counter() - start, 1)
    summary["tests_output_tail"] = (run.stdout + run.stderr)[-4000:]
    return summary


# -- 2. detkit benchmark ------------------------------------------------------------------------

def benchmark_figures(report: dict) -> dict:
    """One `detkit benchmark --json` file -> per batch size p50/p99 ms, images/s, peak share."""
    figures = {}
    for result in report["benchmark"]["results"]:
        timing = result["model"]
        figures[f"b{result['batch']}"] = {
            "p50_ms": timing["latency_ms_p50"], "p99_ms": timing["latency_ms_p99"],
            "img_s": timing["images_per_s"], "peak_share": result["peak_share"],
            "memory_mb": result["peak_memory_mb"]}
    return figures


def run_benchmark(network: str, precision: str, work: Path) -> dict:
    cfg, size = NETWORKS[network]
    out = work / f"bench-{network}-{precision}.json"
    command = [sys.executable, "-m", "detkit", "benchmark", cfg, "--device", "cuda",
               PRECISIONS[precision], "--img-size", str(size), "--batch", "1,64", "--warmup", "10",
               "--iters", "50", "--no-e2e", "--json", str(out)]
    run = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                         timeout=STEP_TIMEOUT_S["benchmark"])
    if run.returncode != 0:
        raise RuntimeError((run.stderr or run.stdout)[-800:])
    return benchmark_figures(json.loads(out.read_text()))


# -- 3. video end to end and 4. training -------------------------------------------------------

def video_fps(work: Path) -> float:
    """bikes.mp4 through the detect pipeline (decode, letterbox, network, NMS, drawing, writing),
    yolov3-tiny fp16; the second of two runs (the first captures graphs and tunes cudnn)."""
    from detkit.engine.predict import Detector
    from detkit.engine.run import DetectSettings, run_detect
    from detkit.engine.sources import resolve_sources

    video = REPO / "assets" / "video" / "bikes.mp4"
    detector = Detector(REPO / "cfg" / "yolov3-tiny.cfg", REPO / "weights" / "yolov3-tiny.weights",
                        device="cuda", half=True)
    rate = 0.0
    for attempt in range(2):
        settings = DetectSettings(out_dir=work / f"video{attempt}", batch=32, progress=False)
        start = time.perf_counter()
        summary = run_detect(detector, resolve_sources([str(video)]), settings)
        rate = summary.frames / (time.perf_counter() - start)
    return rate


def train_img_s(work: Path) -> float:
    """yolov3 at 416, 80 classes from scratch, AMP fp16, batch 32: images/s of iterations 6-20."""
    sys.path.insert(0, str(REPO / "bench"))
    from squares import square_images
    from train_speed import training_rate

    from detkit.cli_train import load_split
    from detkit.engine.train import TrainOptions

    items, _ = load_split(square_images(work / "squares", 64, 416, seed=0), "train")
    options = TrainOptions(cfg=REPO / "cfg" / "yolov3.cfg", train=items, val=[], out=work / "train",
                           device="cuda", amp="fp16", batch=32, subdivisions=1, max_batches=20,
                           burn_in=0, eval_interval=10**9, checkpoint_interval=10**9, workers=8,
                           multiscale=False, quiet=True)
    rate, _, _ = training_rate(options, skip=5)
    return rate


# -- the record ---------------------------------------------------------------------------------

def gpu_record(device: dict, tests: dict, benchmarks: dict, video: float | None,
               train: float | None, errors: dict) -> dict:
    """Everything measured, with the headline keys first (fp16 where a precision is implied)."""
    def pick(network: str, batch: str, figure: str) -> float | None:
        return benchmarks.get(network, {}).get("fp16", {}).get(batch, {}).get(figure)

    return {"device": device["name"], "tests": tests.get("tests", 0),
            "tests_failed": tests.get("tests_failed", 0),
            "yolov3_b1_ms": pick("yolov3", "b1", "p50_ms"),
            "yolov3_b64_img_s": pick("yolov3", "b64", "img_s"),
            "tiny_b1_ms": pick("tiny", "b1", "p50_ms"),
            "ssd300_b64_img_s": pick("ssd300", "b64", "img_s"),
            "video_tiny_fps": video, "train_img_s": train,
            "failed_tests": tests.get("failed_tests", []), "device_info": device,
            "benchmarks": benchmarks, "errors": errors,
            "tests_detail": {k: v for k, v in tests.items() if k not in ("tests", "tests_failed")}}


def write_record(record: dict, folders: list[Path]) -> list[Path]:
    name = f"gpu-{device_slug(record['device'])}.json"
    written = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(record, indent=2) + "\n")
        written.append(folder / name)
    return written


def device_info() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def measure(what: str, errors: dict, step, *args):
    """Run one step; a failure is recorded under its name and gives None."""
    try:
        return step(*args)
    except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others' figures
        errors[what] = f"{type(exc).__name__}: {exc}"[-1000:]
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", default=",".join(NETWORKS), help="networks to time")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}); nothing to check")
        return 0
    device = device_info()
    print(f"gpu-check on {device['name']} (torch {device['torch']}, CUDA {device['cuda']})",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="detkit-gpu-check-"))
    errors: dict[str, str] = {}
    tests = {} if args.skip_tests else (measure("tests", errors, run_tests, work) or {})
    print(f"tests: {tests.get('tests', 0)} run, {tests.get('tests_failed', 0)} failed "
          f"{tests.get('failed_tests', [])}", flush=True)
    benchmarks: dict[str, dict] = {}
    for network in [n for n in args.only.split(",") if n]:
        for precision in PRECISIONS:
            figures = measure(f"benchmark {network} {precision}", errors, run_benchmark, network,
                              precision, work)
            if figures is not None:
                benchmarks.setdefault(network, {})[precision] = figures
                print(f"{network} {precision}: {json.dumps(figures)}", flush=True)
    video = measure("video", errors, video_fps, work)
    train = measure("train", errors, train_img_s, work)
    record = gpu_record(device, tests, benchmarks, video, train, errors)
    folders = [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for path in write_record(record, folders):
        print(f"written {path}")
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, (dict, list))}))
    return 0 if not errors and not record["tests_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
