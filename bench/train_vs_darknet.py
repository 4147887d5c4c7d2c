"""detkit train against the reference darknet trainer: same cfg file, data, pretrained
convolutions, input size, batch, schedule and iteration count (issue 20).

    .venv/bin/python bench/train_vs_darknet.py darknet --run 1     # about 1 s per image here
    .venv/bin/python bench/train_vs_darknet.py detkit --seed 0      # and --seed 1, --seed 2
    .venv/bin/python bench/train_vs_darknet.py report               # bench/results/train_vs_darknet.json

Each run trains `cfg/yolov3-tiny-trees416.cfg` (read unmodified by both) from
`weights/yolov3-tiny.conv.15` (`darknet partial ... 15` of the COCO weights, made here when
missing) on the spatial split `data/trees/trees.data`, then scores its final weights twice:
`detkit eval` on the validation tiles (AP50 and COCO AP through pycocotools) and darknet's own
`detector recall`, as a second opinion. Each run leaves a `result.json` in its folder under
`runs/train_vs_darknet/`; `report` gathers them. Time per image is the wall clock of the whole
training command (start-up and detkit's one final evaluation included) over the images it
trained on; darknet's own per-iteration figure (compute only, its loader runs alongside) is
kept too. Needs `make trees darknet assets`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "cfg" / "yolov3-tiny-trees416.cfg"
COCO_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
CONV15 = REPO / "weights" / "yolov3-tiny.conv.15"
TREES = REPO / "data" / "trees" / "trees.data"
WORK = REPO / "runs" / "train_vs_darknet"
RESULT = REPO / "bench" / "results" / "train_vs_darknet.json"
DARKNET_LINE = re.compile(r"^\s*(\d+): ([-0-9.naif]+), ([-0-9.naif]+) avg, ([0-9.e-]+) rate, "
                          r"([0-9.]+) seconds, (\d+) images", re.M)
RECALL_LINE = re.compile(r"RPs/Img: ([0-9.]+)\s+IOU: ([0-9.]+)%\s+Recall:([0-9.]+)%")


def net_options(cfg: Path) -> dict[str, str]:
    """The [net] keys of a cfg (the schedule both trainers follow)."""
    from detkit.cfg import parse_cfg

    return {key: value for key, (value, _line) in parse_cfg(cfg)[0].options.items()}


def ensure_conv15() -> Path:
    if not CONV15.exists():
        run(["darknet", "partial", str(CFG), str(COCO_WEIGHTS), str(CONV15), "15"], REPO,
            CONV15.with_name(CONV15.name + ".log"))
    return CONV15


def run(command: list[str], cwd: Path, log: Path) -> tuple[str, float]:
    """Runs a command to completion, its output going to `log` as it comes (a long training run
    can be watched); (stdout and stderr, wall seconds). Raises on failure. `log` has no default:
    one in `cwd` left a stray command.log in the repository's root."""
    start = time.perf_counter()
    with log.open("w") as sink:
        returncode = subprocess.run(command, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    output = log.read_text()
    if returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({returncode}):\n{output[-3000:]}")
    return output, seconds


def split_images(data: Path, key: str) -> list[Path]:
    """Absolute image paths of a .data file's train= or valid= list, found as detkit finds them."""
    from detkit.data.labels import read_darknet_data

    return [Path(item.image).resolve() for item in read_darknet_data(data, split=key, progress=False).items]


def darknet_data(folder: Path) -> Path:
    """A .data file for darknet with absolute lists: darknet opens paths from its working folder."""
    for key in ("train", "valid"):
        (folder / f"{key}.txt").write_text("".join(f"{p}\n" for p in split_images(TREES, key)))
    (folder / "backup").mkdir(exist_ok=True)
    data = folder / "trees.data"
    data.write_text(f"classes=1\ntrain={folder / 'train.txt'}\nvalid={folder / 'valid.txt'}\n"
                    f"names={TREES.parent / 'trees.names'}\nbackup={folder / 'backup'}\n")
    return data


def darknet_recall(weights: Path, folder: Path, cfg: Path = CFG) -> dict:
    """darknet's `detector recall` on the validation tiles. It reads data/coco_val_5k.list and
    finds labels by replacing .jpg (not .png) with .txt, so it gets .jpg links to the tiles."""
    recall = folder / "recall"
    for sub in ("data", "images", "labels"):
        (recall / sub).mkdir(parents=True, exist_ok=True)
    linked = []
    for image in split_images(TREES, "valid"):
        label = image.parent.parent / "labels" / f"{image.stem}.txt"
        for link, target in ((recall / "images" / f"{image.stem}.jpg", image),
                             (recall / "labels" / f"{image.stem}.txt", label)):
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        linked.append(recall / "images" / f"{image.stem}.jpg")
    (recall / "data" / "coco_val_5k.list").write_text("".join(f"{p}\n" for p in linked))
    output, _ = run(["darknet", "detector", "recall", str(darknet_data(folder)), str(cfg), str(weights)],
                    recall, folder / "recall.log")
    rps, iou, found = (float(v) for v in RECALL_LINE.findall(output)[-1])
    return {"recall": found / 100.0, "mean_iou": iou / 100.0, "proposals_per_image": rps}


def detkit_eval(weights: Path, folder: Path, cfg: Path = CFG) -> dict:
    output, _ = run([sys.executable, "-m", "detkit", "eval", "--cfg", str(cfg), "--weights", str(weights),
                     "--data", str(TREES)], REPO, folder / "eval.log")
    ap50 = float(re.search(r"^mAP@0.5\s+([0-9.]+)", output, re.M).group(1))
    ap = float(re.search(r"COCO: AP ([0-9.]+)", output).group(1))
    return {"ap50": ap50, "ap": ap}


def finished(folder: Path, result: dict) -> dict:
    (folder / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_darknet(number: int, cfg: Path = CFG, work: Path = WORK) -> dict:
    folder = work / f"darknet-{number}"
    folder.mkdir(parents=True, exist_ok=True)
    command = ["darknet", "detector", "train", str(darknet_data(folder)), str(cfg), str(ensure_conv15())]
    output, seconds = run(command, folder, folder / "train.log")
    iterations = [(int(m[0]), float(m[4]), int(m[5])) for m in DARKNET_LINE.findall(output)]
    images = iterations[-1][2]
    weights = folder / "backup" / f"{cfg.stem}_final.weights"
    return finished(folder, {"trainer": "darknet", "run": number, "command": " ".join(command), "iterations": iterations[-1][0],
            "images": images, "seconds": seconds, "seconds_per_image": seconds / images,
            "compute_seconds_per_image": sum(it[1] for it in iterations) / images,
            "weights": str(weights), **detkit_eval(weights, folder, cfg),
            "darknet_recall": darknet_recall(weights, folder, cfg)})


def run_detkit(seed: int, cfg: Path = CFG, work: Path = WORK) -> dict:
    folder = work / f"detkit-{seed}"
    out = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "detkit", "train", "--data", str(TREES), "--cfg", str(cfg),
               "--weights", str(ensure_conv15()), "--cutoff", "15", "--seed", str(seed), "--out", str(out),
               "--exist-ok", "--eval-interval", "0", "--quiet"]
    _, seconds = run(command, REPO, folder / "train.log")
    net = net_options(cfg)
    iterations = int(net["max_batches"])
    images = iterations * int(net["batch"])
    weights = out / "last.weights"
    return finished(folder, {"trainer": "detkit", "seed": seed, "command": " ".join(["detkit", *command[3:]]),
            "iterations": iterations, "images": images, "seconds": seconds, "seconds_per_image": seconds / images,
            "weights": str(weights), **detkit_eval(weights, folder, cfg),
            "darknet_recall": darknet_recall(weights, folder, cfg)})


def summary(runs: list[dict]) -> dict:
    net = net_options(CFG)
    return {"runs": runs, "ap50": [r["ap50"] for r in runs], "ap": [r["ap"] for r in runs],
            "mean_ap50": statistics.mean(r["ap50"] for r in runs), "mean_ap": statistics.mean(r["ap"] for r in runs),
            "darknet_recall": [r["darknet_recall"]["recall"] for r in runs],
            "seconds_per_image": statistics.mean(r["seconds_per_image"] for r in runs),
            "iterations": runs[0]["iterations"], "batch": int(net["batch"]), "width": int(net["width"]),
            "commands": [r["command"] for r in runs]}


def report() -> dict:
    results = {trainer: [json.loads(p.read_text()) for p in sorted(WORK.glob(f"{trainer}-*/result.json"))]
               for trainer in ("darknet", "detkit")}
    missing = [trainer for trainer, runs in results.items() if not runs]
    if missing:
        raise SystemExit(f"no finished {' or '.join(missing)} run under {WORK}")
    data = {trainer: summary(runs) for trainer, runs in results.items()}
    data["cfg"] = str(CFG.relative_to(REPO))
    data["data"] = str(TREES.relative_to(REPO))
    data["ap50_gap"] = data["detkit"]["mean_ap50"] - data["darknet"]["mean_ap50"]
    data["time_ratio"] = data["detkit"]["seconds_per_image"] / data["darknet"]["seconds_per_image"]
    RESULT.write_text(json.dumps(data, indent=1) + "\n")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("darknet", "detkit", "report"))
    parser.add_argument("--run", type=int, default=1, help="darknet run number (its folder)")
    parser.add_argument("--seed", type=int, default=0, help="detkit's --seed")
    args = parser.parse_args()
    if args.what == "report":
        data = report()
        for trainer in ("darknet", "detkit"):
            row = data[trainer]
            print(f"{trainer:8s} AP50 {row['ap50']} AP {row['ap']} recall {row['darknet_recall']} "
                  f"{row['seconds_per_image']:.3f} s/image")
        print(f"AP50 gap {data['ap50_gap']:+.3f}, time ratio {data['time_ratio']:.3f} -> {RESULT}")
        return
    result = run_darknet(args.run) if args.what == "darknet" else run_detkit(args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "command"}))


if __name__ == "__main__":
    main()
