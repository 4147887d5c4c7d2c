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
