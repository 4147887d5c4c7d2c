"""Training and evaluation charts as PNG files, drawn with OpenCV.

matplotlib is not a dependency, so this module draws the few charts detkit needs itself: line
charts with "nice" ticks (1, 2 or 5 x 10^k), a grid and a legend; the trainer's metrics.csv as
loss / mAP / learning-rate charts; and per-class precision-recall curves. Every function takes
plain numbers, so it works on any run's output and never needs the model.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]

# matplotlib's tab10 (as BGR): ten colours that stay distinct for the usual handful of series.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
    (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23))

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (30, 30, 30)
_AXIS = (60, 60, 60)
_GRID = (228, 228, 228)
_MUTED = (150, 150, 150)
_PAD = 8
_TICK = 5
_SHIFT = 4  # sub-pixel bits for cv2 line drawing: smooth curves instead of 1-pixel stairs
_MARKERS_UP_TO = 50  # sparse series (an evaluation every N iterations) get a dot per point
_MIN_SIZE = (240, 180)

# Loss parts the heads report today (yolo/region: xy wh obj noobj cls; ssd: loc cls), so
# metrics.csv columns named after them are plotted with the loss even without "loss" in the name.
LOSS_PARTS = frozenset({"xy", "wh", "obj", "noobj", "cls", "loc", "conf", "box"})


# -- ticks and ranges ------------------------------------------------------------------------
def _nice_step_parts(raw: float) -> tuple[int, int]:
    """The smallest m x 10^e >= raw with m in (1, 2, 5), as (m, e)."""
    if not (math.isfinite(raw) and raw > 0):
        raise ValueError(f"tick step must be a positive finite number, got {raw!r}")
    exponent = math.floor(math.log10(raw))
    fraction = raw / 10.0 ** exponent
    for mantissa in (1, 2, 5):
        if fraction <= mantissa * (1 + 1e-9):
            return mantissa, exponent
    return 1, exponent + 1


def _scaled(count: int, exponent: int) -> float:
    """count x 10^exponent as the nearest float (3 / 10 is 0.3; 3 * 0.1 is 0.30000000000000004)."""
    return float(count * 10 ** exponent) if exponent >= 0 else count / 10 ** -exponent


def nice_step(raw: float) -> float:
    """Round a tick spacing up to 1, 2 or 5 x 10^k, the spacings people read at a glance."""
    mantissa, exponent = _nice_step_parts(raw)
    return _scaled(mantissa, exponent)


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """As many evenly spaced round values inside [lo, hi] as fit in `max_ticks` (at least 2
    when max_ticks >= 6); empty for an empty or non-finite range, so callers need no special case."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo or max_ticks < 2:
        return []
    span = hi - lo
    if not math.isfinite(span):
        return []
    # Rounding span / (max_ticks - 1) up always fits but can leave as few as 2 ticks; the next
    # smaller nice step often fits too, depending on where lo and hi fall.
    upper = _nice_step_parts(span / (max_ticks - 1))
    best = _ticks_at(lo, hi, *upper)
    for mantissa, exponent in _smaller_steps(*upper, 2):
        ticks = _ticks_at(lo, hi, mantissa, exponent)
        if len(ticks) > max_ticks:
            break
        best = ticks
    return best


def _ticks_at(lo: float, hi: float, mantissa: int, exponent: int) -> list[float]:
    step = _scaled(mantissa, exponent)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [_scaled(i * mantissa, exponent) for i in range(first, last + 1)]


def _smaller_steps(mantissa: int, exponent: int, count: int) -> list[tuple[int, int]]:
    """The next `count` nice steps below m x 10^e: 5 -> 2 -> 1 -> 0.5 ..."""
    steps = []
    for _ in range(count):
        mantissa, exponent = {5: (2, exponent), 2: (1, exponent), 1: (5, exponent - 1)}[mantissa]
        steps.append((mantissa, exponent))
    return steps


def tick_step(ticks: Sequence[float]) -> float:
    """The spacing of evenly spaced ticks (1 for fewer than two, which need no decimals)."""
    return abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0


def format_tick(value: float, step: float) -> str:
    """Just enough decimals to tell neighbouring ticks apart; scientific for extreme scales."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if decimals > 6 or abs(value) >= 1e7:
        return f"{value:.3g}"
    text = f"{value:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def padded_range(values: np.ndarray, margin: float = 0.05) -> tuple[float, float]:
    """The finite values' [min, max] widened by `margin` of the span, so lines don't sit on the
    frame; a constant series gets +-10% (+-1 around 0) and no data gets (0, 1)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi)) or not math.isfinite(hi - lo):
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    span = hi - lo
    return lo - margin * span, hi + margin * span


def series_color(index: int, count: int) -> tuple[int, int, int]:
    """BGR colour of series `index` of `count`: tab10, or beyond ten series hues stepped by the
    golden ratio (so 20 classes on one PR chart don't repeat colours, and neighbours in the
    legend differ clearly instead of shading from red to green)."""
    if count <= len(PALETTE):
        return PALETTE[index % len(PALETTE)]
    hue = int(180 * ((index * 0.6180339887) % 1.0))  # OpenCV hue is 0..179
    hsv = np.array([[[hue, 200, 200 if index % 2 else 160]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


# -- text --------------------------------------------------------------------------------------
def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only; anything else would come out as '?' boxes anyway."""
    return text.encode("ascii", "replace").decode("ascii")


def _text_size(text: str, scale: float, thickness: int = 1) -> tuple[int, int]:
    (width, height), _ = cv2.getTextSize(_ascii(text), _FONT, scale, thickness)
    return width, height


def _put(image: np.ndarray, text: str, x: float, y: float, scale: float,
         align: tuple[float, float] = (0.0, 0.0), color=_TEXT, thickness: int = 1) -> None:
    """Text whose box is placed with (x, y) at `align` (0..1 fractions of its width and height),
    e.g. (0.5, 0) centres it under a tick; cv2.putText alone anchors at the baseline's left."""
    width, height = _text_size(text, scale, thickness)
    left = int(round(x - align[0] * width))
    baseline = int(round(y - align[1] * height + height))
    cv2.putText(image, _ascii(text), (left, baseline), _FONT, scale, color, thickness, cv2.LINE_AA)


def _fit(text: str, max_width: int, scale: float) -> str:
    """Shorten `text` with '..' until it fits, so a long class name can't push a legend off-chart."""
    if _text_size(text, scale)[0] <= max_width:
        return text
    while len(text) > 1 and _text_size(text + "..", scale)[0] > max_width:
        text = text[:-1]
    return text + ".."


def _put_vertical(image: np.ndarray, text: str, x: int, y_center: int, scale: float) -> None:
    """Text rotated 90 degrees (read bottom to top), the usual y-axis label."""
    width, height = _text_size(text, scale)
    tile = np.full((height + 2 * _PAD, width + 2), 255, np.uint8)
    tile = np.dstack([tile] * 3)
    _put(tile, text, 1, _PAD, scale)
    tile = cv2.rotate(tile, cv2.ROTATE_90_COUNTERCLOCKWISE)
    rows = min(tile.shape[0], image.shape[0])
    top = int(np.clip(y_center - rows // 2, 0, image.shape[0] - rows))
    cols = min(tile.shape[1], image.shape[1] - x)
    image[top:top + rows, x:x + cols] = tile[:rows, :cols]


# -- layout ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    """Where the plot area lies in the image and which data range it shows."""

    left: int
    top: int
    width: int
    height: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixels(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """(N, 2) float pixel coordinates relative to the plot area's top-left corner."""
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = (xs - x0) / (x1 - x0) * self.width
        py = self.height - (ys - y0) / (y1 - y0) * self.height
        return np.clip(np.stack([px, py], 1), -1e5, 1e5)  # far-off points still cast to int32


def _x_ticks(lo: float, hi: float, width: int, scale: float) -> list[float]:
    """As many x ticks as fit without their labels touching."""
    target = max(2, width // 90)
    while True:
        ticks = nice_ticks(lo, hi, target)
        step = tick_step(ticks)
        widest = max((_text_size(format_tick(t, step), scale)[0] for t in ticks), default=0)
        if target <= 2 or len(ticks) * (widest + 2 * _PAD) <= width:
            return ticks
        target -= 1


def _draw_frame(image: np.ndarray, title: str, x_label: str, y_label: str,
                x_range: tuple[float, float], y_range: tuple[float, float],
                categories: Sequence[str] | None = None) -> _Frame:
    """Title, axis labels, ticks, tick labels and grid; returns the plot area left inside.
    `categories`: named x positions 0, 1, ... (a bar chart's classes) instead of number ticks."""
    size_h, size_w = image.shape[:2]
    tick_scale, label_scale, title_scale = 0.42, 0.5, 0.62
    tick_h = _text_size("0", tick_scale)[1]
    title_h = _text_size(title, title_scale)[1] if title else 0
    top = 2 * _PAD + title_h + (_PAD if title else 0)
    x_label_h = _text_size(x_label, label_scale)[1] + _PAD if x_label else 0
    bottom = _TICK + _PAD + tick_h + _PAD + x_label_h + _PAD
    height = size_h - top - bottom
    y_ticks = nice_ticks(*y_range, max(2, height // 50))
    y_step = tick_step(y_ticks)
    y_texts = [format_tick(t, y_step) for t in y_ticks]
    label_w = max((_text_size(t, tick_scale)[0] for t in y_texts), default=0)
    y_label_w = _text_size("0", label_scale)[1] + 2 * _PAD if y_label else 0
    left = _PAD + y_label_w + label_w + _PAD + _TICK
    width = size_w - left - 3 * _PAD
    frame = _Frame(left, top, width, height, x_range, y_range)
    x_ticks = _x_ticks(*x_range, width, tick_scale) if categories is None else []
    x_step = tick_step(x_ticks)

    for value, text in zip(y_ticks, y_texts, strict=True):
        y = top + int(round(frame.to_pixels(np.array([x_range[0]]), np.array([value]))[0, 1]))
        cv2.line(image, (left, y), (left + width, y), _GRID, 1)
        cv2.line(image, (left - _TICK, y), (left, y), _AXIS, 1)
        _put(image, text, left - _TICK - _PAD // 2, y, tick_scale, (1.0, 0.5))
    for value in x_ticks:
        x = left + int(round(frame.to_pixels(np.array([value]), np.array([y_range[0]]))[0, 0]))
        cv2.line(image, (x, top), (x, top + height), _GRID, 1)
        cv2.line(image, (x, top + height), (x, top + height + _TICK), _AXIS, 1)
        _put(image, format_tick(value, x_step), x, top + height + _TICK + _PAD // 2, tick_scale,
             (0.5, 0.0))
    if categories is not None:
        _draw_categories(image, frame, categories, tick_scale)
    cv2.rectangle(image, (left, top), (left + width, top + height), _AXIS, 1)
    if title:
        _put(image, title, left + width / 2, _PAD, title_scale, (0.5, 0.0), thickness=1)
    if x_label:
        _put(image, x_label, left + width / 2, size_h - _PAD, label_scale, (0.5, 1.0))
    if y_label:
        _put_vertical(image, y_label, _PAD // 2, top + height // 2, label_scale)
    return frame


def _draw_categories(image: np.ndarray, frame: _Frame, names: Sequence[str], scale: float) -> None:
    """A label under each category (every k-th when they would overlap), cut to its slot."""
    if not names:
        return
    slot = frame.width / max(frame.x_range[1] - frame.x_range[0], 1e-9)
    widest = max(_text_size(name, scale)[0] for name in names)
    every = max(1, math.ceil(min(widest, 60) / max(slot, 1e-9)))
    y = frame.top + frame.height
    for index in range(0, len(names), every):
        x = frame.left + int(round(frame.to_pixels(np.array([float(index)]), np.array([0.0]))[0, 0]))
        cv2.line(image, (x, y), (x, y + _TICK), _AXIS, 1)
        text = _fit(names[index], max(int(slot * every) - 4, 8), scale)
        _put(image, text, x, y + _TICK + _PAD // 2, scale, (0.5, 0.0))


# -- series and legend ---------------------------------------------------------------------------
def _finite_runs(xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
    """Index runs of consecutive finite points: a NaN breaks the line instead of hiding it all."""
    finite = np.isfinite(xs) & np.isfinite(ys)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], finite.astype(np.int8), [0]])))
    return [np.arange(start, stop) for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def _draw_series(area: np.ndarray, ink: np.ndarray, frame: _Frame, xs: np.ndarray,
                 ys: np.ndarray, color: tuple[int, int, int], markers: bool | None = None) -> None:
    """One series as anti-aliased lines (dots as well when sparse, or always with `markers`),
    also marked on `ink`, the mask the legend uses to find a free corner."""
    pixels = np.nan_to_num(frame.to_pixels(xs, ys))  # NaN rows are skipped below; 0 casts quietly
    points = np.round(pixels * (1 << _SHIFT)).astype(np.int32)
    runs = _finite_runs(xs, ys)
    dots = sum(len(run) for run in runs) <= _MARKERS_UP_TO if markers is None else markers
    for run in runs:
        if len(run) > 1:
            curve = points[run].reshape(-1, 1, 2)
            cv2.polylines(area, [curve], False, color, 2, cv2.LINE_AA, _SHIFT)
            cv2.polylines(ink, [curve], False, 255, 3, cv2.LINE_8, _SHIFT)
        if dots or len(run) == 1:
            for x, y in points[run]:
                cv2.circle(area, (int(x), int(y)), 3 << _SHIFT, color, -1, cv2.LINE_AA, _SHIFT)
                cv2.circle(ink, (int(x), int(y)), 4 << _SHIFT, 255, -1, cv2.LINE_8, _SHIFT)


def _legend_rows(entries: list[tuple[str, tuple[int, int, int]]], max_rows: int
                 ) -> list[tuple[str, tuple[int, int, int] | None]]:
    """The entries that fit, the last row saying how many were left out."""
    if len(entries) <= max_rows:
        return list(entries)
    shown = max(max_rows - 1, 0)
    return [*entries[:shown], (f"+{len(entries) - shown} more", None)]


def _draw_legend(area: np.ndarray, ink: np.ndarray,
                 entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    """A boxed legend in whichever corner of the plot area covers the fewest drawn pixels
    (matplotlib's loc='best', roughly): a rising loss line keeps its top-right end visible."""
    scale, swatch = 0.42, 22
    row_h = _text_size("Ag", scale)[1] + _PAD
    height, width = area.shape[:2]
    max_text = max(width // 2 - swatch - 3 * _PAD, 20)
    rows = _legend_rows(entries, max(1, (height - 4 * _PAD) // row_h))
    texts = [_fit(name, max_text, scale) for name, _ in rows]
    box_w = swatch + 3 * _PAD + max(_text_size(t, scale)[0] for t in texts)
    box_h = len(rows) * row_h + _PAD
    corners = [(width - box_w - _PAD, _PAD), (_PAD, _PAD),
               (width - box_w - _PAD, height - box_h - _PAD), (_PAD, height - box_h - _PAD)]
    x0, y0 = min(corners, key=lambda c: int(np.count_nonzero(
        ink[max(c[1], 0):c[1] + box_h, max(c[0], 0):c[0] + box_w])))
    cv2.rectangle(area, (x0, y0), (x0 + box_w, y0 + box_h), (255, 255, 255), -1)
    cv2.rectangle(area, (x0, y0), (x0 + box_w, y0 + box_h), _MUTED, 1)
    for i, (text, (_, color)) in enumerate(zip(texts, rows, strict=True)):
        y = y0 + _PAD // 2 + i * row_h + row_h // 2
        if color is not None:
            cv2.line(area, (x0 + _PAD, y), (x0 + _PAD + swatch, y), color, 3, cv2.LINE_AA)
        _put(area, text, x0 + 2 * _PAD + swatch, y, scale, (0.0, 0.5))


def _as_series(series: Series) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, np.float64).ravel(), np.asarray(ys, np.float64).ravel()
        if xs.shape != ys.shape:
            raise ValueError(f"series {name!r}: {xs.size} x values but {ys.size} y values")
        out.append((str(name), xs, ys))
    return out


def write_png(image: np.ndarray, path: Path) -> Path:
    """Encode as PNG whatever the suffix says (cv2.imwrite picks the codec from it, and fails
    on some non-ASCII paths), creating the folder."""
    return write_image(image, path, ".png")


def write_image(image: np.ndarray, path: Path, codec: str | None = None) -> Path:
    """Encode with `codec` (".png", ".jpg"; default: the suffix's, JPEG for .jpg/.jpeg, else
    PNG) and write, creating the folder: photos (labels.jpg, train_batch0.jpg) go as JPEG as
    ultralytics writes them, charts as PNG."""
    path = Path(path)
    if codec is None:
        codec = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if codec == ".jpg" else []
    ok, data = cv2.imencode(codec, image, params)
    if not ok:
        raise OSError(f"could not encode {codec} for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())
    return path


def _checked_range(limits: tuple[float, float]) -> tuple[float, float]:
    """A caller's axis range, refused when it would divide by zero or map nothing."""
    lo, hi = float(limits[0]), float(limits[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"axis range must be finite with low < high, got {limits}")
    return lo, hi


def render_line_chart(series: Series, title: str = "", x_label: str = "", y_label: str = "",
                      size: tuple[int, int] = (800, 500), *,
                      x_range: tuple[float, float] | None = None,
                      y_range: tuple[float, float] | None = None,
                      markers: bool | None = None) -> np.ndarray:
    """`line_chart`'s image (BGR, height x width) without writing it, for tests and composition.
    `markers`: a dot on every point (True), none (False), or only for sparse series (None)."""
    width, height = size
    if width < _MIN_SIZE[0] or height < _MIN_SIZE[1]:
        raise ValueError(f"chart size {size} is below the minimum {_MIN_SIZE}")
    data = _as_series(series)
    all_x = np.concatenate([xs for _, xs, _ in data]) if data else np.zeros(0)
    all_y = np.concatenate([ys for _, _, ys in data]) if data else np.zeros(0)
    x_range = _checked_range(x_range) if x_range else padded_range(all_x, 0.02)
    y_range = _checked_range(y_range) if y_range else padded_range(all_y, 0.05)
    image = np.full((height, width, 3), 255, np.uint8)
    frame = _draw_frame(image, title, x_label, y_label, x_range, y_range)
    # Series are drawn on a copy of the plot area, so anything outside the ranges is clipped.
    inner = (slice(frame.top, frame.top + frame.height + 1),
             slice(frame.left, frame.left + frame.width + 1))
    area = np.ascontiguousarray(image[inner])
    ink = np.zeros(area.shape[:2], np.uint8)
    entries = []
    for i, (name, xs, ys) in enumerate(data):
        color = series_color(i, len(data))
        _draw_series(area, ink, frame, xs, ys, color, markers)
        has_data = bool((np.isfinite(xs) & np.isfinite(ys)).any())
        entries.append((name if has_data else f"{name} (no data)", color))
    if not ink.any():
        _put(area, "no data", area.shape[1] / 2, area.shape[0] / 2, 0.6, (0.5, 0.5), _MUTED)
    if entries:
        _draw_legend(area, ink, entries)
    image[inner] = area
    cv2.rectangle(image, (frame.left, frame.top), (frame.left + frame.width, frame.top + frame.height),
                  _AXIS, 1)  # the series may have drawn over the frame's edge
    return image


def line_chart(series: Series, title: str, x_label: str, y_label: str, path: Path,
               size: tuple[int, int] = (800, 500), *,
               x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None,
               markers: bool | None = None) -> Path:
    """A PNG line chart of `{name: (xs, ys)}` at `size` (width, height); returns `path`.

    Ranges default to the finite data (y with a 5% margin); NaN/inf points break a line rather
    than failing, and empty, single-point or constant series still give a readable chart.
    """
    image = render_line_chart(series, title, x_label, y_label, size, x_range=x_range,
                              y_range=y_range, markers=markers)
    return write_png(image, path)


# -- training metrics --------------------------------------------------------------------------
def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_metrics(path: Path) -> dict[str, np.ndarray]:
    """metrics.csv as float columns (blank or non-numeric cells as NaN), header order kept."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        names = [n for n in (reader.fieldnames or []) if n]
        rows = list(reader)
    return {name: np.array([_number(row.get(name)) for row in rows], np.float64) for name in names}


def latest_run(x: np.ndarray) -> np.ndarray:
    """Row indices of the last run through each x: a resume from an earlier checkpoint appends
    iterations already logged, and those later rows replace the abandoned ones from there on
    (a monotonic stack), so the chart never doubles back."""
    kept: list[int] = []
    for i, value in enumerate(x):
        if not math.isfinite(value):
            continue
        while kept and x[kept[-1]] >= value:
            kept.pop()
        kept.append(i)
    return np.array(kept, np.int64)


def loss_columns(names: Sequence[str]) -> list[str]:
    """Columns plotted on the loss chart: any name containing "loss" and the heads' loss parts
    (`LOSS_PARTS`, optionally prefixed "loss_"/suffixed "_loss"), in the CSV's order."""
    return [n for n in names if "loss" in n.lower() or n.lower() in LOSS_PARTS]


def map_columns(names: Sequence[str]) -> list[str]:
    """mAP columns (map50 today; map, map50_95 ... if the trainer adds them)."""
    return [n for n in names if n.lower().startswith("map")]


def _columns_of(path: Path | None) -> dict[str, np.ndarray]:
    """A CSV's columns, or none when there is no such file (a run without validation has no
    metrics.csv; a run from before iterations.csv has none of that)."""
    return read_metrics(path) if path is not None and Path(path).is_file() else {}


def _x_axis(columns: dict[str, np.ndarray]) -> tuple[str, np.ndarray, np.ndarray]:
    """(x label, x values, rows of the latest run through each x)."""
    rows = len(next(iter(columns.values()))) if columns else 0
    x = columns.get("iteration", np.arange(rows, dtype=np.float64))
    return ("iteration" if "iteration" in columns else "row"), x, latest_run(x)


def map_range(values: np.ndarray) -> tuple[float, float]:
    """The mAP axis from 0 (a chart from 0.40 to 0.41 makes noise look like progress) to a
    little above the best value, at most 1.05; (0, 1) without data."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    return 0.0, float(min(max(finite.max() * 1.1, 0.05), 1.05))


def plot_training(metrics_csv: Path | None, out_dir: Path, size: tuple[int, int] = (800, 500),
                  iterations_csv: Path | None = None) -> list[Path]:
    """loss.png, map.png and lr.png in `out_dir`; returns the files written.

    mAP comes from metrics.csv, one dot per evaluation on an axis from 0. Loss and learning rate
    come from `iterations_csv` (one row per iteration: the warm-up and every step are visible)
    when it exists, else from metrics.csv's per-evaluation averages. A chart is skipped only when
    its columns are absent (a header without rows still gives "no data" charts)."""
    metrics = _columns_of(metrics_csv)
    per_step = _columns_of(iterations_csv) or metrics
    out_dir = Path(out_dir)
    written = []

    def chart(columns: dict, file: str, picked: list[str], title: str, y_label: str, **kw) -> None:
        x_name, x, keep = _x_axis(columns)
        series = {n: (x[keep], columns[n][keep]) for n in picked}
        written.append(line_chart(series, title, x_name, y_label, out_dir / file, size, **kw))

    if losses := loss_columns(list(per_step)):
        chart(per_step, "loss.png", losses, "Training loss", "loss")
    if maps := map_columns(list(metrics)):
        values = np.concatenate([metrics[n] for n in maps])
        chart(metrics, "map.png", maps, "Validation mAP@0.5", "mAP", y_range=map_range(values),
              markers=True)
    if "lr" in per_step:
        chart(per_step, "lr.png", ["lr"], "Learning rate", "lr")
    return written


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over the finite values (NaN where a window has none): the trend
    of a per-iteration loss, which is too noisy to read on its own."""
    values = np.asarray(values, np.float64)
    if window <= 1 or values.size == 0:
        return values.copy()
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, "same")
    counts = np.convolve(finite.astype(np.float64), kernel, "same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _panel(columns: dict[str, np.ndarray], name: str, size: tuple[int, int], *,
           is_map: bool = False, trend: bool = True) -> np.ndarray:
    """One results.png panel: a column against iterations (with its trend when dense and
    `trend`: a loss is noisy per iteration, a learning rate is not)."""
    x_name, x, keep = _x_axis(columns)
    ys = columns[name][keep] if name in columns else np.zeros(0)
    xs = x[keep] if name in columns else np.zeros(0)
    series = {name: (xs, ys)}
    if trend and not is_map and len(ys) > _MARKERS_UP_TO:
        series["smoothed"] = (xs, smooth(ys, max(3, len(ys) // 20)))
    extra = {"y_range": map_range(ys), "markers": True} if is_map else {}
    return render_line_chart(series, name, x_name, "", size, **extra)


def render_results(metrics_csv: Path | None, iterations_csv: Path | None,
                   panel: tuple[int, int] = (400, 300), columns: int = 4) -> np.ndarray:
    """results.png's image: one panel per loss part and for the learning rate (per iteration
    where iterations.csv exists) and one per mAP column (per evaluation), as ultralytics' run
    summary gives all of a run's curves at one glance."""
    metrics = _columns_of(metrics_csv)
    per_step = _columns_of(iterations_csv) or metrics
    panels = [_panel(per_step, n, panel) for n in loss_columns(list(per_step))]
    panels.append(_panel(per_step, "lr", panel, trend=False))
    panels += [_panel(metrics, n, panel, is_map=True) for n in map_columns(list(metrics)) or ["map50"]]
    return tile_images(panels, columns)


def plot_results(metrics_csv: Path | None, iterations_csv: Path | None, path: Path) -> Path:
    """results.png: every training curve of a run in one image (see `render_results`)."""
    return write_png(render_results(metrics_csv, iterations_csv), path)


def tile_images(images: Sequence[np.ndarray], columns: int, fill: int = 255) -> np.ndarray:
    """Equal-sized BGR images in a grid of `columns`, row by row, blank cells `fill`."""
    if not images:
        raise ValueError("no images to tile")
    height, width = images[0].shape[:2]
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    grid = np.full((rows * height, columns * width, 3), fill, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return grid


# -- label statistics, training batches, confusion matrix --------------------------------------
def render_bars(counts: Sequence[float], names: Sequence[str], title: str = "", y_label: str = "",
                size: tuple[int, int] = (600, 450)) -> np.ndarray:
    """A bar per category (class counts), named under the axis, the count above each bar."""
    counts = np.asarray(counts, np.float64).ravel()
    image = np.full((size[1], size[0], 3), 255, np.uint8)
    top = float(counts.max()) * 1.12 if counts.size and counts.max() > 0 else 1.0
    frame = _draw_frame(image, title, "", y_label, (-0.5, max(len(counts), 1) - 0.5), (0.0, top),
                        categories=list(names))
    half = max(1, int(frame.width / max(len(counts), 1) * 0.35))
    for index, count in enumerate(counts):
        x, y = (frame.to_pixels(np.array([float(index)]), np.array([count]))[0]
                + (frame.left, frame.top)).astype(int)
        base = frame.top + frame.height
        color = series_color(index, len(counts))
        cv2.rectangle(image, (x - half, int(y)), (x + half, base), color, -1)
        if half >= 6:
            _put(image, f"{count:g}", x, y - 2, 0.38, (0.5, 1.0))
    return image


def render_density(xs: Sequence[float], ys: Sequence[float], title: str = "", x_label: str = "",
                   y_label: str = "", size: tuple[int, int] = (450, 450), bins: int = 50,
                   x_range: tuple[float, float] = (0.0, 1.0),
                   y_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """A 2-D histogram as a heat map (log scale, empty cells white): readable for ten boxes
    or a million, where a scatter plot turns into one blot."""
    xs, ys = np.asarray(xs, np.float64).ravel(), np.asarray(ys, np.float64).ravel()
    x_range, y_range = _checked_range(x_range), _checked_range(y_range)
    image = np.full((size[1], size[0], 3), 255, np.uint8)
    frame = _draw_frame(image, title, x_label, y_label, x_range, y_range)
    finite = np.isfinite(xs) & np.isfinite(ys)
    counts, _, _ = np.histogram2d(ys[finite], xs[finite], bins=bins, range=[y_range, x_range])
    heat = _heat_colors(counts[::-1])  # histogram row 0 is the lowest y: the chart's bottom
    heat = cv2.resize(heat, (frame.width + 1, frame.height + 1), interpolation=cv2.INTER_NEAREST)
    image[frame.top:frame.top + frame.height + 1, frame.left:frame.left + frame.width + 1] = heat
    cv2.rectangle(image, (frame.left, frame.top), (frame.left + frame.width, frame.top + frame.height),
                  _AXIS, 1)
    if not finite.any():
        _put(image, "no data", frame.left + frame.width / 2, frame.top + frame.height / 2, 0.6,
             (0.5, 0.5), _MUTED)
    return image


def _heat_colors(counts: np.ndarray) -> np.ndarray:
    """Counts as viridis colours on a log scale; zero cells white."""
    level = np.log1p(counts)
    scaled = np.round(level / level.max() * 255).astype(np.uint8) if level.max() > 0 else \
        np.zeros(counts.shape, np.uint8)
    heat = cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS)
    heat[counts == 0] = 255
    return heat


def render_labels(classes: np.ndarray, boxes: np.ndarray, names: Sequence[str] | None = None,
                  num_classes: int | None = None, panel: int = 450) -> np.ndarray:
    """labels.jpg's image: instances per class, box centres and box width x height (all in
    image fractions), so a skewed or mislabelled data set shows before training on it."""
    classes = np.asarray(classes, np.int64).ravel()
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    count = max(num_classes or 0, len(names or []), int(classes.max()) + 1 if classes.size else 1)
    labels = [str(names[i]) if names and i < len(names) else str(i) for i in range(count)]
    tally = np.bincount(classes[classes >= 0], minlength=count)[:count] if classes.size else np.zeros(count)
    bars = render_bars(tally, labels, f"Instances per class ({len(classes)} boxes)", "instances",
                       (panel + panel // 3, panel))
    centres = render_density(boxes[:, 0], boxes[:, 1], "Box centres", "x", "y", (panel, panel))
    sizes = render_density(boxes[:, 2], boxes[:, 3], "Box width x height", "width", "height",
                           (panel, panel))
    return np.hstack([bars, centres, sizes])


def plot_labels(classes: np.ndarray, boxes: np.ndarray, path: Path,
                names: Sequence[str] | None = None, num_classes: int | None = None) -> Path:
    """labels.jpg from the training labels: `classes` (N,) and `boxes` (N, 4) cx, cy, w, h as
    fractions of the image (see `render_labels`)."""
    return write_image(render_labels(classes, boxes, names, num_classes), path)


def render_batch(images: np.ndarray, targets: np.ndarray, names: Sequence[str] | None = None,
                 num_classes: int = 1, max_images: int = 16, max_side: int = 1920,
                 min_tile: int = 160) -> np.ndarray:
    """A mosaic of a training batch as the network sees it, boxes drawn: the check that the
    augmentation (jitter, mosaic, flips, colour) still keeps boxes on their objects.

    `images`: (B, H, W, 3) BGR uint8; `targets`: rows (image index, class, cx, cy, w, h) with
    boxes as fractions of the network input. At most `max_images`; tiles at least `min_tile`
    pixels (a 64 px training input is enlarged to be seen), the mosaic's longer side at most
    `max_side`."""
    images = np.asarray(images)[:max_images]
    targets = np.asarray(targets, np.float64).reshape(-1, 6)
    count, height, width = images.shape[:3]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    scale = min(max(1.0, min_tile / min(width, height)), max_side / max(columns * width, rows * height))
    tile_w, tile_h = max(1, int(width * scale)), max(1, int(height * scale))
    tiles = []
    for index in range(count):
        tile = cv2.resize(np.ascontiguousarray(images[index]), (tile_w, tile_h),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        _draw_targets(tile, targets[targets[:, 0] == index, 1:], names, num_classes)
        cv2.rectangle(tile, (0, 0), (tile_w - 1, tile_h - 1), (255, 255, 255), 1)
        tiles.append(tile)
    return tile_images(tiles, columns, fill=114)


def _draw_targets(tile: np.ndarray, rows: np.ndarray, names: Sequence[str] | None,
                  num_classes: int) -> None:
    """Boxes (class, cx, cy, w, h as fractions) on a tile, with the class name when it fits."""
    height, width = tile.shape[:2]
    for cls, cx, cy, w, h in rows:
        cls = int(cls)
        color = series_color(cls, max(num_classes, 1))
        x1, y1 = int(round((cx - w / 2) * width)), int(round((cy - h / 2) * height))
        x2, y2 = int(round((cx + w / 2) * width)), int(round((cy + h / 2) * height))
        cv2.rectangle(tile, (x1, y1), (x2, y2), color, max(1, round(min(width, height) / 80)))
        name = str(names[cls]) if names and 0 <= cls < len(names) else str(cls)
        if width >= 160:
            _put(tile, name, max(x1, 0) + 2, max(y1, 0) + 2, 0.35, color=color)


def plot_batch(images: np.ndarray, targets: np.ndarray, path: Path,
               names: Sequence[str] | None = None, num_classes: int = 1) -> Path:
    """train_batch0.jpg and the like (see `render_batch`)."""
    return write_image(render_batch(images, targets, names, num_classes), path)


def render_confusion_matrix(matrix: np.ndarray, names: Sequence[str] | None = None,
                            title: str = "Confusion matrix") -> np.ndarray:
    """ultralytics' layout: rows predicted, columns true, the last of each "background"
    (row: labels nothing found, column: detections of nothing). Cells hold counts; their
    colour is the share of the column (of that true class), so rare classes read as well."""
    matrix = np.asarray(matrix, np.float64)
    size = matrix.shape[0]
    labels = [str(names[i]) if names and i < len(names) else str(i) for i in range(size - 1)]
    labels.append("background")
    cell = int(np.clip(640 // size, 14, 64))
    scale = 0.4 if cell >= 28 else 0.3
    margin = min(max(_text_size(t, 0.4)[0] for t in labels) + 2 * _PAD, 160)
    top = 2 * _PAD + _text_size(title, 0.55)[1] + _PAD
    image = np.full((top + size * cell + margin + 2 * _PAD + 20, margin + size * cell + 30 + 3 * _PAD, 3),
                    255, np.uint8)
    totals = matrix.sum(0, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    for r in range(size):
        for c in range(size):
            _draw_cell(image, margin + 20 + c * cell, top + r * cell, cell, matrix[r, c], share[r, c], scale)
    left = margin + 20
    _put(image, title, left + size * cell / 2, _PAD, 0.55, (0.5, 0.0))
    for i, text in enumerate(labels):
        fitted = _fit(text, margin - _PAD, 0.4)
        _put(image, fitted, left - _PAD, top + i * cell + cell / 2, 0.4, (1.0, 0.5))
        _put_rotated(image, fitted, left + i * cell + cell / 2, top + size * cell + _PAD, 0.4)
    _put_vertical(image, "predicted", _PAD // 2, top + size * cell // 2, 0.45)
    _put(image, "true", left + size * cell / 2, image.shape[0] - _PAD, 0.45, (0.5, 1.0))
    return image


def _draw_cell(image: np.ndarray, x: int, y: int, cell: int, count: float, share: float,
               scale: float) -> None:
    """One matrix cell: white to blue by `share`, the count written when the cell is wide enough."""
    blue = np.array(PALETTE[0], np.float64)
    color = tuple(int(v) for v in np.round(255 + (blue - 255) * share))
    cv2.rectangle(image, (x, y), (x + cell, y + cell), color, -1)
    cv2.rectangle(image, (x, y), (x + cell, y + cell), _GRID, 1)
    if count and cell >= 22:
        ink = (255, 255, 255) if share > 0.5 else _TEXT
        _put(image, f"{count:g}", x + cell / 2, y + cell / 2, scale, (0.5, 0.5), ink)


def _put_rotated(image: np.ndarray, text: str, x_center: float, y_top: int, scale: float) -> None:
    """Text read bottom to top, its end at (x_center, y_top): a column label under a matrix."""
    width, height = _text_size(text, scale)
    tile = np.full((height + _PAD, width + 2, 3), 255, np.uint8)
    _put(tile, text, 1, _PAD // 2, scale)
    tile = cv2.rotate(tile, cv2.ROTATE_90_COUNTERCLOCKWISE)
    left = int(np.clip(round(x_center - tile.shape[1] / 2), 0, image.shape[1] - tile.shape[1]))
    rows = min(tile.shape[0], image.shape[0] - y_top)
    if rows > 0:
        region = image[y_top:y_top + rows, left:left + tile.shape[1]]
        np.minimum(region, tile[:rows], out=region)


def plot_confusion_matrix(matrix: np.ndarray, path: Path, names: Sequence[str] | None = None,
                          title: str = "Confusion matrix") -> Path:
    """confusion_matrix.png (see `render_confusion_matrix`)."""
    return write_png(render_confusion_matrix(matrix, names, title), path)


# -- precision-recall ----------------------------------------------------------------------------
def plot_pr_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path,
                   ap: Mapping[str, float] | None = None, size: tuple[int, int] = (800, 600),
                   title: str = "Precision-recall") -> Path:
    """One precision-recall curve per class, `{name: (recall, precision)}`, AP in the legend
    and the mean AP in the title; returns `path` (conventionally pr.png).

    `ap` should be what the evaluation reported (VocResult.named_ap, which may be the 11-point
    VOC2007 metric); classes it lacks get the area under the curve, as `voc_ap` computes it.
    """
    from .evaluate import voc_ap

    ap = dict(ap or {})
    series = {}
    for name, (recall, precision) in curves.items():
        recall = np.asarray(recall, np.float64).ravel()
        precision = np.asarray(precision, np.float64).ravel()
        if name not in ap:
            finite = np.isfinite(recall) & np.isfinite(precision)
            ap[name] = voc_ap(recall[finite], precision[finite]) if finite.any() else 0.0
        series[f"{name}  AP {ap[name]:.3f}"] = (recall, precision)
    values = [ap[name] for name in curves]
    if values:
        title = f"{title} (mAP {float(np.mean(values)):.3f})"
    return line_chart(series, title, "recall", "precision", path, size,
                      x_range=(-0.02, 1.02), y_range=(-0.02, 1.02))
