"""Training images/s of a cfg on the tree tiles: the trainer's own iterations, no evaluation.

    .venv/bin/python bench/train_speed.py [--cfg cfg/yolov3-tiny-trees.cfg] [--size 416]
        [--freeze N] [--iterations 14] [--skip 4] [--device cpu]

Needs `make trees` and the COCO yolov3-tiny weights (loaded with --cutoff 15, as the recipe).
The first `--skip` iterations (worker start-up, allocator warm-up) are left out of the rate.
`--freeze` defaults to the cfg's stopbackward; `--size` rewrites the cfg's width and height.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sized_cfg(cfg: Path, size: int | None) -> Path:
    """The cfg with width/height set to `size` (a temporary copy), or the cfg itself."""
    if size is None:
        return cfg
    text = re.sub(r"(?m)^width=\d+", f"width={size}", cfg.read_text())
    text = re.sub(r"(?m)^height=\d+", f"height={size}", text)
    path = Path(tempfile.mkdtemp(prefix="detkit-speed-")) / cfg.name
    path.write_text(text)
    return path


def training_rate(options, skip: int):
    """Images/s of the trainer's own iterations after the first `skip` (worker start-up,
    allocator warm-up, cudnn's autotuning); (rate, trainer, iterations timed)."""
    from detkit.engine.train import Trainer

    trainer = Trainer(options)
    finished: list[float] = []
    log_iteration = trainer._log

    def timed_log(bar, loss, parts, rate) -> None:
        finished.append(time.perf_counter())
        log_iteration(bar, loss, parts, rate)

    trainer._log = timed_log
    trainer.train()
    counted = len(finished) - skip
    if skip < 1 or counted < 1:
        raise SystemExit("--skip must be at least 1 and below --iterations")
    rate = trainer.hyper["batch"] * counted / (finished[-1] - finished[skip - 1])
    return rate, trainer, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", type=Path, default=REPO / "cfg" / "yolov3-tiny-trees.cfg")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--freeze", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=14)
    parser.add_argument("--skip", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from detkit.cli_train import load_split
    from detkit.engine.train import TrainOptions

    train, _ = load_split(REPO / "data" / "trees" / "trees.data", "train")
    options = TrainOptions(cfg=sized_cfg(args.cfg, args.size), train=train, val=[],
                           out=Path(tempfile.mkdtemp(prefix="detkit-speed-run-")),
                           weights=REPO / "weights" / "yolov3-tiny.weights", cutoff=15, freeze=args.freeze,
                           device=args.device, max_batches=args.iterations, eval_interval=10**9,
                           checkpoint_interval=10**9, quiet=True)
    rate, trainer, timed = training_rate(options, args.skip)
    frozen = f"layers 0..{trainer.frozen - 1} frozen" if trainer.frozen else "all layers trained"
    print(f"{args.cfg.name} at {trainer.model.input_size[0]}x{trainer.model.input_size[1]}, "
          f"{frozen}, batch {trainer.hyper['batch']}: "
          f"{rate:.2f} images/s over iterations {args.skip + 1}-{args.skip + timed} ({args.device})")


if __name__ == "__main__":
    main()
