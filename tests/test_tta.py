"""Test-time augmentation: every view maps its boxes back onto the input, and merge-NMS
averages what it suppresses."""

from __future__ import annotations

import pytest
import torch

from detkit.boxes import postprocess
from detkit.engine.tta import apply_view, predict_views, undo_view, views_for


class FindsTheRectangle(torch.nn.Module):
    """A stand-in detector: one decoded prediction per image, the box of its bright pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for image in x:
            ys, xs = (image[0] > 0.5).nonzero(as_tuple=True)
            x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            rows.append(torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]).float())
        boxes = torch.stack(rows)[:, None]
        return torch.cat([boxes, torch.ones(len(x), 1, 2)], -1)  # objectness 1, one class at 1


def rectangle_image(width: int, height: int) -> torch.Tensor:
    x = torch.zeros(1, 3, height, width)
    x[:, :, 5:12, 20:40] = 1.0  # x 20..40, y 5..12: wider than tall, off-centre
    return x


def test_views_are_the_square_symmetries_or_the_flips():
    assert len(views_for(64, 64)) == 8 and len(set(views_for(64, 64))) == 8
    assert views_for(96, 64) == [(False, 0), (True, 0)]


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64)])
def test_every_view_maps_its_box_back_onto_the_input(width, height):
    x, model = rectangle_image(width, height), FindsTheRectangle()
    truth = torch.tensor([30.0, 8.5, 20.0, 7.0])
    for view in views_for(width, height):
        seen = model(apply_view(x, view))[0, 0, :4]
        if view[1] % 2:
            assert seen[2] == 7.0 and seen[3] == 20.0  # a quarter turn stands the box up
        assert undo_view(model(apply_view(x, view)), view, width, height)[0, 0, :4].tolist() == truth.tolist(), view
    preds = predict_views(model, x)
    assert preds.shape == (1, len(views_for(width, height)), 6)
    assert (preds[0, :, :4] == truth).all()


def test_merge_nms_averages_the_suppressed_boxes_by_score():
    def row(x1, y1, x2, y2, obj, cls_scores):
        return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, obj, *cls_scores]

    preds = torch.tensor([[row(0, 0, 10, 10, 0.9, [1, 0]),     # kept
                           row(1, 0, 11, 10, 0.3, [1, 0]),     # IoU 9/11 with it: merged
                           row(0, 1, 10, 11, 0.8, [0, 1]),     # the other class: its own detection
                           row(50, 50, 60, 60, 0.5, [1, 0])]])  # far away: its own
    out = postprocess(preds, conf_thresh=0.1, nms_thresh=0.45, merge=True)[0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert out[0, :4].tolist() == pytest.approx([0.25, 0, 10.25, 10])  # (0.9 * 0 + 0.3 * 1) / 1.2
    assert out[1, :4].tolist() == pytest.approx([0, 1, 10, 11]) and out[1, 5] == 1
    assert out[2, :4].tolist() == pytest.approx([50, 50, 60, 60])


def test_the_flipped_and_turned_views_of_a_real_photo_find_the_same_objects(tiny_weights):
    """yolov3-tiny on darknet's dog photo: once their boxes are mapped back, the flipped view finds
    every confident detection of the plain view again, and the turned views at least one (COCO's
    objects are recognisable mirrored; turned, fewer of them)."""
    import cv2
    from conftest import DARKNET_DATA, REPO
    from torchvision.ops import box_iou

    from detkit import load_model
    from detkit.boxes import cxcywh_to_xyxy
    from detkit.data.augment import augment

    photo = DARKNET_DATA / "dog.jpg"
    if not photo.exists():
        pytest.skip("darknet's sample photos are not installed")
    model = load_model(REPO / "cfg" / "yolov3-tiny.cfg", tiny_weights, device="cpu").eval()
    canvas, _, _ = augment(cv2.imread(str(photo)), torch.zeros(0, 4).numpy(), torch.zeros(0).numpy(), 416, 416,
                           None, None)
    x = torch.from_numpy(canvas[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        plain = model(x)[0]
        confident = cxcywh_to_xyxy(plain[plain[:, 4] > 0.5][:, :4])
        assert len(confident) >= 3
        flipped = undo_view(model(apply_view(x, (True, 0))), (True, 0), 416, 416)[0]
        found = cxcywh_to_xyxy(flipped[flipped[:, 4] > 0.1][:, :4])
        assert (box_iou(confident, found).max(1).values > 0.8).all()
        for view in ((False, 1), (False, 2), (True, 3)):  # turned, the dog at least is found again
            seen = undo_view(model(apply_view(x, view)), view, 416, 416)[0]
            found = cxcywh_to_xyxy(seen[seen[:, 4] > 0.1][:, :4])
            assert box_iou(confident, found).max() > 0.8, view


def test_detect_tta_finds_the_dog_photo_objects_and_the_cli_takes_the_option(tiny_weights, tmp_path):
    import subprocess
    import sys

    import cv2
    from conftest import DARKNET_DATA, REPO
    from torchvision.ops import box_iou

    from detkit.engine.predict import Detector

    photo = DARKNET_DATA / "dog.jpg"
    if not photo.exists():
        pytest.skip("darknet's sample photos are not installed")
    image = cv2.imread(str(photo))
    cfg = REPO / "cfg" / "yolov3-tiny.cfg"
    plain = Detector(cfg, tiny_weights, device="cpu").predict_arrays([image])[0]
    merged = Detector(cfg, tiny_weights, device="cpu", tta=True).predict_arrays([image])[0]
    assert len(plain) >= 3
    for row in plain:  # every plain detection is there, same class, in about the same place
        same_class = merged[merged[:, 5] == row[5]]
        assert len(same_class) and box_iou(row[None, :4], same_class[:, :4]).max() > 0.7, row
    run = subprocess.run([sys.executable, "-m", "detkit", "detect", str(photo), "--cfg", str(cfg), "--weights",
                          str(tiny_weights), "--device", "cpu", "--tta", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "dog" in run.stdout and (tmp_path / "out" / "dog.jpg").exists()


def test_merge_nms_handles_no_candidates_a_flat_box_and_max_det():
    none = postprocess(torch.zeros(2, 5, 6), conf_thresh=0.1, nms_thresh=0.45, merge=True)
    assert [tuple(out.shape) for out in none] == [(0, 6), (0, 6)]
    flat = torch.tensor([[[5.0, 5.0, 0.0, 4.0, 0.9, 1.0]]])  # zero width: IoU with itself is 0/0
    out = postprocess(flat, conf_thresh=0.1, nms_thresh=0.45, merge=True)[0]
    assert torch.isfinite(out).all() and out[0, :4].tolist() == pytest.approx([5.0, 3.0, 5.0, 7.0])
    spread = torch.tensor([[[10.0 * i, 0.0, 5.0, 5.0, 0.9 - 0.01 * i, 1.0] for i in range(10)]])
    assert len(postprocess(spread, conf_thresh=0.1, nms_thresh=0.45, max_det=4, merge=True)[0]) == 4


def test_merging_in_chunks_equals_merging_at_once_and_stays_within_each_image():
    from detkit.boxes import merge_overlapping

    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=generator) * 50
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=generator) * 5], 1)
    score = torch.rand(40, generator=generator)
    group = torch.arange(40) % 2  # two images (or classes), interleaved
    keep = torch.tensor([0, 1, 5, 8, 13, 22, 31])
    whole = merge_overlapping(boxes, score, group, keep, 0.3)
    assert torch.allclose(merge_overlapping(boxes, score, group, keep, 0.3, chunk=2), whole)
    for row, kept in zip(whole, keep, strict=True):  # only its own group's boxes move it
        same = group == group[kept]
        alone = merge_overlapping(boxes[same], score[same], group[same], same[:kept].sum()[None], 0.3)
        assert torch.allclose(row, alone[0])
