"""Detection: one detected object, the result type of Detector and of the drawing helpers
(its own module so that engine.draw and engine.predict need not import each other)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Detection:
    """One detected object in original-image pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    class_id: int
    class_name: str

    @property
    def xywh(self) -> tuple[float, float, float, float]:
        """Top-left corner, width and height (COCO's bbox)."""
        x1, y1, x2, y2 = self.box
        return (x1, y1, x2 - x1, y2 - y1)

    def to_dict(self) -> dict:
        return {"box": list(self.box), "score": self.score, "class_id": self.class_id,
                "class_name": self.class_name}
