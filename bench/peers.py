"""detkit against its peers, one run, side by side: same cfgs, weights, input and threads.

Peers (each in its own worker process, bench/peer_worker.py):
  detkit eager fp32, detkit fast path (detkit.fast) with its default passive OpenMP waiting and
  with spinning threads (a dedicated machine's setting), detkit's ONNX export on onnxruntime,
  detkit's fast path in bf16 and at its default precision (auto: bf16 on a CPU with bf16
  instructions), OpenVINO on detkit's ONNX export at its default precision and at f32 (in
  bench/.venv-openvino: OpenVINO and no torch),
  OpenCV DNN 4.x readNetFromDarknet (in bench/.venv-opencv, opencv-python-headless<5),
  the reference darknet (libdarknet, single-threaded by its build).
Networks: yolov3-tiny (official weights), yolov2-voc and yolov3 (random weights with calibrated
batch-norm statistics, bench/random_weights.py: timing does not depend on the values), all at
416x416, batch 1 (--batch N: N copies of the input, darknet left out); SSD300 for the peers
that run any detkit cfg (detkit's and OpenVINO on its ONNX) when cfg/ssd300.cfg exists.

Fairness: all workers are loaded first; then the peers are timed in interleaved rounds (each
round runs every peer a few times, the order rotating), so a change of machine load during the
run hits every peer alike. Thread counts are pinned (torch, OpenCV, onnxruntime,
OMP/MKL/OpenBLAS environment); darknet is single-threaded whatever is asked. The load average
before and after is recorded: other processes on a shared machine show up there.

End to end (--end-to-end): each timed call goes from the BGR photo to boxes in its pixels,
conf 0.25 and NMS 0.45 (detect's defaults): detkit's Detector with its own torch pipeline
(`detkit-detector`), and detkit's and the ONNX peers' forward passes inside one NumPy pipeline
(bench/numpy_pipeline.py: darknet's letterbox, the candidate rule, per-class NMS, box correction),
so those differ only in the network's runtime. Each peer's boxes are matched against the
Detector's (same class, IoU >= 0.9, score within 0.05) and the counts recorded.

Usage: bench/.venv-opencv must exist (`make bench-peers` creates it), then
    .venv/bin/python bench/peers.py [--threads 2] [--rounds 10] [--models yolov3-tiny,...]
Writes bench/results/peers-latest.md and .json, and appends the run to peers-history.jsonl
(one JSON object per line, oldest first: every run's figures, no file per run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
OPENCV_PY = BENCH / ".venv-opencv" / "bin" / "python"
OPENVINO_PY = BENCH / ".venv-openvino" / "bin" / "python"
RESULTS = BENCH / "results"
PHOTO = Path("/usr/share/darknet/data/dog.jpg")

# A dedicated machine's setting: OpenMP threads spin 10000 rounds before sleeping, as OpenCV's
# and onnxruntime's own pools spin. detkit's default waits passively (robust on a shared CPU).
SPINNING = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}
PEERS = {  # key -> (label, python, worker kind, environment over the pinned threads)
    "detkit-fast": ("detkit fast path", sys.executable, "detkit-fast", {}),
    "detkit-fast-spin": ("detkit fast path, OpenMP spinning (ACTIVE, GOMP_SPINCOUNT=10000)",
                         sys.executable, "detkit-fast", SPINNING),
    "detkit-auto": ("detkit default (precision auto)", sys.executable, "detkit-auto", {}),
    "detkit-auto-spin": ("detkit default, OpenMP spinning briefly (PASSIVE, GOMP_SPINCOUNT=3000)",
                         sys.executable, "detkit-auto", {"GOMP_SPINCOUNT": "3000"}),
    "detkit-bf16": ("detkit fast path bf16", sys.executable, "detkit-bf16", {}),
    "detkit-detector": ("detkit Detector, its own pipeline (precision auto)", sys.executable,
                        "detkit-detector", {}),
    "openvino": ("OpenVINO default precision", str(OPENVINO_PY), "openvino", {}),
    "openvino-f32": ("OpenVINO f32", str(OPENVINO_PY), "openvino-f32", {}),
    "onnxruntime": ("onnxruntime (own venv)", str(OPENVINO_PY), "onnxruntime", {}),
    "detkit-eager": ("detkit eager fp32", sys.executable, "detkit-eager", {}),
    "detkit-ort": ("detkit ONNX on onnxruntime", sys.executable, "detkit-ort", {}),
    "opencv": ("OpenCV DNN", str(OPENCV_PY), "opencv", {}),
    "darknet": ("reference darknet", sys.executable, "darknet", {}),
}
DETKIT_ONLY = ("detkit-fast", "detkit-fast-spin", "detkit-auto", "detkit-auto-spin", "detkit-bf16",
               "detkit-detector", "detkit-eager", "detkit-ort", "openvino", "openvino-f32",
               "onnxruntime")   # peers that run any detkit cfg
ONNX_PEERS = ("openvino", "openvino-f32", "onnxruntime")   # on detkit's export, bench/.venv-openvino
END_TO_END_PEERS = ("detkit-detector", "detkit-auto", "detkit-fast", "detkit-bf16", "detkit-ort",
                    "openvino", "openvino-f32", "onnxruntime")
MODELS = {  # name -> (cfg, weights or None for detkit-only random init, peers)
    "yolov3-tiny": ("cfg/yolov3-tiny.cfg", "weights/yolov3-tiny.weights", tuple(PEERS)),
    "yolov2-voc": ("cfg/yolov2-voc.cfg", "weights/yolov2-voc.random.weights", tuple(PEERS)),
    "yolov3": ("cfg/yolov3.cfg", "weights/yolov3.random.weights", tuple(PEERS)),
    "ssd300": ("cfg/ssd300.cfg", None, DETKIT_ONLY),
}
ALL_MODELS = "yolov3-tiny,yolov2-voc,yolov3,ssd300"
E2E_MODELS = "yolov3-tiny"
RANDOM_WEIGHTS = {"weights/yolov2-voc.random.weights": "cfg/yolov2-voc.cfg",
                  "weights/yolov3.random.weights": "cfg/yolov3.cfg"}


class Worker:
    """A peer_worker.py process spoken to with JSON lines."""

    def __init__(self, key: str, threads: int) -> None:
        label, python, kind, extra_env = PEERS[key]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), **extra_env)
        self.key, self.label = key, label
        self.proc = subprocess.Popen([python, str(BENCH / "peer_worker.py"), kind, str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)

    def ask(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.label}: worker exited (code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.label}: {answer['error']}")
        return answer

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


@dataclass
class PeerResult:
    key: str
    label: str
    info: str = ""
    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None
    boxes: list[list[float]] | None = None    # end to end: the boxes it found on the photo
    matched: int | None = None                # end to end: Detector's boxes it found too

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None


def export_for_peers(cfg: str, weights: str | None, size: tuple[int, int], path: Path) -> None:
    """detkit's ONNX export of the network, the file the OpenVINO peers compile. Unchecked, as
    the onnxruntime peer's: the random timing weights of the big nets blow the box decode up to
    values where runtimes' rounding differs beyond the export check's 1e-4 (the official
    yolov3-tiny weights pass it, tests/test_export.py)."""
    import detkit
    from detkit.export import export_onnx

    export_onnx(detkit.load_model(str(REPO / cfg), str(REPO / weights) if weights else None),
                path, size=size, check=False)


def make_input(size: tuple[int, int], path: Path, batch: int = 1) -> None:
    """darknet's sample photo letterboxed by detkit (synthetic if darknet is not installed),
    `batch` copies."""
    import cv2
    import torch

    from detkit.bench import synthetic_images
    from detkit.engine.letterbox import letterbox_batch

    image = cv2.imread(str(PHOTO)) if PHOTO.is_file() else None
    image = image if image is not None else synthetic_images(1)[0]
    x, _ = letterbox_batch([image] * batch, size, torch.device("cpu"))
    np.save(path, x.numpy().astype(np.float32))


def ensure_weights() -> None:
    """Random sane weights for the nets without official ones (written once, ~450 MB)."""
    sys.path.insert(0, str(BENCH))
    from random_weights import write_random_weights

    for weights, cfg in RANDOM_WEIGHTS.items():
        if not (REPO / weights).is_file():
            write_random_weights(REPO / cfg, REPO / weights)


def iterations_per_round(ms: float, round_ms: float) -> int:
    return max(1, min(5, round(round_ms / max(ms, 1e-3))))


def runs_in_mode(key: str, end_to_end: bool) -> bool:
    """detkit-detector only runs end to end; end to end, only detkit's and the ONNX peers run."""
    return key in END_TO_END_PEERS if end_to_end else key != "detkit-detector"


def save_photo(path: Path) -> None:
    """darknet's sample photo (synthetic if darknet is not installed), BGR uint8, for the
    end-to-end peers."""
    import cv2

    from detkit.bench import synthetic_images

    image = cv2.imread(str(PHOTO)) if PHOTO.is_file() else None
    np.save(path, image if image is not None else synthetic_images(1)[0])


def letterboxes(cfg: str) -> bool:
    """Whether detect letterboxes this network's input (darknet) or stretches it (SSD)."""
    import detkit
    from detkit.engine.letterbox import default_letterbox

    return default_letterbox(detkit.load_model(str(REPO / cfg)))


def bench_model(name: str, threads: int, rounds: int, round_ms: float, slow_samples: int,
                peers: list[str], batch: int = 1, end_to_end: bool = False
                ) -> dict[str, PeerResult]:
    """Load every peer on one network, warm up, then time in interleaved rounds."""
    cfg, weights, allowed = MODELS[name]
    results: dict[str, PeerResult] = {}
    workers: dict[str, Worker] = {}
    with tempfile.TemporaryDirectory() as tmp:
        x_path, onnx_path = Path(tmp) / "x.npy", Path(tmp) / "model.onnx"
        photo_path = Path(tmp) / "photo.npy"
        size = (416, 416) if "ssd" not in name else (300, 300)
        make_input(size, x_path, batch)
        chosen = [p for p in peers if p in allowed and (batch == 1 or p != "darknet")
                  and runs_in_mode(p, end_to_end)]
        if any(p in ONNX_PEERS for p in chosen):
            export_for_peers(cfg, weights, size, onnx_path)
        load = {"op": "load", "cfg": str(REPO / cfg), "input": str(x_path),
                "weights": str(REPO / weights) if weights else None, "onnx": str(onnx_path)}
        if end_to_end:
            save_photo(photo_path)
            load.update(mode="end-to-end", image=str(photo_path), size=list(size),
                        letterbox=letterboxes(cfg))
        for key in chosen:
            results[key] = PeerResult(key, PEERS[key][0])
            try:
                worker = Worker(key, threads)
                results[key].info = worker.ask(**load)["info"]
                workers[key] = worker
                if end_to_end:
                    results[key].boxes = worker.ask(op="detect")["boxes"]
            except (RuntimeError, OSError) as exc:
                results[key].error = str(exc)
        try:
            _timed_rounds(workers, results, rounds, round_ms, slow_samples)
        finally:
            for worker in workers.values():
                worker.close()
    if end_to_end and "detkit-detector" in results:
        reference = results["detkit-detector"].boxes or []
        for result in results.values():
            if result.boxes is not None:
                result.matched = count_matched(reference, result.boxes)
    return results


def count_matched(reference: list[list[float]], boxes: list[list[float]], min_iou: float = 0.9,
                  max_score_diff: float = 0.05) -> int:
    """How many reference boxes have a box of the same class with IoU >= min_iou and a score
    within max_score_diff, each box matched once (best IoU first): the accuracy guard's rule."""
    from detkit.engine.train import match_one_to_one, pairwise_iou

    ref, got = (np.asarray(rows, np.float64).reshape(-1, 6) for rows in (reference, boxes))
    iou = pairwise_iou(ref[:, :4], got[:, :4])
    comparable = ((ref[:, None, 5] == got[None, :, 5])
                  & (np.abs(ref[:, None, 4] - got[None, :, 4]) <= max_score_diff))
    # match_one_to_one keeps IoU > its threshold; the rule is IoU >= min_iou
    return len(match_one_to_one(np.where(comparable, iou, 0.0), np.nextafter(min_iou, 0.0)))


def _timed_rounds(workers: dict[str, Worker], results: dict[str, PeerResult], rounds: int,
                  round_ms: float, slow_samples: int) -> None:
    estimate = {}
    for key, worker in workers.items():      # warm-up: 2 calls, the second one estimates
        estimate[key] = worker.ask(op="time", n=2)["ms"][-1]
    order = list(workers)
    for r in range(rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            slow = estimate[key] > 2000        # darknet on the big nets: a few samples only
            if slow and len(results[key].samples_ms) >= slow_samples:
                continue
            n = 1 if slow else iterations_per_round(estimate[key], round_ms)
            results[key].samples_ms += workers[key].ask(op="time", n=n)["ms"]
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for key, code in (("torch", "import torch; print(torch.__version__)"),
                      ("onnxruntime", "import onnxruntime; print(onnxruntime.__version__)")):
        versions[key] = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True).stdout.strip()
    if OPENVINO_PY.exists():
        versions["openvino"] = subprocess.run(
            [str(OPENVINO_PY), "-c", "import openvino; print(openvino.__version__)"],
            capture_output=True, text=True).stdout.strip()
    if OPENCV_PY.exists():
        versions["opencv"] = subprocess.run([str(OPENCV_PY), "-c", "import cv2; print(cv2.__version__)"],
                                            capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), **versions}


def latest_stem(run: dict) -> str:
    """peers-latest, peers-latest-batchN for --batch N, peers-latest-e2e end to end."""
    if run.get("end_to_end"):
        return "peers-latest-e2e"
    return "peers-latest" if run.get("batch", 1) == 1 else f"peers-latest-batch{run['batch']}"


def write_results(data: dict, results: Path = RESULTS) -> Path:
    """The run as <latest_stem>.md/.json, and one more line of peers-history.jsonl."""
    results.mkdir(parents=True, exist_ok=True)
    stem = latest_stem(data)
    (results / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (results / f"{stem}.md").write_text(to_markdown(data))
    with open(results / "peers-history.jsonl", "a", encoding="utf-8") as history:
        history.write(json.dumps(data, separators=(",", ":")) + "\n")
    return results / f"{stem}.md"


def to_markdown(data: dict) -> str:
    m = data["machine"]
    e2e = bool(data.get("end_to_end"))
    mode = ", end to end" if e2e else ""
    lines = [f"# detkit vs peers, CPU, batch {data.get('batch', 1)}{mode} ({data['date']})", "",
             f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; {m['platform']}",
             f"- threads: {data['threads']} for every peer (torch, OpenCV, onnxruntime, OMP/MKL); "
             "reference darknet is single-threaded",
             f"- versions: torch {m.get('torch')}, onnxruntime {m.get('onnxruntime')}, "
             f"OpenVINO {m.get('openvino')}, OpenCV {m.get('opencv')}, Python {m['python']}",
             f"- load average (1 min) before/after: {data['load_before']:.2f} / "
             f"{data['load_after']:.2f}{' (shared machine: other processes were running)' if max(data['load_before'], data['load_after']) > 0.5 else ''}",
             f"- input: {INPUT_LINE[e2e]}, "
             f"{data['rounds']} interleaved rounds",
             f"- command: `{data['command']}`", ""]
    for name, peers in data["models"].items():
        ref_key = next((k for k in ("detkit-detector", "detkit-auto", "detkit-fast")
                        if peers.get(k, {}).get("median_ms")), "detkit-fast")
        ref = peers.get(ref_key, {}).get("median_ms")
        extra = " boxes | Detector's boxes found |" if e2e else ""
        lines += [f"## {name} ({MODELS[name][0]}, weights: {MODELS[name][1] or 'detkit init'})", "",
                  f"| peer | median ms | min ms | samples | x {PEERS[ref_key][0]} | precision |{extra}",
                  "|---|---:|---:|---:|---:|---|" + ("---:|---:|" if e2e else "")]
        for key, p in peers.items():
            label = p["label"] + (" + NumPy pipeline" if e2e and key != "detkit-detector" else "")
            if p["median_ms"] is None:
                lines.append(f"| {label} | failed: {p['error']} | | | |")
                continue
            ratio = f"{p['median_ms'] / ref:.2f}" if ref else "-"
            found = (f" {p['detections']} | {p['matched']} of {peers[ref_key]['detections']} |"
                     if e2e and p.get("matched") is not None else "")
            lines.append(f"| {label} | {p['median_ms']:.1f} | {min(p['samples_ms']):.1f} | "
                         f"{len(p['samples_ms'])} | {ratio} | {p['info'].rsplit(', ', 1)[-1]} |{found}")
        lines.append("")
    lines.append("`x detkit ...` = peer median / the detkit reference's median (> 1: detkit is "
                 "faster); the reference is detkit's Detector end to end, else detkit's default "
                 "(precision auto) when it ran.")
    return "\n".join(lines) + "\n"


INPUT_LINE = {
    False: "darknet's dog.jpg letterboxed to the network size; forward pass only (head "
           "activations; detkit also decodes boxes)",
    True: "darknet's dog.jpg (768x576 BGR uint8); end to end: letterbox, forward, candidates, "
          "per-class NMS (conf 0.25, NMS 0.45), boxes in the photo's pixels"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-ms", type=float, default=600.0,
                        help="target time of one peer's turn in a round")
    parser.add_argument("--slow-samples", type=int, default=3,
                        help="samples of peers slower than 2 s per forward (darknet)")
    parser.add_argument("--models", default=None,
                        help="default: yolov3-tiny,yolov2-voc,yolov3,ssd300; end to end only "
                             "yolov3-tiny, the one with trained weights (random weights find "
                             "thousands of boxes, and NMS would time noise)")
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--peers", default=None,
                        help="comma-separated peer keys (default: all that run in the mode)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time photo -> boxes (decode and NMS included) instead of the forward")
    args = parser.parse_args()
    models = [m for m in (args.models or (E2E_MODELS if args.end_to_end else ALL_MODELS)).split(",")
              if m]
    if args.end_to_end and args.batch != 1:
        raise SystemExit("--end-to-end times one photo at a time: leave --batch out")
    default_peers = END_TO_END_PEERS if args.end_to_end else tuple(PEERS)
    peers = [p for p in (args.peers or ",".join(default_peers)).split(",") if p]
    if "opencv" in peers and not OPENCV_PY.exists():
        raise SystemExit(f"{OPENCV_PY} missing: run `make bench-peers` (creates the venv)")
    ensure_weights()
    if any(p in ONNX_PEERS for p in peers) and not OPENVINO_PY.exists():
        raise SystemExit(f"{OPENVINO_PY} missing: run `make bench-peers` (creates the venv)")
    data = {"date": dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
            "batch": args.batch,
            "rounds": args.rounds, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine(), "load_before": os.getloadavg()[0], "models": {}}
    if args.end_to_end:
        data["end_to_end"] = True
    for name in models:
        if not (REPO / MODELS[name][0]).is_file():
            print(f"{name}: {MODELS[name][0]} not found, skipped", file=sys.stderr)
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        start = time.time()
        results = bench_model(name, args.threads, args.rounds, args.round_ms, args.slow_samples,
                              peers, args.batch, args.end_to_end)
        data["models"][name] = {k: {"label": r.label, "info": r.info, "error": r.error,
                                    "median_ms": r.median, "samples_ms": r.samples_ms,
                                    **({"detections": None if r.boxes is None else len(r.boxes),
                                         "matched": r.matched} if args.end_to_end else {})}
                                for k, r in results.items()}
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    data["load_after"] = os.getloadavg()[0]
    path = write_results(data)
    print(to_markdown(data))
    print(f"written {path} (and .json); appended to peers-history.jsonl", file=sys.stderr)


if __name__ == "__main__":
    main()
