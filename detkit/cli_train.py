"""`detkit train` and `detkit eval`: argument parsing around detkit.engine.train/evaluate."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import DataError, DetkitError

log = logging.getLogger("detkit")

STRICT_HELP = ("any label problem (bad box, unknown class, malformed line, missing label file, "
               "missing or unreadable image) is an error; default: one warning, bad parts left out")
PRECISION_HELP = ("fp32, bf16 or auto: bf16 on a CPU with bf16 instructions (avx512_bf16, AMX) "
                  "where the network passes the bf16 guard, else fp32 (CUDA: fp32); fp32 gives "
                  "darknet's exact scores")
TILE_HELP = ("detect in overlapping windows of this many pixels of each image, merged (for aerial "
             "photos far larger than the network input, with a model trained on such tiles); "
             "--max-det then counts per window")
TILE_OVERLAP_HELP = "share of a --tile window overlapped by the next one"


def pick_device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_split(data: Path, split: str, names=None, strict: bool = False):
    """Items of one split that have an image (others are reported once, then left out).

    strict: any label problem (see detkit.data.read_dataset) is a DataError instead of one
    warning with the bad parts left out.
    """
    from .data import read_dataset

    dataset = read_dataset(data, split=split, names=names, missing_labels="error", progress=False,
                           strict=strict)
    usable = [item for item in dataset.items if item.image is not None]
    if len(usable) < len(dataset.items):
        log.warning("%s: %d of %d %s images not found or unreadable; left out", data,
                    len(dataset.items) - len(usable), len(dataset.items), split)
    if not usable:
        raise DataError(f"{data}: no {split} images found")
    return usable, dataset.names


def run_inputs(data: Optional[Path], cfg: Optional[Path], val: Optional[Path],
               resume: Optional[Path]) -> tuple[Path, Path, Optional[Path]]:
    """--data, --cfg and --val, taken from the resumed run's last.pt where not given."""
    if resume is not None and (data is None or cfg is None):
        from .engine.checkpoint import load_checkpoint

        saved = load_checkpoint(resume / "last.pt")
        recorded_data = saved.get("data")
        if data is None and recorded_data is None:
            raise DetkitError(f"{resume / 'last.pt'} does not record its data set (written by an "
                              "older detkit): pass --data")
        data = data or Path(recorded_data)
        cfg = cfg or Path(saved["cfg"])
        if val is None and saved.get("val_data"):
            val = Path(saved["val_data"])
    if data is None or cfg is None:
        missing = " and ".join(f"--{name}" for name, value in (("data", data), ("cfg", cfg))
                               if value is None)
        raise DetkitError(f"{missing} needed (or --resume RUN_DIR to continue a run)")
    return data, cfg, val


def check_gpu_count(gpus: int, device: Optional[str]) -> None:
    """--gpus N on CUDA needs N visible GPUs (on the CPU, N gloo processes are fine)."""
    if pick_device(device).startswith("cuda"):
        import torch

        if torch.cuda.device_count() < gpus:
            raise DetkitError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")


def launch_processes(count: int, args: list[str]) -> int:
    """`detkit train --gpus N ...` = `torchrun --standalone --nproc_per_node N -m detkit train ...`:
    the same command in N processes (this one waits); each takes GPU LOCAL_RANK."""
    args = list(args)
    if not any(arg in ("--out", "--resume") for arg in args):
        args += ["--out", str(next_run_dir(Path("runs/train")))]  # one folder, not one per process
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={count}", "-m", "detkit", *args]
    log.info("launching %d processes: %s", count, " ".join(command))
    return subprocess.call(command)


def command_arguments(ctx: typer.Context, leave_out: tuple[str, ...] = ("gpus",)) -> list[str]:
    """The sub-command and its parsed options as arguments again (without `leave_out`), for the
    per-process children: rebuilt from what click parsed, so it does not matter whether this
    command came from a shell (sys.argv) or from Python (app([...]))."""
    args = [ctx.info_name or "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in leave_out or value is None or not param.opts:
            continue
        option = max(param.opts, key=len)
        if getattr(param, "is_flag", False):
            if value:
                args.append(option)
            elif getattr(param, "secondary_opts", None):
                args.append(max(param.secondary_opts, key=len))
            continue
        args += [option, str(value)]
    return args


def next_run_dir(root: Path) -> Path:
    from .engine.outputs import next_run_dir as numbered

    return numbered(root, "exp")


def train(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", help="darknet .data, image list, VOC folder or "
                                        "COCO json (with --resume: the run's by default)"),
    cfg: Optional[Path] = typer.Option(None, "--cfg", help="network .cfg (its [net] gives the schedule; "
                                       "with --resume: the run's by default)"),
    weights: Optional[Path] = typer.Option(None, help="pretrained darknet .weights or detkit .pt"),
    cutoff: Optional[int] = typer.Option(None, help="load only layers 0..N-1 of --weights"),
    freeze: Optional[int] = typer.Option(None, help="do not train layers 0..N-1 (default: up to the cfg's "
                                         "stopbackward=1 layer)"),
    val: Optional[Path] = typer.Option(None, help="validation data (default: the .data valid= list)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default: runs/train/expN)"),
    resume: Optional[Path] = typer.Option(None, help="continue the run in this folder from last.pt"),
    exist_ok: bool = typer.Option(False, "--exist-ok", help="a fresh run may replace the run already "
                                  "in --out (default: refused)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    max_batches: Optional[int] = typer.Option(None, help="iterations (overrides [net])"),
    batch: Optional[int] = typer.Option(None, help="images per iteration (overrides [net])"),
    subdivisions: Optional[int] = typer.Option(None, help="gradient accumulation steps"),
    lr: Optional[float] = typer.Option(None, help="learning rate (overrides [net])"),
    optimizer: Optional[str] = typer.Option(None, help="sgd, adam or adamw (default: adam when [net] "
                                            "adam=1, else sgd with [net] momentum; --resume keeps the run's)"),
    burn_in: Optional[int] = typer.Option(None, help="warm-up iterations (overrides [net])"),
    eval_interval: int = typer.Option(100, help="iterations between evaluations (0: at the end)"),
    eval_tile: Optional[int] = typer.Option(None, "--eval-tile", help="evaluate in overlapping windows "
                                            "of this many pixels (as eval --tile): validation photos far "
                                            "larger than the training tiles"),
    checkpoint_interval: int = typer.Option(50, help="iterations between last.pt checkpoints"),
    workers: int = typer.Option(2, help="DataLoader worker processes"),
    amp: str = typer.Option("none", help="none, fp16 or bf16 (CUDA only)"),
    ema: float = typer.Option(0.0, help="EMA decay of the weights (0: off; 0.9999 typical)"),
    ema_warmup: float = typer.Option(2000.0, help="EMA warm-up: the decay ramps as 1 - exp(-iteration / "
                                     "this), ultralytics' 2000; shorter for short runs"),
    seed: int = typer.Option(0, help="random seed (data order and augmentation)"),
    no_augment: bool = typer.Option(False, "--no-augment", help="no jitter/HSV/flip"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
    gpus: int = typer.Option(1, "--gpus", help="processes, one per GPU (runs torchrun for you)"),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="SyncBatchNorm across processes (CUDA)"),
) -> None:
    """Train a detector; writes last.pt, best.pt (by mAP@0.5), last.weights, best.weights,
    metrics.csv, iterations.csv and charts (results.png, confusion_matrix.png, labels.jpg ...)."""
    from .engine.slicing import check_tiling
    from .engine.train import Trainer, TrainOptions

    check_tiling(eval_tile, 0.25, "--eval-tile")
    if gpus > 1 and "WORLD_SIZE" not in os.environ:
        check_gpu_count(gpus, device)
        raise typer.Exit(launch_processes(gpus, command_arguments(ctx)))

    data, cfg, val = run_inputs(data, cfg, val, resume)
    train_items, names = load_split(data, "train", strict=strict)
    if val is not None:
        val_items, _ = load_split(val, "valid", names=names or None, strict=strict)
    elif data.suffix == ".data":
        val_items, _ = load_split(data, "valid", strict=strict)
    else:
        val_items = []
    run_dir = resume or out or next_run_dir(Path("runs/train"))
    options = TrainOptions(
        cfg=cfg, train=train_items, val=val_items, out=run_dir, weights=weights, cutoff=cutoff, freeze=freeze,
        resume=resume is not None, device=pick_device(device), max_batches=max_batches, batch=batch,
        subdivisions=subdivisions, learning_rate=lr, optimizer=optimizer, burn_in=burn_in, eval_interval=eval_interval,
        eval_tile=eval_tile,
        checkpoint_interval=checkpoint_interval, workers=workers, amp=amp, ema=ema, ema_warmup=ema_warmup,
        augment=not no_augment, seed=seed, quiet=quiet, names=list(names or []), sync_bn=sync_bn,
        exist_ok=exist_ok, data=str(data.resolve()), val_data=None if val is None else str(val.resolve()),
        on_evaluate=print_evaluation)
    result = Trainer(options).train()
    typer.echo(f"done: {result.iterations} iterations; mAP@0.5 last {result.last_map:.4f}, "
               f"best {result.best_map:.4f}; run folder {run_dir}")


def print_evaluation(report) -> None:
    """One line per evaluation on stdout, --quiet or not (--quiet only hides the progress bar):
    through tqdm.write, so a progress bar on stderr is redrawn below the line, not torn."""
    from tqdm import tqdm

    tqdm.write(report.line())


def evaluate(
    cfg: Path = typer.Option(..., "--cfg", help="network .cfg"),
    weights: Path = typer.Option(..., "--weights", help="darknet .weights or detkit .pt"),
    data: Path = typer.Option(..., "--data", help="darknet .data (valid=), image list, VOC folder, COCO json"),
    split: str = typer.Option("valid", help="which list of a .data file"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    conf: float = typer.Option(0.005, help="candidate threshold (darknet's valid: 0.005)"),
    nms: float = typer.Option(0.45, help="NMS IoU threshold"),
    iou: float = typer.Option(0.5, help="IoU a detection needs with a truth to count for the VOC mAP "
                                         "(the NEON tree-crown benchmark uses 0.4); COCO keeps its own"),
    batch: int = typer.Option(8, help="images per forward pass"),
    max_det: int = typer.Option(300, "--max-det", help="at most this many detections per image (as "
                                                       "ultralytics' val; darknet's has no cap)"),
    tta: bool = typer.Option(False, "--tta", help="test-time augmentation: every flip and quarter turn "
                                                  "of a square input (flips only otherwise), boxes "
                                                  "merged by weighted NMS"),
    tile: Optional[int] = typer.Option(None, "--tile", help=TILE_HELP),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", help=TILE_OVERLAP_HELP),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="the fast inference path (as detect)"),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write COCO-format detections"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the precision-recall curves (PNG)"),
    strict: bool = typer.Option(False, "--strict", help=STRICT_HELP),
) -> None:
    """Per class and for all: images, instances, precision and recall at the best F1, AP at --iou
    (area under the curve, and VOC2007 11-point), AP50-95; then COCO's 12 figures (pycocotools)."""
    from .engine.checkpoint import load_model
    from .engine.evaluate import coco_json, evaluate_coco, evaluate_detections, format_report
    from .engine.train import predict_samples

    if not 0.0 < iou < 1.0:
        raise DetkitError(f"--iou {iou} must be between 0 and 1")
    if max_det < 1:
        raise DetkitError(f"--max-det {max_det} must be at least 1")
    from .engine.slicing import check_tiling

    check_tiling(tile, tile_overlap)
    items, names = load_split(data, split, strict=strict)
    device = pick_device(device)
    model = load_model(cfg, weights, device=device)
    if fast:
        from .fast import optimize_for_inference

        model = optimize_for_inference(model, device, precision=precision)
    elif precision == "bf16":
        raise DetkitError("--precision bf16 runs on the fast path: drop --no-fast")
    detections, truths = predict_samples(model, items, device, batch=batch, conf_thresh=conf, nms_thresh=nms,
                                         max_det=max_det, tta=tta, tile=tile,
                                         tile_overlap=tile_overlap)
    report = evaluate_detections(detections, truths, iou_thresh=iou)
    voc = report.voc
    coco = evaluate_coco(detections, truths, model.num_classes)
    typer.echo(f"{len(items)} images, {sum(len(t.classes) for t in truths)} boxes, "
               f"{sum(len(d.scores) for d in detections)} detections (conf {conf}, nms {nms}"
               f"{', tta' if tta else ''})")
    for line in format_report(report, list(names) if names else None):
        typer.echo(line)
    typer.echo("COCO: " + "  ".join(f"{k} {v:.4f}" for k, v in coco.items()))
    if json_out is not None:
        json_out.write_text(json.dumps(coco_json(detections, list(range(1, len(items) + 1)))))
    if plot is not None:
        from .engine.plots import plot_pr_curves

        labels = list(names) if names else None
        plot_pr_curves(voc.curves(labels), plot, ap=voc.named_ap(labels))
        typer.echo(f"precision-recall curves: {plot}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(evaluate)


__all__ = ["register", "DetkitError"]
