"""detkit: Darknet-style cfg object detection (YOLOv2, YOLOv3, SSD) on PyTorch."""

from __future__ import annotations

import os

# OpenMP threads that wait by spinning steal the cores the working threads need whenever the
# CPU is shared or oversubscribed: at load 4 on 2 cores yolov2-voc took 4.8 s instead of 0.22 s
# per image (detkit.fast). Waiting passively costs microseconds per parallel region on an idle
# machine. Only effective before torch is first imported; set OMP_WAIT_POLICY to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .boxes import postprocess
from .engine.checkpoint import load_model, load_weights
from .errors import CfgError, DataError, DetkitError, SourceError, WeightsError
from .model import Model, model_from_cfg
from .weights import load_darknet_weights, save_darknet_weights

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Detector":
        from .engine.predict import Detector

        return Detector
    raise AttributeError(name)


__all__ = [
    "CfgError", "DataError", "DetkitError", "Model", "SourceError", "WeightsError", "load_model",
    "load_weights", "load_darknet_weights", "model_from_cfg", "postprocess", "save_darknet_weights", "torch",
]
