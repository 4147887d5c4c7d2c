"""[yolo] loss: gradient parity with libdarknet's l.delta, and the loss plumbing.

Darknet keeps l.delta = -dL/dz (z = the yolo layer's input logits), summed over the batch. Each
[yolo] section of a real cfg is run by darknet as a one-layer network whose input *is* the head
input, so both sides see the same random logits: [net] width/height = the layer's grid,
channels = its filters, and the anchors scaled by grid/network size (exact: the strides are powers
of two), which leaves every ratio darknet computes (anchor/net.w, truth.w*net.w/anchor) unchanged.
One more test feeds darknet's own head inputs from the full yolov3-tiny network into detkit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import DARKNET_CFG
from darknet_ref import DarknetNet

from detkit.cfg import Section, parse_cfg, parse_cfg_text, write_cfg
from detkit.errors import CfgWarning, DataError
from detkit.model import model_from_cfg, model_from_text

TOL = 1e-5
WORST: dict[str, float] = {}


# ---------------------------------------------------------------------------- helpers


def head_sections(cfg: str, kind: str = "yolo") -> list[Section]:
    return [s for s in parse_cfg(DARKNET_CFG / f"{cfg}.cfg") if s.kind == kind]


def one_layer_cfg(section: Section, grid: tuple[int, int], channels: int,
                  anchor_scale: tuple[float, float] = (1.0, 1.0), **overrides) -> str:
    """[net] + one head section whose input is the network input (grid = (h, w))."""
    head = Section(kind=section.kind, line=section.line, options=dict(section.options))
    for key, value in overrides.items():
        head.options[key] = (str(value), 0)
    if anchor_scale != (1.0, 1.0):
        values = [float(v) for v in head.options["anchors"][0].split(",") if v.strip()]
        scaled = [v * anchor_scale[i % 2] for i, v in enumerate(values)]
        head.options["anchors"] = (",".join(repr(v) for v in scaled), 0)
    net = f"[net]\nbatch=1\nsubdivisions=1\nwidth={grid[1]}\nheight={grid[0]}\nchannels={channels}\n\n"
    return net + write_cfg([head])


def detkit_head(section: Section, channels: int, **overrides):
    """detkit's head built from the same section (original anchors), fed `channels` logits."""
    text = one_layer_cfg(section, (8, 8), channels, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # darknet-only keys such as jitter are not the point here
        model = model_from_text(text)
    return model.layers[0]


def random_logits(rng: np.random.Generator, batch: int, anchors: int, classes: int, h: int,
                  w: int) -> np.ndarray:
    """Head logits with the spread of a half-trained net: boxes near the anchors, objectness and
    classes spanning well into both tails."""
    z = rng.normal(0.0, 1.0, (batch, anchors, 5 + classes, h, w))
    z[:, :, 2:4] *= 0.7
    z[:, :, 4] = rng.normal(-1.0, 2.5, (batch, anchors, h, w))
    z[:, :, 5:] *= 2.0
    return z.reshape(batch, -1, h, w).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def boxes_like_predictions(rng, z: np.ndarray, anchors_rel: np.ndarray, image: int, count: int,
                           classes: int) -> list[list[float]]:
    """Truths cut from decoded predictions (slightly jittered): they overlap some predictions by
    more than ignore_thresh, so the ignore rule is exercised, not just the noobj default."""
    b, _, h, w = z.shape
    a = anchors_rel.shape[0]
    p = z.reshape(b, a, -1, h, w)
    out = []
    for _ in range(count):
        n, j, i = rng.integers(a), rng.integers(h), rng.integers(w)
        cx = (i + sigmoid(p[image, n, 0, j, i])) / w
        cy = (j + sigmoid(p[image, n, 1, j, i])) / h
        bw = np.exp(p[image, n, 2, j, i]) * anchors_rel[n, 0]
        bh = np.exp(p[image, n, 3, j, i]) * anchors_rel[n, 1]
        jit = rng.uniform(0.97, 1.03, 4)
        box = [cx * jit[0], cy * jit[1], min(bw * jit[2], 0.999), min(bh * jit[3], 0.999)]
        box = [float(np.clip(v, 0.003, 0.997)) for v in box[:2]] + box[2:]
        out.append(box + [int(rng.integers(classes))])
    return out


def hand_truths(rng, classes: int) -> list[list[list[float]]]:
    """Per image x, y, w, h, class (normalised): collisions, tiny and huge boxes, an empty image."""
    collide = [[0.41, 0.37, 0.20, 0.25, 1], [0.415, 0.372, 0.21, 0.24, 2],   # same cell, anchor
               [0.417, 0.371, 0.05, 0.07, 3], [0.412, 0.375, 0.6, 0.5, 4],    # same cell, others
               [0.411, 0.371, 0.2, 0.26, 1], [0.413, 0.377, 0.19, 0.25, 7]]   # 3rd, 4th in slot
    extreme = [[0.5003, 0.4998, 0.002, 0.003, 5], [0.5, 0.5, 0.99, 0.98, 6],
               [0.9993, 0.0012, 0.004, 0.0021, 0], [0.02, 0.97, 0.9, 0.05, classes - 1],
               [0.7, 0.2, 0.04, 0.8, 3]]
    scattered = [list(rng.uniform(0.01, 0.99, 2)) + list(rng.uniform(0.01, 0.7, 2))
                 + [int(rng.integers(classes))] for _ in range(12)]
    return [collide + extreme[:2], extreme[2:] + scattered, []]


def to_targets(per_image: list[list[list[float]]]) -> torch.Tensor:
    rows = [[b, t[4], t[0], t[1], t[2], t[3]] for b, ts in enumerate(per_image) for t in ts]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def pack(per_image: list[list[list[float]]]) -> np.ndarray:
    n = max(1, max(len(t) for t in per_image))
    out = np.zeros((len(per_image), n, 5), np.float32)
    for b, ts in enumerate(per_image):
        for k, t in enumerate(ts):
            out[b, k] = t
    return out


def darknet_delta(cfg_text: str, tmp_path, z: np.ndarray, truths, seen: int = 0) -> np.ndarray:
    path = tmp_path / f"head{abs(hash(cfg_text))}.cfg"
    path.write_text(cfg_text)
    with DarknetNet(path, batch=z.shape[0]) as dn:
        deltas = dn.train_deltas(z, dn.pack_truth(pack(truths)), seen=seen, layers_train=False)
        return deltas[0], dn.output(0)


def detkit_grad(head, z: np.ndarray, truths, net_hw, seen: int = 0):
    raw = torch.from_numpy(z).requires_grad_(True)
    parts = head.loss(raw, to_targets(truths), net_hw, seen)
    total = sum(parts.values())
    (grad,) = torch.autograd.grad(total, raw)
    return grad.numpy(), parts


def yolo_case(cfg: str, layer: int, section: Section, rng, tmp_path, net: int = 416,
              batch_truths=None, **overrides) -> float:
    """Worst |(-grad) - delta| for one [yolo] section of `cfg` on random logits."""
    head = detkit_head(section, _filters(section), **overrides)
    stride = {0: 32, 1: 16, 2: 8}[layer]
    grid = net // stride
    z = random_logits(rng, 3, head.num_anchors, head.classes, grid, grid)
    anchors_rel = head.anchors.numpy() / net
    truths = batch_truths if batch_truths is not None else hand_truths(rng, head.classes)
    truths = [list(t) for t in truths]
    truths[0] = truths[0] + boxes_like_predictions(rng, z, anchors_rel, 0, 6, head.classes)
    truths[1] = truths[1] + boxes_like_predictions(rng, z, anchors_rel, 1, 4, head.classes)
    text = one_layer_cfg(section, (grid, grid), z.shape[1], (1 / stride, 1 / stride), **overrides)
    delta, _ = darknet_delta(text, tmp_path, z, truths)
    grad, parts = detkit_grad(head, z, truths, (net, net))
    assert np.isfinite(grad).all()
    assert set(parts) == {"xy", "wh", "obj", "noobj", "cls"}
    return float(np.abs(-grad - delta).max())


def _filters(section: Section) -> int:
    mask = [m for m in section.options["mask"][0].split(",") if m.strip()]
    return len(mask) * (int(section.options["classes"][0]) + 5)


# ---------------------------------------------------------------------------- parity


@pytest.mark.reference
@pytest.mark.parametrize("cfg", ["yolov3", "yolov3-tiny"])
def test_gradient_matches_darknet_delta(cfg, tmp_path):
    rng = np.random.default_rng(7)
    worst = 0.0
    for layer, section in enumerate(head_sections(cfg)):
        diff = yolo_case(cfg, layer, section, rng, tmp_path)
        WORST[f"{cfg} layer {layer}"] = diff
        worst = max(worst, diff)
    assert worst <= TOL, WORST


@pytest.mark.reference
def test_gradient_matches_with_truth_thresh_and_max(tmp_path):
    """truth_thresh < 1 (darknet's second positive branch), a low ignore_thresh and max=9 boxes."""
    rng = np.random.default_rng(11)
    section = head_sections("yolov3-tiny")[1]
    diff = yolo_case("yolov3-tiny", 1, section, rng, tmp_path, truth_thresh=0.8,
                     ignore_thresh=0.4, max=9)
    WORST["yolov3-tiny truth_thresh=.8 max=9"] = diff
    assert diff <= TOL


@pytest.mark.reference
def test_full_network_head_inputs(tmp_path):
    """darknet's own yolov3-tiny (160x160, its random init, BN on batch statistics): its head
    inputs fed to detkit's heads give gradients equal to darknet's deltas."""
    rng = np.random.default_rng(3)
    model = model_from_cfg(DARKNET_CFG / "yolov3-tiny.cfg")
    x = rng.uniform(0, 1, (2, 3, 160, 160)).astype(np.float32)
    truths = [[[0.3, 0.4, 0.1, 0.2, 3], [0.31, 0.41, 0.12, 0.19, 4], [0.6, 0.6, 0.8, 0.7, 1]],
              [[0.5, 0.5, 0.05, 0.03, 0]]]
    with DarknetNet(DARKNET_CFG / "yolov3-tiny.cfg", batch=2, size=(160, 160)) as dn:
        deltas = dn.train_deltas(x, dn.pack_truth(pack(truths)), layers_train=True)
        worst = 0.0
        for head in model.heads:
            raw = dn.output(head.index - 1)
            grad, _ = detkit_grad(head, raw, truths, (160, 160))
            worst = max(worst, float(np.abs(-grad - deltas[head.index]).max()))
    WORST["yolov3-tiny full net 160"] = worst
    assert worst <= TOL


# ---------------------------------------------------------------------------- plumbing


def tiny_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model_from_cfg(DARKNET_CFG / "yolov3-tiny.cfg")


def test_model_train_forward_returns_total_and_parts():
    model = tiny_model().train()
    x = torch.rand(2, 3, 96, 96)
    targets = torch.tensor([[0, 3, 0.5, 0.5, 0.3, 0.4], [1, 7, 0.2, 0.7, 0.05, 0.1]])
    total, parts = model(x, targets)
    assert set(parts) == {"xy", "wh", "obj", "noobj", "cls"}
    assert torch.allclose(total, sum(parts.values()))
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_no_targets_is_only_noobj():
    head = tiny_model().heads[0]
    raw = torch.randn(2, 255, 4, 4, generator=torch.Generator().manual_seed(0))
    parts = head.loss(raw, torch.zeros((0, 6)), (128, 128))
    assert parts["noobj"] > 0
    assert all(float(parts[k]) == 0 for k in ("xy", "wh", "obj", "cls"))


@pytest.mark.parametrize("row", [[2, 0, 0.5, 0.5, 0.1, 0.1], [0, 80, 0.5, 0.5, 0.1, 0.1],
                                 [0, 1, float("nan"), 0.5, 0.1, 0.1]])
def test_bad_targets_raise_data_error(row):
    head = tiny_model().heads[0]
    with pytest.raises(DataError, match=r"\[yolo\] layer 16: target row 0"):
        head.loss(torch.randn(2, 255, 4, 4), torch.tensor([row]), (128, 128))


def test_zero_size_boxes_are_skipped():
    head = tiny_model().heads[0]
    raw = torch.randn(1, 255, 4, 4, generator=torch.Generator().manual_seed(0))
    empty = head.loss(raw, torch.zeros((0, 6)), (128, 128))
    zero = head.loss(raw, torch.tensor([[0, 1, 0.5, 0.5, 0.0, 0.2]]), (128, 128))
    assert all(torch.allclose(empty[k], zero[k], rtol=1e-6) for k in empty)


def test_half_precision_input_gives_float32_loss():
    head = tiny_model().heads[0]
    raw = torch.randn(1, 255, 4, 4).half()
    parts = head.loss(raw, torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.2]]), (128, 128))
    assert all(v.dtype == torch.float32 for v in parts.values())


def test_unread_alexeyab_keys_warn():
    text = ("[net]\nwidth=8\nheight=8\nchannels=255\n\n[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\n"
            "classes=80\nnum=3\nmax_delta=5\nbeta_nms=0.6\n")
    with pytest.warns(CfgWarning) as record:
        model_from_text(text)
    messages = " ".join(str(w.message) for w in record)
    assert "unused field 'max_delta = 5'" in messages and "beta_nms" in messages
    assert parse_cfg_text(text)  # the text itself is valid cfg


def teardown_module(module):
    if WORST:
        print("\nworst |(-grad) - darknet delta|:", {k: f"{v:.2e}" for k, v in WORST.items()})


def test_chunked_pairs_give_the_same_loss(monkeypatch):
    """Dense labels are evaluated in chunks of truths; the result must not depend on it."""
    import detkit.heads.yolo_loss as yl

    head = build_head_tt()
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(2, 255, 6, 6, generator=g)
    targets = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(),
                         torch.randint(0, 80, (40, 1), generator=g).float(),
                         torch.rand(40, 2, generator=g) * 0.8 + 0.1,
                         torch.rand(40, 2, generator=g) * 0.3 + 0.05], 1)
    whole = head.loss(raw, targets, (192, 192))
    monkeypatch.setattr(yl, "PAIR_BUDGET", 3 * 6 * 6 * 7)  # 7 truths a chunk
    chunked = head.loss(raw, targets, (192, 192))
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def build_head_tt():
    """yolov3-tiny's 13x13 [yolo] with truth_thresh < 1, so both reductions are chunked."""
    return detkit_head(head_sections("yolov3-tiny")[0], 255, truth_thresh=0.6, ignore_thresh=0.3)
