"""Inference engine: the Detector, darknet preprocessing, sources, the video pipeline, outputs.

The names below load on first use, so that `import detkit` (which needs only
engine.checkpoint) does not pay for OpenCV, the fast path and the video pipeline.
"""

from __future__ import annotations

__all__ = ["DetectSettings", "DetectSummary", "Detection", "Detector", "Source", "SourceWarning",
           "resolve_sources", "run_detect"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'detkit.engine' has no attribute {name!r}")
    from . import predict, run, sources

    for home in (predict, run, sources):
        if hasattr(home, name):
            return getattr(home, name)
    raise AttributeError(f"module 'detkit.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
