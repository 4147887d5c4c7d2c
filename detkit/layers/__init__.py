"""Layer modules and the registry that maps a cfg section kind to its builder."""

from __future__ import annotations

from .base import BuildContext, Layer, Shape
from .conv import Connected, Convolutional
from .l2norm import L2Norm
from .simple import AvgPool, Cost, Dropout, MaxPool, Reorg, Route, Shortcut, Softmax, Upsample

# detkit's own sections beyond darknet's (SSD and friends) add themselves here.
EXTENSION_SECTIONS: set[str] = {"l2norm", "ssd"}


def builders() -> dict[str, type[Layer]]:
    from ..heads import RegionHead, YoloHead
    from ..heads.ssd import SSDHead

    return {
        "convolutional": Convolutional,
        "connected": Connected,
        "maxpool": MaxPool,
        "avgpool": AvgPool,
        "route": Route,
        "shortcut": Shortcut,
        "upsample": Upsample,
        "reorg": Reorg,
        "dropout": Dropout,
        "softmax": Softmax,
        "cost": Cost,
        "yolo": YoloHead,
        "region": RegionHead,
        "l2norm": L2Norm,
        "ssd": SSDHead,
    }


__all__ = ["BuildContext", "Layer", "Shape", "EXTENSION_SECTIONS", "builders"]
