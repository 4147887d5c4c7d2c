"""The `detkit` command line: argument parsing only; the work happens in the library."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .errors import DetkitError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Darknet-style object detection on PyTorch: detect, train, eval, benchmark.")


@app.callback()
def root() -> None:
    """detkit: darknet cfgs and weights on PyTorch."""


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


@app.command()
def benchmark(
    cfg: Path = typer.Argument(..., help="darknet .cfg file"),
    weights: Optional[Path] = typer.Option(None, help="weights to load (not needed for timing)"),
    img_size: Optional[str] = typer.Option(None, "--img-size", help="input size W or WxH"),
    fps: bool = typer.Option(True, "--fps/--no-fps", help="time the forward pass"),
    batch: str = typer.Option("1", help="batch sizes to time, comma separated"),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1"),
    warmup: int = typer.Option(3, help="untimed warm-up iterations"),
    iters: int = typer.Option(20, help="timed iterations per batch size"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Print darknet's layer table with BFLOPs and parameters, then latency and FPS."""
    from . import load_model
    from .bench import layer_table, time_forward

    model = load_model(cfg, weights)
    size = parse_size(img_size) or model.input_size
    table = layer_table(model, size)
    typer.echo(table.format())
    result = table.to_dict()
    if fps:
        result["timings"] = []
        for b in [int(v) for v in batch.split(",") if v]:
            timing = time_forward(model, size, batch=b, warmup=warmup, iters=iters, device=device)
            typer.echo(f"batch {b:3d}: latency p50 {timing.latency_ms_p50:8.2f} ms  "
                       f"p90 {timing.latency_ms_p90:8.2f} ms  {timing.images_per_s:9.1f} images/s "
                       f"({device}, forward only)")
            result["timings"].append(timing.__dict__)
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
                                         "coco.names for 80 classes, voc.names for 20)"),
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
    batch: int = typer.Option(1, "--batch", help="images or video frames per forward pass"),
    show: bool = typer.Option(False, "--show", help="show results in a window (q quits)"),
    out: Path | None = typer.Option(None, "--out", help="output folder (default: a new "
                                       "runs/detect/expN)"),
    save_json: Path | None = typer.Option(None, "--save-json", help="also write COCO results "
                                             "JSON to this file"),
    save_txt: bool = typer.Option(False, "--save-txt", help="also write YOLO label files "
                                  "(cls cx cy w h score) to OUT/labels"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-image lines (nor progress "
                               "bar)"),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="include images in "
                                   "subfolders of folder sources"),
    letterbox: bool = typer.Option(True, "--letterbox/--no-letterbox", help="darknet letterbox "
                                   "(aspect kept, gray bars) or stretch to the input size"),
) -> None:
    """Detect objects in images, videos, cameras and streams; save annotated copies."""
    import os

    from .engine.outputs import check_writable_dir, check_writable_file, next_run_dir
    from .engine.predict import Detector, default_model_files
    from .engine.run import DetectSettings, format_result_line, format_summary, run_detect
    from .engine.sources import release_sources, resolve_sources

    size = parse_size(img_size)
    if batch < 1:
        raise DetkitError("--batch must be at least 1")
    if show and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise DetkitError("--show needs a display (DISPLAY is not set)")
    # Everything that can be checked is checked before any work, cheapest first.
    found = resolve_sources(sources, recursive)
    try:
        if cfg is None:
            cfg, default_weights = default_model_files()
            weights = weights or default_weights
        elif weights is None:
            raise DetkitError(f"--weights is needed with --cfg {cfg}")
        for label, path in (("cfg", cfg), ("weights", weights), ("names", names)):
            if path is not None and not Path(path).is_file():
                raise DetkitError(f"{label} file {path} not found")
        if save_json is not None:
            check_writable_file(save_json)
        created = out is None or not out.exists()
        out_dir = next_run_dir() if out is None else out
        check_writable_dir(out_dir)
        try:
            detector = Detector(cfg, weights, device=device, conf_thresh=conf, nms_thresh=nms,
                                half=half, img_size=size, letterbox=letterbox, names=names,
                                max_det=max_det, classes=classes)
        except BaseException:
            if created and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            raise
        settings = DetectSettings(out_dir=out_dir, save_json=save_json, save_txt=save_txt,
                                  batch=batch, show=show, progress=not quiet)

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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main() -> None:
    """Entry point: typed detkit errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.showwarning = _one_line_warning
    try:
        app()
    except DetkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
