"""Darknet's layers. Each class registers the cfg section it builds (detkit.registry)."""

from __future__ import annotations

from .base import BuildContext, Layer, Shape
from .conv import Connected, Convolutional
from .l2norm import L2Norm
from .simple import AvgPool, Cost, Dropout, MaxPool, Reorg, Route, Shortcut, Softmax, Upsample

__all__ = ["AvgPool", "BuildContext", "Connected", "Convolutional", "Cost", "Dropout", "L2Norm",
           "Layer", "MaxPool", "Reorg", "Route", "Shape", "Shortcut", "Softmax", "Upsample"]
