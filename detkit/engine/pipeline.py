"""Reader thread -> batched inference -> writer thread, so the model never waits on I/O.

The reader decodes images or video frames into a bounded queue; the calling thread takes them
in batches and runs the Detector on its device; the writer thread draws, encodes and saves. The
queues are bounded, so memory stays flat on an endless stream. Ctrl-C (or 'q' in the --show
window) stops the reader, lets the writer finish what was already inferred, and returns; the
caller then closes its outputs, which leaves a playable video.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .predict import Detection, Detector

_END = object()
_POLL_S = 0.1


@dataclass
class Frame:
    """One decoded image or video frame on its way through the pipeline."""

    image: np.ndarray
    name: str                       # what the per-image line shows: "dog.jpg"
    out_stem: str                   # unique stem for its output files
    path: Path | None = None        # the image file (None for video frames)
    frame_index: int | None = None  # position in its video (None for images)


@dataclass
class FrameResult:
    """A frame with its detections, the per-image latency and its index in the run."""

    frame: Frame
    detections: list[Detection]
    latency_ms: float
    run_index: int = 0


@dataclass
class PipelineStats:
    processed: int = 0
    interrupted: bool = False       # Ctrl-C
    stopped: bool = False           # 'q' in the --show window
    latencies_ms: list[float] = field(default_factory=list)


class _Failure:
    """An exception raised in a worker thread, carried to the calling thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _put(q: queue.Queue, item: object, stop: threading.Event | None = None) -> bool:
    """Blocking put that gives up once `stop` is set (so no thread hangs on a full queue)."""
    while True:
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            if stop is not None and stop.is_set():
                return False


class Pipeline:
    """Runs frames through a Detector in batches with a reader and a writer thread."""

    def __init__(self, detector: Detector, batch: int = 1, show: bool = False,
                 show_wait_ms: int = 1) -> None:
        self.detector = detector
        self.batch = max(1, int(batch))
        self.show = show
        self.show_wait_ms = show_wait_ms
        depth = max(4, 2 * self.batch)
        self._read_q: queue.Queue = queue.Queue(maxsize=depth)
        self._write_q: queue.Queue = queue.Queue(maxsize=depth)
        self._display_q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._writer_error: BaseException | None = None

    # -- threads -------------------------------------------------------------------------------
    def _reader(self, frames: Iterable[Frame]) -> None:
        try:
            for frame in frames:
                if self._stop.is_set() or not _put(self._read_q, frame, self._stop):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            _put(self._read_q, _Failure(exc), self._stop)
            return
        _put(self._read_q, _END, self._stop)

    def _writer(self, write: Callable[[FrameResult], np.ndarray | None]) -> None:
        while True:
            item = self._write_q.get()
            if item is _END:
                return
            if self._writer_error is not None:
                continue  # keep draining so the calling thread never blocks
            try:
                annotated = write(item)
                if self.show and annotated is not None:
                    self._offer_display(annotated)
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                self._writer_error = exc
                self._stop.set()

    def _offer_display(self, image: np.ndarray) -> None:
        if self.show_wait_ms == 0:
            _put(self._display_q, image, self._stop)   # images: show every one
            return
        try:
            self._display_q.put_nowait(image)
        except queue.Full:                             # video: drop a frame rather than lag
            pass

    # -- calling thread ------------------------------------------------------------------------
    def _next_batch(self) -> list[Frame] | None:
        """Up to `batch` frames; None once the reader is done and nothing is left."""
        frames: list[Frame] = []
        while len(frames) < self.batch:
            try:
                item = self._read_q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    break
                self._raise_worker_error()
                self._pump_display()
                continue
            if item is _END:
                _put(self._read_q, _END)  # leave the end marker for the next call
                break
            if isinstance(item, _Failure):
                raise item.exc
            frames.append(item)
        return frames or None

    def _raise_worker_error(self) -> None:
        if self._writer_error is not None:
            raise self._writer_error

    def _pump_display(self) -> None:
        if not self.show:
            return
        import cv2

        while True:
            try:
                image = self._display_q.get_nowait()
            except queue.Empty:
                return
            cv2.imshow("detkit", image)
            if cv2.waitKey(self.show_wait_ms) & 0xFF == ord("q"):
                self._stop.set()
                return

    def run(self, frames: Iterable[Frame], write: Callable[[FrameResult], np.ndarray | None],
            on_result: Callable[[FrameResult], None] | None = None,
            on_batch: Callable[[int], None] | None = None) -> PipelineStats:
        """Detect in every frame. `write` runs in the writer thread (returns the annotated image
        for --show); `on_result` and `on_batch` run in the calling thread, in frame order."""
        stats = PipelineStats()
        reader = threading.Thread(target=self._reader, args=(frames,), daemon=True,
                                  name="detkit-reader")
        writer = threading.Thread(target=self._writer, args=(write,), daemon=True,
                                  name="detkit-writer")
        reader.start()
        writer.start()
        try:
            self._loop(stats, on_result, on_batch)
        except KeyboardInterrupt:
            stats.interrupted = True
        finally:
            self._shutdown(reader, writer)
        if self._writer_error is not None:
            raise self._writer_error
        return stats

    def _loop(self, stats: PipelineStats, on_result: Callable[[FrameResult], None] | None,
              on_batch: Callable[[int], None] | None) -> None:
        while not self._stop.is_set():
            frames = self._next_batch()
            if frames is None:
                break
            start = time.perf_counter()
            rows = self.detector.predict_arrays([f.image for f in frames])
            per_image_ms = (time.perf_counter() - start) * 1000 / len(frames)
            for frame, boxes in zip(frames, rows, strict=True):
                result = FrameResult(frame, self.detector.to_detections(boxes), per_image_ms,
                                     stats.processed)
                stats.processed += 1
                stats.latencies_ms.append(per_image_ms)
                if not _put(self._write_q, result, self._stop):
                    break
                if on_result is not None:
                    on_result(result)  # after queueing: a frame that is counted gets written
            if on_batch is not None:
                on_batch(len(frames))
            self._raise_worker_error()
            self._pump_display()
        if self._stop.is_set() and self._writer_error is None:
            stats.stopped = True

    def _shutdown(self, reader: threading.Thread, writer: threading.Thread) -> None:
        """Stop reading, let the writer finish the frames already inferred, join both threads."""
        self._stop.set()
        while reader.is_alive():
            try:
                self._read_q.get(timeout=_POLL_S)  # unblock a reader waiting on a full queue
            except queue.Empty:
                pass
        while writer.is_alive():
            try:
                self._write_q.put(_END, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        while writer.is_alive():
            writer.join(timeout=_POLL_S)
            self._pump_display()
        self._pump_display()
