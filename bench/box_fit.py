"""How well a detector's boxes fit the crowns it finds: the IoU of each confident detection with
its best truth, and the detections' size and centre errors, overall and by crown size (issue 20).

    .venv/bin/python bench/box_fit.py --cfg cfg/yolov3-tiny-trees.cfg --weights runs/trees/best.pt

AP50 counts a detection only at IoU 0.5 or more, so a model whose boxes are found but loosely
placed scores low at 0.5 and well at 0.4. These figures tell a biased box (every box too large,
or shifted: a decode or label defect, fixable) from a scattered one (sizes pulled towards the
mean crown: the model's regression itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detkit.engine.train import pairwise_iou

REPO = Path(__file__).resolve().parents[1]
SIZE_BINS = (0, 30, 45, 60, 10_000)  # crown side sqrt(w*h), pixels of the validation tile


@dataclass
class Fit:
    """Statistics of the detections matched to a truth (IoU >= min_iou with their best one)."""

    matched: int
    detections: int
    truths: int
    median_iou: float
    share_iou_50: float
    share_iou_75: float
    log_width_ratio: float   # mean log(detected / true width): 0 unbiased, > 0 too wide
    log_height_ratio: float
    log_size_sd: float       # spread of the log width ratio
    centre_x_error: float    # mean (detected - true centre) / true width
    centre_sd: float
    by_size: dict


def matched_pairs(detected: list[np.ndarray], truths: list[np.ndarray], min_iou: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every detection with its best truth of the same image, where their IoU is >= min_iou."""
    pairs_d, pairs_t, ious = [], [], []
    for boxes, truth in zip(detected, truths, strict=True):
        if len(boxes) == 0 or len(truth) == 0:
            continue
        iou = pairwise_iou(boxes, truth)
        best = iou.argmax(1)
        best_iou = iou[np.arange(len(boxes)), best]
        keep = best_iou >= min_iou
        pairs_d.append(boxes[keep])
        pairs_t.append(truth[best[keep]])
        ious.append(best_iou[keep])
    if not pairs_d:
        return np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0)
    return np.concatenate(pairs_d), np.concatenate(pairs_t), np.concatenate(ious)


def box_fit(detected: list[np.ndarray], truths: list[np.ndarray], min_iou: float = 0.3) -> Fit:
    det, truth, iou = matched_pairs(detected, truths, min_iou)
    if len(iou) == 0:
        raise ValueError("no detection overlaps a truth")
    dw, dh = det[:, 2] - det[:, 0], det[:, 3] - det[:, 1]
    tw, th = truth[:, 2] - truth[:, 0], truth[:, 3] - truth[:, 1]
    log_w, log_h = np.log(dw / tw), np.log(dh / th)
    centre_x = ((det[:, 0] + det[:, 2]) - (truth[:, 0] + truth[:, 2])) / 2 / tw
    side = np.sqrt(tw * th)
    by_size = {}
    for low, high in zip(SIZE_BINS[:-1], SIZE_BINS[1:], strict=True):
        inside = (side >= low) & (side < high)
        if inside.any():
            by_size[f"{low}-{high}"] = {"matched": int(inside.sum()), "mean_iou": float(iou[inside].mean()),
                                        "log_width_ratio": float(log_w[inside].mean()),
                                        "log_height_ratio": float(log_h[inside].mean())}
    return Fit(len(iou), sum(len(d) for d in detected), sum(len(t) for t in truths),
               float(np.median(iou)), float((iou >= 0.5).mean()), float((iou >= 0.75).mean()),
               float(log_w.mean()), float(log_h.mean()), float(log_w.std()),
               float(centre_x.mean()), float(centre_x.std()), by_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "trees" / "trees.data")
    parser.add_argument("--conf", type=float, default=0.25, help="detections kept (detect's default)")
    parser.add_argument("--min-iou", type=float, default=0.3, help="a detection this close to a truth is its")
    args = parser.parse_args(argv)

    import torch

    from detkit.data.labels import read_dataset
    from detkit.engine.checkpoint import load_model
    from detkit.engine.train import predict_samples

    torch.set_num_threads(2)
    samples = [item for item in read_dataset(args.data, split="valid").items if item.image is not None]
    detections, truths = predict_samples(load_model(args.cfg, args.weights), samples, "cpu",
                                         conf_thresh=args.conf)
    fit = box_fit([d.boxes for d in detections], [t.boxes for t in truths], args.min_iou)
    json.dump(asdict(fit), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
