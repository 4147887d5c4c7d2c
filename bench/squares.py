"""A synthetic one-class data set: white squares on dark noise, YOLO labels beside each image.

For checks that must run where no real data set travels (the GPU machine: bench/gpu_check.py,
tests/test_gpu.py). A detector learns it within tens of iterations, so a falling loss is a
meaningful check; it proves nothing about accuracy on real photos.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def square_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """`count` size x size images with one to three squares each, and their image list
    (darknet's train.txt form) beside the folder; the list's path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    listing = []
    for i in range(count):
        image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(size // 8, size // 3))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            image[y:y + side, x:x + side] = 255
            lines.append(f"0 {(x + side / 2) / size:.6f} {(y + side / 2) / size:.6f} "
                         f"{side / size:.6f} {side / size:.6f}")
        cv2.imwrite(str(folder / f"{i}.png"), image)
        (folder / f"{i}.txt").write_text("\n".join(lines) + "\n")
        listing.append(str(folder / f"{i}.png"))
    path = folder.parent / f"{folder.name}.txt"
    path.write_text("\n".join(listing) + "\n")
    return path
