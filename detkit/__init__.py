"""detkit: Darknet-style cfg object detection (YOLOv2, YOLOv3, SSD) on PyTorch."""

from __future__ import annotations

from .openmp import openmp_wait_policy  # first: it sets OMP_WAIT_POLICY before torch loads

# isort: split
import torch as _torch  # noqa: F401

from .boxes import postprocess
from .engine.checkpoint import load_model, load_weights
from .errors import CfgError, DataError, DetkitError, SourceError, WeightsError
from .model import Model, model_from_cfg
from .weights import load_darknet_weights, save_darknet_weights

__version__ = "0.1.0"


def __getattr__(name: str):
    """Detector and Detection load on first use: `import detkit` stays light (no OpenCV)."""
    if name in ("Detector", "Detection"):
        from .engine import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'detkit' has no attribute '{name}'")


__all__ = [
    "CfgError", "DataError", "Detection", "Detector", "DetkitError", "Model", "SourceError",
    "WeightsError", "load_darknet_weights", "load_model", "load_weights", "model_from_cfg",
    "openmp_wait_policy", "postprocess", "save_darknet_weights",
]


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])
