"""Detection heads. Each decodes its raw map to boxes; training targets and losses live beside."""

from .region import RegionHead
from .yolo import YoloHead

__all__ = ["RegionHead", "YoloHead"]
