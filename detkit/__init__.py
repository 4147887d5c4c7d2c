"""detkit: Darknet-style cfg object detection (YOLOv2, YOLOv3, SSD) on PyTorch."""

from __future__ import annotations

import os as _os
import sys as _sys

# OpenMP threads that wait by spinning steal the cores the working threads need whenever the
# CPU is shared or oversubscribed: at load 4 on 2 cores yolov2-voc took 4.8 s instead of 0.22 s
# per image (detkit.fast). Waiting passively costs microseconds per parallel region on an idle
# machine. libgomp reads the variable once, when torch loads it: so this works only when detkit
# is imported before torch. `openmp_wait_policy()` says which policy the process really has
# (`detkit benchmark` prints it); set OMP_WAIT_POLICY yourself to choose.
_TORCH_FIRST = "torch" in _sys.modules
_POLICY_AT_TORCH_IMPORT = _os.environ.get("OMP_WAIT_POLICY") if _TORCH_FIRST else None
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch as _torch  # noqa: E402,F401

from .boxes import postprocess  # noqa: E402
from .engine.checkpoint import load_model, load_weights  # noqa: E402
from .errors import CfgError, DataError, DetkitError, SourceError, WeightsError  # noqa: E402
from .model import Model, model_from_cfg  # noqa: E402
from .weights import load_darknet_weights, save_darknet_weights  # noqa: E402

__version__ = "0.1.0"


def openmp_wait_policy() -> str:
    """The OpenMP wait policy in effect: 'passive' (detkit's, or yours), 'active' (yours), or
    'default (torch was imported before detkit)' when libgomp started without a setting."""
    policy = _POLICY_AT_TORCH_IMPORT if _TORCH_FIRST else _os.environ.get("OMP_WAIT_POLICY")
    if policy is None:
        return "default (torch was imported before detkit: OMP_WAIT_POLICY=PASSIVE not applied)"
    return policy.strip().lower()


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
