"""cfg/ssd300-coco.cfg against torchvision's ssd300_vgg16: parameters, priors, head outputs, loss
and detections, after importing a randomly initialised torchvision model's state dict. Plus the
SSD layers on their own: L2Norm, the VGG pools, BFLOPs, the cfg's errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, randomize_model
from torchvision.models.detection import ssd300_vgg16
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

import detkit
from detkit.bench import layer_table
from detkit.boxes import cxcywh_to_xyxy
from detkit.convert import torchvision_ssd_into
from detkit.errors import CfgError, DataError
from detkit.heads.ssd import ssd_postprocess
from detkit.layers.l2norm import L2Norm
from detkit.model import model_from_cfg, model_from_text
from detkit.weights import expected_floats, load_darknet_weights, save_darknet_weights

COCO_CFG = REPO / "cfg" / "ssd300-coco.cfg"
TORCHVISION_PARAMS = 35_641_826   # ssd300_vgg16(weights=None, weights_backbone=None)
TORCHVISION_PARAMS_21 = 26_285_486  # ... num_classes=21
TARGETS = torch.tensor([[0, 4, 0.5, 0.5, 0.3, 0.4], [0, 10, 0.2, 0.3, 0.1, 0.15],
                        [0, 0, 0.7, 0.6, 0.5, 0.2], [1, 55, 0.4, 0.45, 0.6, 0.7],
                        [1, 55, 0.41, 0.46, 0.05, 0.04], [1, 89, 0.9, 0.1, 0.2, 0.2]])


def random_torchvision_ssd(images: torch.Tensor):
    """torchvision's ssd300_vgg16 with non-trivial weights, and its features of `images`.

    Built on the meta device (VGG16's unused 100M-parameter classifier is never initialised),
    then filled: He-scaled convolutions, biases off zero, L2Norm scales 10..30, box predictors
    rescaled to unit-variance outputs, class predictors to std 3 with the background logit raised
    by 12, so, as in a trained SSD, most priors are background and a few thousand class scores
    pass 0.01 (which also keeps NMS quick on this CPU).
    """
    with torch.device("meta"):
        tv = ssd300_vgg16(weights=None, weights_backbone=None)
    tv.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(7)
    randomize_model(tv, seed=7)
    with torch.no_grad():
        tv.backbone.scale_weight.copy_(torch.rand(512, generator=gen) * 20 + 10)
        features = list(tv.backbone(images).values())
        for predictors, std in ((tv.head.regression_head.module_list, 1.0),
                                (tv.head.classification_head.module_list, 3.0)):
            for conv, feature in zip(predictors, features, strict=True):
                scale = std / conv(feature).std()
                conv.weight.mul_(scale)
                conv.bias.mul_(scale)
        for conv in tv.head.classification_head.module_list:
            conv.bias[::91] += 12.0  # background: logit 0 of each box
    return tv, features


@pytest.fixture(scope="module")
def pair():
    """(torchvision model, detkit model, input, torchvision's results, detkit's raw and eval output).

    One forward pass each: the head's raw output is caught with a hook during model(x).
    """
    x = torch.rand(2, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        transform = ssd300_vgg16(weights=None, weights_backbone=None).transform
    images, _ = transform(list(x))
    tv, features = random_torchvision_ssd(images.tensors)
    model = detkit.load_model(COCO_CFG)
    torchvision_ssd_into(model, tv.state_dict())
    caught = []
    hook = model.layers[-1].register_forward_hook(lambda _m, _i, out: caught.append(out))
    with torch.no_grad():
        head_outputs = tv.head(features)
        anchors = tv.anchor_generator(images, features)
        detections = tv.postprocess_detections(head_outputs, anchors, images.image_sizes)
        preds = model(x)
    hook.remove()
    ref = {"images": images, "head": head_outputs, "anchors": anchors, "detections": detections}
    return tv, model, x, ref, caught[0], preds


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_parameter_counts_equal_torchvisions(pair):
    tv, model, *_ = pair
    assert sum(p.numel() for p in tv.parameters()) == TORCHVISION_PARAMS
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS
    assert layer_table(model).params == TORCHVISION_PARAMS
    voc = model_from_cfg(REPO / "cfg" / "ssd300.cfg")
    assert sum(p.numel() for p in voc.parameters()) == TORCHVISION_PARAMS_21
    with torch.device("meta"):
        tv21 = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)
    assert sum(p.numel() for p in tv21.parameters()) == TORCHVISION_PARAMS_21


def test_input_normalisation_is_torchvisions(pair):
    _, model, x, ref, _, _ = pair
    assert torch.allclose(model.normalise(x), ref["images"].tensors, rtol=0, atol=1e-4)


def test_priors_equal_default_box_generator(pair):
    _, model, _, ref, _, _ = pair
    priors = model.layers[-1].priors((300, 300))
    assert priors.shape == (8732, 4)
    assert (cxcywh_to_xyxy(priors) * 300 - ref["anchors"][0]).abs().max().item() < 300 * 1e-6


def test_head_outputs_equal_torchvisions(pair):
    _, _, _, ref, raw, _ = pair
    assert raw.shape == (2, 8732, 4 + 91)
    assert rel_diff(raw[..., :4], ref["head"]["bbox_regression"]) < 1e-4
    assert rel_diff(raw[..., 4:], ref["head"]["cls_logits"]) < 1e-4


def test_eval_output_is_designs_layout(pair):
    _, model, _, ref, raw, preds = pair
    assert model.num_classes == 90 and preds.shape == (2, 8732, 5 + 90)
    softmax = torch.softmax(ref["head"]["cls_logits"], -1)
    assert torch.allclose(preds[..., 4], 1 - softmax[..., 0], atol=1e-5)
    assert torch.allclose(preds[..., 4:5] * preds[..., 5:], softmax[..., 1:], atol=1e-6)
    assert torch.equal(model.layers[-1].decode(raw, (300, 300)), preds)
    decoded = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(ref["head"]["bbox_regression"][0],
                                                              ref["anchors"][0])
    assert torch.allclose(cxcywh_to_xyxy(preds[0, :, :4]), decoded, atol=1e-3)


def test_detections_equal_torchvisions_postprocess(pair):
    _, model, _, ref, _, preds = pair
    ours = ssd_postprocess(preds, model.input_size)
    assert [len(d) for d in ours] == [len(d["boxes"]) for d in ref["detections"]]
    for mine, theirs in zip(ours, ref["detections"], strict=True):
        assert len(mine) > 0
        assert torch.allclose(mine[:, :4], theirs["boxes"], atol=1e-3)
        assert torch.allclose(mine[:, 4], theirs["scores"], rtol=1e-5, atol=1e-7)
        assert torch.equal(mine[:, 5].long() + 1, theirs["labels"])
    head_default = model.layers[-1].postprocess(preds, model.input_size)
    assert all(torch.equal(a, b) for a, b in zip(head_default, ours, strict=True))


def test_darknet_postprocess_scores_are_class_probabilities(pair):
    _, _, _, ref, _, preds = pair
    kept = detkit.postprocess(preds[:1], conf_thresh=0.05, nms_thresh=0.45)[0]
    assert len(kept) > 0
    softmax = torch.softmax(ref["head"]["cls_logits"][0], -1)[:, 1:]
    assert kept[0, 4].item() == pytest.approx(softmax.max().item(), rel=1e-5)


def torchvision_targets(targets: torch.Tensor, batch: int) -> list[dict]:
    out = []
    for image in range(batch):
        own = targets[targets[:, 0] == image]
        out.append({"boxes": cxcywh_to_xyxy(own[:, 2:6]) * 300, "labels": own[:, 1].long() + 1})
    return out


def test_loss_equals_torchvisions_compute_loss(pair):
    tv, model, _, ref, raw, _ = pair
    tv_targets = torchvision_targets(TARGETS, 2)
    matched = [tv.proposal_matcher(box_iou(t["boxes"], a))
               for t, a in zip(tv_targets, ref["anchors"], strict=True)]
    expected = tv.compute_loss(tv_targets, ref["head"], ref["anchors"], matched)
    total, parts = model.loss([raw], TARGETS, (300, 300))
    assert set(parts) == {"loc", "cls"}
    assert parts["loc"].item() == pytest.approx(expected["bbox_regression"].item(), rel=1e-5)
    assert parts["cls"].item() == pytest.approx(expected["classification"].item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)


def test_target_classes_out_of_range_are_a_data_error(pair):
    _, model, _, _, raw, _ = pair
    with pytest.raises(DataError, match="0..89"):
        model.layers[-1].loss(raw, torch.tensor([[0, 90, 0.5, 0.5, 0.2, 0.2]]), (300, 300))


def test_layer_table_counts_the_predictors_and_dilation_keeps_macs(pair):
    _, model, *_ = pair
    table = layer_table(model)
    # torchvision's published 34.858 "GFLOPs" for ssd300_vgg16 are multiply-adds.
    assert table.bflops == pytest.approx(2 * 34.858, abs=0.002)
    conv6 = table.rows[20]
    assert conv6.bflops == pytest.approx(2 * 1024 * 9 * 512 * 19 * 19 / 1e9)
    head = table.rows[-1]
    assert head.kind == "ssd" and head.output == (1, 8732, 95)
    expected = sum(2 * 9 * c * s * s * a * 95 for c, s, a in
                   [(512, 38, 4), (1024, 19, 6), (512, 10, 6), (256, 5, 6), (256, 3, 4), (256, 1, 4)])
    assert head.bflops == pytest.approx(expected / 1e9)
    assert "8732 priors" in head.text and "ssd" in table.format()


def test_ssd512_shapes():
    model = model_from_cfg(REPO / "cfg" / "ssd512.cfg")
    outs = [out for _, out in model.shapes()]
    head = model.layers[-1]
    assert [outs[i][1] for i in head.sources] == [64, 32, 16, 8, 4, 2, 1]
    assert outs[-1] == (25, 24564, 1)


def test_vgg_pools_equal_torchs():
    model = model_from_cfg(REPO / "cfg" / "ssd300.cfg")
    x = torch.randn(1, 4, 75, 75)
    pool3 = model.layers[9]
    assert torch.equal(pool3(x, []), F.max_pool2d(x, 2, 2, ceil_mode=True))
    y = torch.randn(1, 4, 19, 19)
    assert torch.equal(model.layers[19](y, []), F.max_pool2d(y, 3, 1, 1))
    z = torch.randn(1, 4, 38, 38)
    assert torch.equal(model.layers[15](z, []), F.max_pool2d(z, 2, 2))


TINY = """[net]
width=64
height=64
channels=3
[convolutional]
filters=8
size=3
stride=4
pad=1
activation=relu
[l2norm]
scale=15
[route]
layers=-2
[convolutional]
filters=16
size=3
stride=2
pad=1
dilation=2
activation=relu
[ssd]
layers=1,3
classes=3
aspect_ratios=2;2,3
scales=0.2,0.5,0.9
"""


def test_l2norm_normalises_each_position_to_its_scale():
    model = model_from_text(TINY).eval()
    norm = model.layers[1]
    assert isinstance(norm, L2Norm) and norm.weight.shape == (8,)
    assert torch.all(norm.weight == 15)
    x = torch.randn(2, 8, 5, 5)
    out = norm(x, [])
    assert torch.allclose(out.norm(dim=1), torch.full((2, 5, 5), 15.0), rtol=1e-5)


def test_train_mode_returns_the_heads_raw_output():
    model = model_from_text(TINY).train()
    raw = model(torch.rand(2, 3, 64, 64))
    assert len(raw) == 1 and raw[0].shape == (2, 16 * 16 * 4 + 8 * 8 * 6, 4 + 4)
    total, parts = model(torch.rand(2, 3, 64, 64), torch.tensor([[1, 2, 0.5, 0.5, 0.3, 0.3]]))
    total.backward()
    assert parts["loc"].item() > 0 and model.layers[-1].conf[0].weight.grad is not None


def test_darknet_weights_round_trip(tmp_path):
    model = model_from_text(TINY).eval()
    randomize_model(model, seed=3)
    with torch.no_grad():
        model.layers[1].weight.uniform_(5, 25)
    path = tmp_path / "tiny.weights"
    save_darknet_weights(model, path)
    fresh = model_from_text(TINY).eval()
    report = load_darknet_weights(fresh, path)
    assert report.floats_loaded == sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(fresh(x), model(x))
    assert expected_floats(model_from_cfg(COCO_CFG)) == TORCHVISION_PARAMS


@pytest.mark.parametrize("change,message", [
    (("layers=1,3", "layers=1,5"), "not an earlier layer"),
    (("classes=3", "classes=0"), "at least 1"),
    (("classes=3", "classes=3\nbackground=4"), "'background' must be"),
    (("classes=3", "classes=3\nvariances=0.1"), "'variances' needs two"),
    (("scale=15", "scale=15\neps=0"), "'eps' must be positive"),
])
def test_cfg_errors_name_the_line(change, message):
    with pytest.raises(CfgError, match=message) as err:
        model_from_text(TINY.replace(*change))
    assert "<cfg>:" in str(err.value)
