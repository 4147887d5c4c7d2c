"""Detection heads. Each decodes its raw map to boxes; training targets and losses live beside.
Each head registers the cfg section it builds (detkit.registry)."""

from .region import RegionHead
from .ssd import SSDHead
from .yolo import YoloHead

__all__ = ["RegionHead", "SSDHead", "YoloHead"]
