"""`detkit detect` as a library call: sources in, annotated files, JSON and labels out.

The CLI validates its arguments, builds a Detector and calls `run_detect`; everything it
prints comes from the FrameResults and the DetectSummary returned here.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import DetkitError
from .draw import draw_detections
from .outputs import CocoJsonWriter, UniqueNames, image_id_for, yolo_label_lines
from .pipeline import Frame, FrameResult, Pipeline, PipelineStats
from .predict import Detector
from .sources import Source, read_image, release_sources, warn_unreadable_image
from .video import (
    CODEC_NAMES,
    VideoFrames,
    VideoSink,
    codec_name,
    open_source_capture,
    output_stem,
    video_info,
)

IMAGE_OUT_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class DetectSettings:
    """Where and how results are written."""

    out_dir: Path
    save_json: Path | None = None
    save_txt: bool = False
    save_conf: bool = False  # a score column in the label files
    batch: int = 1
    show: bool = False
    progress: bool = True  # tqdm bar for videos (on a terminal only)


@dataclass
class DetectSummary:
    """Totals of a run, for the closing lines and for callers of the library."""

    out_dir: Path
    images: int = 0
    frames: int = 0
    detections: int = 0
    skipped_images: int = 0
    skipped_frames: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)
    video_fourccs: list[str] = field(default_factory=list)  # codecs the videos were written in
    json_path: Path | None = None
    labels_dir: Path | None = None
    interrupted: bool = False
    stopped: bool = False

    @property
    def mean_latency_ms(self) -> float:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else 0.0


def group_jobs(sources: list[Source]) -> list[list[Source]]:
    """Consecutive images make one job (batched together); each video, camera or stream its own."""
    jobs: list[list[Source]] = []
    for source in sources:
        if not source.is_video and jobs and not jobs[-1][0].is_video:
            jobs[-1].append(source)
        else:
            jobs.append([source])
    return jobs


def format_result_line(result: FrameResult) -> str:
    """darknet-style line: `dog.jpg: dog 0.81 bicycle 0.59 truck 0.55 (4.1 ms)`."""
    found = " ".join(f"{d.class_name} {d.score:.2f}" for d in result.detections) or "no detections"
    return f"{result.frame.name}: {found} ({result.latency_ms:.1f} ms)"


def format_summary(summary: DetectSummary, device: str = "", batch: int = 1) -> list[str]:
    """The closing lines of `detkit detect`."""
    parts = [f"{summary.images} image{'s' * (summary.images != 1)}",
             f"{summary.frames} video frame{'s' * (summary.frames != 1)}",
             f"{summary.detections} detection{'s' * (summary.detections != 1)}"]
    if summary.skipped_images:
        parts.append(f"{summary.skipped_images} unreadable image(s) skipped")
    if summary.skipped_frames:
        parts.append(f"{summary.skipped_frames} unreadable frame(s) skipped")
    where = f" ({device}, batch {batch})" if device else ""
    lines = [f"done: {', '.join(parts)}; mean latency {summary.mean_latency_ms:.1f} ms per "
             f"image{where}"]
    if summary.interrupted:
        lines.insert(0, "interrupted: outputs so far are saved")
    lines.append(f"results saved to {summary.out_dir}")
    if summary.video_fourccs:
        lines.append(video_codec_line(summary.video_fourccs))
    if summary.labels_dir is not None:
        lines.append(f"labels saved to {summary.labels_dir}")
    if summary.json_path is not None:
        lines.append(f"COCO JSON saved to {summary.json_path}")
    return lines


def video_codec_line(fourccs: list[str]) -> str:
    """Which codec the annotated videos are in, once per run; without H.264, why browsers may
    not play them."""
    line = "videos written as " + ", ".join(codec_name(f) for f in fourccs)
    if not any(CODEC_NAMES.get(f) == "H.264" for f in fourccs):
        line += " (this OpenCV build has no H.264 encoder: some browsers will not play them)"
    return line


class DetectRun:
    """One `detect` run over many sources; owns the output folder, JSON and label writers."""

    def __init__(self, detector: Detector, settings: DetectSettings,
                 on_result: Callable[[FrameResult], None] | None = None) -> None:
        self.detector = detector
        self.settings = settings
        self.on_result = on_result
        self.names = UniqueNames(settings.out_dir, tuple(sorted(IMAGE_OUT_SUFFIXES)) + (".mp4",))
        self.summary = DetectSummary(out_dir=settings.out_dir)
        self.labels_dir = settings.out_dir / "labels" if settings.save_txt else None
        self.json = (CocoJsonWriter(settings.save_json, detector.num_classes)
                     if settings.save_json else None)
        self._run_index = 0

    # -- per result, calling thread ----------------------------------------------------------
    def _record(self, result: FrameResult) -> None:
        result.run_index = self._run_index
        self._run_index += 1
        frame = result.frame
        if frame.frame_index is None:
            self.summary.images += 1
        else:
            self.summary.frames += 1
        self.summary.detections += len(result.detections)
        if self.json is not None:
            stem = frame.path.stem if frame.path is not None else ""
            self.json.add(image_id_for(stem, result.run_index), result.detections)
        if self.on_result is not None:
            self.on_result(result)

    # -- writer thread ---------------------------------------------------------------------------
    def _write_labels(self, result: FrameResult, stem: str) -> None:
        if self.labels_dir is None:
            return
        h, w = result.frame.image.shape[:2]
        path = self.labels_dir / f"{stem}.txt"
        self.names.record(f"labels/{stem}.txt")
        path.write_text(yolo_label_lines(result.detections, w, h, self.settings.save_conf),
                        encoding="utf-8")

    def _write_image(self, result: FrameResult) -> np.ndarray:
        frame = result.frame
        image = draw_detections(frame.image, result.detections, self.detector.num_classes)
        suffix = frame.path.suffix.lower() if frame.path is not None else ".jpg"
        suffix = suffix if suffix in IMAGE_OUT_SUFFIXES else ".jpg"
        ok, encoded = cv2.imencode(suffix, image)
        if not ok:
            raise DetkitError(f"cannot encode {frame.name} as {suffix}")
        self.names.record(f"{frame.out_stem}{suffix}")
        encoded.tofile(str(self.settings.out_dir / f"{frame.out_stem}{suffix}"))
        self._write_labels(result, frame.out_stem)
        return image

    # -- jobs --------------------------------------------------------------------------------------
    def _image_frames(self, sources: list[Source]) -> Iterator[Frame]:
        for source in sources:
            path = Path(source.location)
            image = read_image(path)
            if image is None:
                warn_unreadable_image(path)
                self.summary.skipped_images += 1
                continue
            yield Frame(image, path.name, self.names.claim(path.stem, ""), path, None)

    def _pipeline(self, show_wait_ms: int) -> Pipeline:
        return Pipeline(self.detector, self.settings.batch, self.settings.show, show_wait_ms)

    def _run_images(self, sources: list[Source]) -> PipelineStats:
        return self._pipeline(0).run(self._image_frames(sources), self._write_image, self._record)

    def _run_video(self, source: Source) -> PipelineStats:
        cap = open_source_capture(source)
        info = video_info(cap, source)
        stem = self.names.claim(output_stem(source), "")
        name = Path(source.location).name if source.kind == "video" else source.location
        frames = VideoFrames(source, info, cap, name, stem)
        sink = VideoSink(self.settings.out_dir / f"{stem}.mp4", info)
        self.names.record(f"{stem}.mp4")

        def write(result: FrameResult) -> np.ndarray:
            image = draw_detections(result.frame.image, result.detections,
                                    self.detector.num_classes)
            sink.write(image)
            self._write_labels(result, f"{stem}_{result.frame.frame_index:06d}")
            return image

        # disable=None: tqdm draws only on a terminal, so a log or a pipe gets no \r bar lines
        bar = tqdm(total=info.frame_count or None, desc=name, unit="frame", dynamic_ncols=True,
                   disable=None if self.settings.progress else True, leave=True)
        try:
            stats = self._pipeline(1).run(frames, write, self._record, bar.update)
        finally:
            sink.close()       # finalises the mp4 even after Ctrl-C or an error
            cap.release()
            bar.close()
            self.summary.skipped_frames += frames.unreadable
        if sink.frames:
            self.summary.videos.append(sink.path)
            if sink.fourcc not in self.summary.video_fourccs:
                self.summary.video_fourccs.append(sink.fourcc)
        return stats

    def run(self, sources: list[Source]) -> DetectSummary:
        """Process every source in order; stops early on Ctrl-C or 'q' and still saves."""
        self.settings.out_dir.mkdir(parents=True, exist_ok=True)  # the CLI made it; the API may not
        if self.labels_dir is not None:
            self.labels_dir.mkdir(parents=True, exist_ok=True)
            self.summary.labels_dir = self.labels_dir
        try:
            for job in group_jobs(sources):
                stats = self._run_video(job[0]) if job[0].is_video else self._run_images(job)
                self.summary.latencies_ms.extend(stats.latencies_ms)
                if stats.interrupted or stats.stopped:
                    self.summary.interrupted = stats.interrupted
                    self.summary.stopped = stats.stopped
                    break
        finally:
            release_sources(sources)
            if self.json is not None:
                self.json.close()
                self.summary.json_path = self.json.path
            if self.settings.show:
                cv2.destroyAllWindows()
        return self.summary


def run_detect(detector: Detector, sources: list[Source], settings: DetectSettings,
               on_result: Callable[[FrameResult], None] | None = None) -> DetectSummary:
    """Detect in all sources and write the results; see DetectRun."""
    return DetectRun(detector, settings, on_result).run(sources)
