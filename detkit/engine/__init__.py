"""Inference engine: the Detector, darknet preprocessing, sources, the video pipeline, outputs."""

from __future__ import annotations

from .predict import Detection, Detector
from .run import DetectSettings, DetectSummary, run_detect
from .sources import Source, SourceWarning, resolve_sources

__all__ = ["DetectSettings", "DetectSummary", "Detection", "Detector", "Source", "SourceWarning",
           "resolve_sources", "run_detect"]
