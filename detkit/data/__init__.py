"""Data sets: labels from darknet .data/YOLO .txt, Pascal VOC XML and COCO JSON in one shape."""

from .labels import Dataset, Item, darknet_label_path, read_dataset, read_names, read_yolo_labels
from .problems import Problem

__all__ = ["Dataset", "Item", "Problem", "darknet_label_path", "read_dataset", "read_names",
           "read_yolo_labels"]
