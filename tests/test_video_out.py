"""Annotated videos (issue 25): H.264 where the OpenCV build can write it (browsers play only
that in an mp4), else mp4v; the file is readable whichever was chosen, and the run says which."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from detkit.engine import video
from detkit.engine.run import DetectSummary, format_summary
from detkit.engine.video import MP4_FOURCCS, VideoInfo, VideoSink, choose_fourcc, fourcc_candidates


def read_back(path: Path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    frames, size = 0, (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    while cap.read()[0]:
        frames += 1
    cap.release()
    return frames, size


def test_sink_writes_a_readable_mp4_in_one_of_the_candidates(tmp_path):
    sink = VideoSink(tmp_path / "out.mp4", VideoInfo(96, 64, 25.0, 5))
    assert sink.fourcc in MP4_FOURCCS  # chosen before the first frame: the size is known
    try:
        for i in range(5):
            sink.write(np.full((64, 96, 3), 50 * i, np.uint8))
    finally:
        sink.close()
    assert read_back(tmp_path / "out.mp4") == (5, (96, 64))


def test_sink_of_unknown_size_chooses_on_the_first_frame(tmp_path):
    sink = VideoSink(tmp_path / "cam.mp4", VideoInfo(0, 0, 25.0, 0))
    assert sink.fourcc is None
    sink.write(np.zeros((48, 64, 3), np.uint8))
    sink.close()
    assert sink.fourcc in MP4_FOURCCS and read_back(tmp_path / "cam.mp4") == (1, (64, 48))


def test_h264_first_and_mp4v_when_the_build_has_no_encoder(monkeypatch, tmp_path):
    assert fourcc_candidates(Path("a.mp4")) == ("avc1", "H264", "mp4v")
    assert fourcc_candidates(Path("a.avi")) == ("mp4v",)
    monkeypatch.setattr(video, "fourcc_writes", lambda fourcc, size, suffix=".mp4": False)
    assert choose_fourcc(tmp_path / "x.mp4", (64, 48)) == "mp4v"
    monkeypatch.setattr(video, "fourcc_writes", lambda fourcc, size, suffix=".mp4": fourcc == "H264")
    assert choose_fourcc(tmp_path / "x.mp4", (64, 48)) == "H264"


def test_a_probe_writes_nothing_to_the_terminal(capfd):
    video.fourcc_writes.cache_clear()
    video.fourcc_writes("avc1", (66, 50))  # a build without H.264 prints a screen of errors
    assert capfd.readouterr().err == ""


def test_summary_says_the_codec_once():
    summary = DetectSummary(out_dir=Path("out"), frames=10, videos=[Path("out/a.mp4"), Path("out/b.mp4")],
                            video_fourccs=["mp4v"])
    lines = [line for line in format_summary(summary) if line.startswith("videos written as")]
    assert lines == ["videos written as MPEG-4 Part 2 (mp4v) (this OpenCV build has no H.264 encoder: "
                     "some browsers will not play them)"]
    summary.video_fourccs = ["avc1"]
    assert "videos written as H.264 (avc1)" in format_summary(summary)
