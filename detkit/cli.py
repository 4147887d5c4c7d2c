"""The `detkit` command line: argument parsing only; the work happens in the library."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .cli_help import use_plain_help
from .cli_train import PRECISION_HELP, TILE_HELP, TILE_OVERLAP_HELP
from .errors import DetkitError, SourceError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Darknet-style object detection on PyTorch: detect, train, eval, benchmark.")


WORKFLOW_ORDER = ("detect", "train", "eval", "benchmark", "export", "anchors", "convert")


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"detkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print detkit's version and exit")) -> None:
    """detkit: darknet cfgs and weights on PyTorch."""


def _command_name(command) -> str:
    return command.name or command.callback.__name__.replace("_", "-")


def order_commands() -> None:
    """`detkit --help` lists the commands in the order a user needs them, not as defined."""
    rank = {name: i for i, name in enumerate(WORKFLOW_ORDER)}
    app.registered_commands.sort(key=lambda command: rank.get(_command_name(command), len(rank)))


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'416' or '416x320' (w x h) -> (w, h)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise DetkitError(f"--img-size '{text}' is not W or WxH") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise DetkitError(f"--img-size '{text}' is not W or WxH")
    return (values[0], values[-1])


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; every value a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DetkitError(f"--batch '{text}' is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise DetkitError(f"--batch '{text}': batch sizes must be positive")
    return values


@app.command()
def benchmark(
    cfg: Path = typer.Argument(..., help="darknet .cfg file"),
    weights: Path | None = typer.Option(None, help="weights to load (not needed for timing)"),
    img_size: str | None = typer.Option(None, "--img-size", help="input size W or WxH"),
    fps: bool = typer.Option(True, "--fps/--no-fps", help="time the network (--no-fps: only "
                             "the layer table)"),
    batch: str = typer.Option("1", help="batch sizes to time, comma separated: 1,8,32,64"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if "
                                         "available)"),
    half: bool = typer.Option(False, "--half", help="float16 (CUDA)"),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 (CUDA; on the CPU: --precision bf16)"),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="the fast inference path (folded "
                              "BN, channels-last, fused/Winograd conv on CPU, CUDA graphs) or "
                              "the eager model"),
    compile: bool = typer.Option(False, "--compile", help="also torch.compile the network"),
    warmup: int = typer.Option(5, help="untimed warm-up iterations per batch size"),
    iters: int = typer.Option(30, help="timed iterations per batch size"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch "
                                          "(default: torch's choice)"),
    end_to_end: bool = typer.Option(True, "--e2e/--no-e2e", help="also time letterbox + "
                                    "forward + decode + NMS on 640x480 images"),
    json_out: Path | None = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Print darknet's layer table with BFLOPs and parameters, then latency p50/p90/p99,
    images/s, peak memory and the achieved compute rate per batch size (GFLOP/s, or TFLOP/s
    from 1 TFLOP/s up; FLOPs = 2 x MACs) with, on GPUs of known peak, the share of it."""
    from .bench import layer_table, run_benchmark
    from .engine.checkpoint import load_model

    if half and bf16:
        raise DetkitError("--half and --bf16 exclude each other")
    batches = parse_batches(batch)
    if threads is not None:
        if threads < 1:
            raise DetkitError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    model = load_model(cfg, weights)
    size = parse_size(img_size) or model.input_size
    model.shapes(size)  # a size the graph cannot take fails here, with the layer named
    if fps:
        from .engine.predict import pick_device
        from .memory import check_fits

        check_fits(model.activation_bytes(size, batch=max(batches)), pick_device(device),
                   f"{cfg.name} at {size[0]}x{size[1]}, batch {max(batches)}")
    table = layer_table(model, size)
    typer.echo(table.format())
    result = table.to_dict()
    if fps:
        report = run_benchmark(model, str(cfg), size, batches, device=device, fast=fast,
                               half=half, bf16=bf16, compile=compile, warmup=warmup, iters=iters,
                               precision=precision,
                               end_to_end=end_to_end, progress=sys.stderr.isatty())
        typer.echo(report.format())
        result["benchmark"] = report.to_dict()
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))


@app.command()
def detect(
    sources: list[str] = typer.Argument(..., help="images, folders, globs, .txt image lists, "
                                        "videos, a camera index (0) or a stream URL"),
    cfg: Path | None = typer.Option(None, help="darknet .cfg (default: cfg/yolov3-tiny.cfg)"),
    weights: Path | None = typer.Option(None, help="darknet .weights or detkit .pt "
                                           "(default: weights/yolov3-tiny.weights)"),
    names: Path | None = typer.Option(None, help="class names, one a line (default: "
                                         "coco.names for 80 classes, voc.names for 20, "
                                         "coco91.names for 90)"),
    conf: float = typer.Option(0.25, "--conf", help="score threshold (objectness x class prob)"),
    nms: float = typer.Option(0.45, "--nms", help="IoU threshold of the per-class NMS"),
    img_size: str | None = typer.Option(None, "--img-size", help="network input W or WxH, "
                                           "multiples of 32 (default: the cfg's)"),
    classes: str | None = typer.Option(None, "--classes", help="keep only these classes: "
                                          "names or ids, comma separated"),
    max_det: int = typer.Option(300, "--max-det", help="at most this many boxes per image"),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if "
                                         "available)"),
    half: bool = typer.Option(False, "--half", help="float16 inference (CUDA)"),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    batch: int = typer.Option(1, "--batch", help="images or video frames per forward pass"),
    show: bool = typer.Option(False, "--show", help="show results in a window (q quits)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default: a new "
                                       "runs/detect/expN)"),
    save_json: Path | None = typer.Option(None, "--save-json", help="also write COCO results "
                                             "JSON to this file"),
    save_txt: bool = typer.Option(False, "--save-txt", help="also write YOLO label files "
                                  "(cls cx cy w h, normalised) to OUT/labels"),
    save_conf: bool = typer.Option(False, "--save-conf", help="with --save-txt: the score as a "
                                   "sixth column (cls cx cy w h score)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-image lines (nor progress "
                               "bar)"),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="include images in "
                                   "subfolders of folder sources"),
    letterbox: bool | None = typer.Option(None, "--letterbox/--no-letterbox", help="darknet "
                                          "letterbox (aspect kept, gray bars) or stretch to the "
                                          "input size (default: the model's: the cfg's letter_box=, "
                                          "else stretch for SSD, letterbox for YOLO)"),
    fast: bool = typer.Option(True, "--fast/--no-fast", help="the fast inference path (folded "
                              "BN, channels-last, fused/Winograd conv on CPU, CUDA graphs) or "
                              "the eager model"),
    backend: str = typer.Option("torch", "--backend", help="torch, or onnxruntime (CPU: the "
                                "network's checked ONNX export, cached in ~/.cache/detkit)"),
    tta: bool = typer.Option(False, "--tta", help="test-time augmentation: every flip and quarter "
                             "turn of a square input (flips only otherwise), boxes merged by "
                             "weighted NMS; eight forward passes"),
    tile: int | None = typer.Option(None, "--tile", help=TILE_HELP),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", help=TILE_OVERLAP_HELP),
) -> None:
    """Detect objects in images, videos, cameras and streams; save annotated copies."""
    import os

    from .engine.outputs import check_writable_dir, check_writable_file, next_run_dir
    from .engine.predict import Detector, default_model_files
    from .engine.run import DetectSettings, format_result_line, format_summary, run_detect
    from .engine.sources import SourceWarning, release_sources, resolve_sources_skipping

    size = parse_size(img_size)
    if batch < 1:
        raise DetkitError("--batch must be at least 1")
    if save_conf and not save_txt:
        raise DetkitError("--save-conf adds a column to the --save-txt label files: give both")
    if show and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise DetkitError("--show needs a display (DISPLAY is not set)")
    # Everything that can be checked is checked before any work, cheapest first. A source that
    # cannot be read is skipped with a warning and fails the run at the end (exit 2), so one
    # typo neither stops the other sources nor goes unnoticed in a script.
    found, problems = resolve_sources_skipping(sources, recursive)
    if not found and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SourceError(problems[0] + more)
    for problem in problems:
        warnings.warn(f"{problem} (skipped)", SourceWarning, stacklevel=1)
    try:
        if cfg is None:
            cfg, default_weights = default_model_files()
            weights = weights or default_weights
        elif weights is None:
            raise DetkitError(f"--weights is needed with --cfg {cfg}")
        for label, path in (("cfg", cfg), ("weights", weights), ("names", names)):
            if path is not None:
                check_input_file(Path(path), label)
        if save_json is not None:
            check_writable_file(save_json)
        created = out is None or not out.exists()
        out_dir = next_run_dir() if out is None else out
        check_writable_dir(out_dir)
        try:
            detector = Detector(cfg, weights, device=device, conf_thresh=conf, nms_thresh=nms,
                                half=half, img_size=size, letterbox=letterbox, names=names,
                                precision=precision,
                                max_det=max_det, classes=classes, fast=fast,
                                backend=backend, tta=tta, tile=tile,
                                tile_overlap=tile_overlap)
        except BaseException:
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
        settings = DetectSettings(out_dir=out_dir, save_json=save_json, save_txt=save_txt,
                                  save_conf=save_conf, batch=batch, show=show,
                                  progress=not quiet)

        def on_result(result) -> None:
            if not quiet and result.frame.frame_index is None:
                typer.echo(format_result_line(result))

        summary = run_detect(detector, found, settings, on_result)
    finally:
        release_sources(found)
    for line in format_summary(summary, str(detector.device), batch):
        typer.echo(line)
    if summary.interrupted:
        raise typer.Exit(130)
    failed = len(problems) + summary.skipped_images
    if failed:
        raise SourceError(f"{failed} source(s) could not be read and were skipped (warnings "
                          "above); the others' results are saved")


@app.command()
def convert(
    kind: str = typer.Argument(..., help="what to convert: torchvision-ssd (a torchvision "
                               "ssd300_vgg16 state dict)"),
    source: Path = typer.Argument(..., help="the state dict (.pth), or a checkpoint holding one "
                                  "under 'model'"),
    cfg: Path = typer.Option(..., help="detkit cfg describing the same network "
                             "(cfg/ssd300-coco.cfg)"),
    out: Path = typer.Option(..., "--out", help="darknet-style .weights file to write"),
) -> None:
    """Turn another toolkit's weights into darknet-style .weights for a detkit cfg."""
    from .convert import convert_torchvision_ssd

    kinds = ("torchvision-ssd",)
    if kind not in kinds:
        raise DetkitError(f"convert: unknown kind '{kind}' (known: {', '.join(kinds)})")
    for label, path in (("state dict", source), ("cfg", cfg)):
        check_input_file(Path(path), label)
    report = convert_torchvision_ssd(source, cfg, out)
    typer.echo(f"wrote {out}: {report.convolutions} convolutions, {report.l2norms} l2norm, "
               f"{report.head_sources} head sources from {source}")


@app.command()
def anchors(
    data: Path = typer.Option(..., "--data", help="darknet .data, .txt image list, folder of "
                              "YOLO .txt or VOC .xml labels, a VOC .xml or a COCO .json"),
    num: int = typer.Option(9, "--num", help="number of anchors (k-means clusters)"),
    img_size: str = typer.Option("416", "--img-size", help="network input W or WxH"),
    split: str = typer.Option("train", "--split", help="which image list of a .data file"),
    restarts: int = typer.Option(10, "--restarts", help="k-means runs; the best is kept"),
    seed: int = typer.Option(0, "--seed", help="random seed of the k-means++ initialisation"),
    stride: int = typer.Option(1, "--stride", help="print anchors in cells of this stride "
                               "(32 for [region] cfgs, whose anchors are in grid cells)"),
    decimals: int | None = typer.Option(None, "--decimals", help="decimals printed "
                                           "(default: 0 in pixels, 2 in grid cells)"),
    include_difficult: bool = typer.Option(False, "--include-difficult", help="also cluster "
                                           "VOC difficult / COCO crowd boxes"),
) -> None:
    """Anchors for a data set: k-means with distance 1 - IoU on the label shapes at network size
    (AlexeyAB's calc_anchors); prints the cfg line sorted by area and the mean IoU."""
    from .anchors import dataset_anchors, mean_best_iou
    from .data import read_dataset

    size = parse_size(img_size)
    if num < 1 or restarts < 1 or stride < 1:
        raise DetkitError("--num, --restarts and --stride must be at least 1")
    places = decimals if decimals is not None else (0 if stride == 1 else 2)
    dataset = read_dataset(data, split=split, missing_labels="empty",
                           progress=sys.stderr.isatty())  # no bar lines in logs and pipes
    result = dataset_anchors(dataset, num, size, restarts=restarts, seed=seed,
                             include_difficult=include_difficult)
    printed = result.rounded(stride, places) * stride
    typer.echo(f"{len(result.wh)} boxes from {len(dataset)} images at {size[0]}x{size[1]}"
               + (f" ({result.skipped} empty boxes left out)" if result.skipped else ""))
    typer.echo(result.line(stride, places))
    typer.echo(f"mean IoU of the boxes with their best anchor: {mean_best_iou(result.wh, printed):.4f}"
               f" (unrounded anchors: {result.mean_iou:.4f})")


from .cli_train import register as _register_training  # noqa: E402

_register_training(app)


@app.command()
def export(
    cfg: Path = typer.Argument(..., help="darknet .cfg file"),
    weights: Path | None = typer.Option(None, help="darknet .weights or detkit .pt (default: "
                                           "untrained)"),
    format: str = typer.Option("onnx", "--format", help="export format (onnx)"),
    out: Path | None = typer.Option(None, "--out", help="output file (default: the cfg's "
                                       "name with .onnx, in the current folder)"),
    img_size: str | None = typer.Option(None, "--img-size", help="input size W or WxH "
                                           "(fixed in the file; the batch stays dynamic)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    check: bool = typer.Option(True, "--check/--no-check", help="compare onnxruntime with "
                               "PyTorch (to 1e-4) before reporting success"),
) -> None:
    """Export the network, decode included, to ONNX: input `images` (B,3,H,W) RGB in [0,1],
    output `preds` (B,N,5+C) cx,cy,w,h in input pixels, objectness, class probabilities."""
    from .engine.checkpoint import load_model
    from .export import export_onnx

    if format.lower() != "onnx":
        raise DetkitError(f"--format {format}: only onnx is supported")
    if weights is not None and not weights.is_file():
        raise DetkitError(f"weights file {weights} not found")
    model = load_model(cfg, weights)
    report = export_onnx(model, out or Path(Path(cfg).stem + ".onnx"), parse_size(img_size),
                         opset=opset, check=check)
    w, h = report.input_size
    typer.echo(f"exported {report.path} (ONNX opset {report.opset}): images (batch, 3, {h}, {w})"
               f" -> preds (batch, {report.output_shape[1]}, {report.output_shape[2]})")
    if report.max_abs_diff is not None:
        typer.echo(f"onnxruntime vs PyTorch: max abs diff {report.max_abs_diff:.3g}, max rel "
                   f"diff {report.max_rel_diff:.3g} (batch 1 and 2)")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def check_input_file(path: Path, label: str) -> None:
    """An input that is not a readable file, said as what it is (missing, a directory)."""
    if path.is_dir():
        raise DetkitError(f"{label} {path} is a directory, not a file")
    if not path.is_file():
        raise DetkitError(f"{label} file {path} not found")


order_commands()
use_plain_help(app)


def main() -> None:
    """Entry point: typed detkit errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.showwarning = _one_line_warning
    try:
        app(prog_name="detkit")
    except DetkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
