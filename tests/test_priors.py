"""SSD prior boxes: the paper's SSD300/SSD512 (VOC) and torchvision's ssd300_vgg16 configurations.

torchvision's DefaultBoxGenerator is the reference; the VOC cfgs give Caffe SSD's pixel sizes
(ssd_pascal.py), which are the generator's scales times the input size.
"""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from detkit.errors import CfgError
from detkit.heads.priors import generate_priors
from detkit.heads.ssd import SSDHead
from detkit.model import model_from_cfg, model_from_text

VOC_RATIOS_300 = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
VOC_RATIOS_512 = [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]]


def head_and_grids(model) -> tuple[SSDHead, tuple[tuple[int, int], ...]]:
    """The [ssd] head and its source feature-map sizes at the cfg size (no forward pass)."""
    head = model.layers[-1]
    outs = [out for _, out in model.shapes()]
    return head, tuple((outs[i][1], outs[i][2]) for i in head.sources)


def reference(ratios, scales, steps, clip, grids, size) -> torch.Tensor:
    generator = DefaultBoxGenerator(ratios, scales=scales, steps=steps, clip=clip)
    return generator._grid_default_boxes([list(g) for g in grids], [size, size])


@pytest.mark.parametrize("name,size,count,grids,ratios,scales,steps", [
    ("ssd300", 300, 8732, [38, 19, 10, 5, 3, 1], VOC_RATIOS_300,
     [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05], [8, 16, 32, 64, 100, 300]),
    ("ssd512", 512, 24564, [64, 32, 16, 8, 4, 2, 1], VOC_RATIOS_512,
     [0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06], [8, 16, 32, 64, 128, 256, 512]),
])
def test_voc_priors_are_the_papers(name, size, count, grids, ratios, scales, steps):
    model = model_from_cfg(REPO / "cfg" / f"{name}.cfg")
    head, found = head_and_grids(model)
    assert found == tuple((g, g) for g in grids)
    priors = generate_priors(head.spec, found, (size, size))
    assert priors.shape == (count, 4)
    expected = reference(ratios, scales, steps, False, found, size)
    assert (priors - expected).abs().max().item() < 1e-6
    # First box of the 38x38 (64x64) map: centre half a step in, min_size square (Caffe).
    assert priors[0].tolist() == pytest.approx([4 / size, 4 / size, scales[0], scales[0]], abs=1e-7)
    assert model.shapes()[-1][1] == (25, count, 1)


def test_coco_priors_are_torchvisions_ssd300_vgg16():
    model = model_from_cfg(REPO / "cfg" / "ssd300-coco.cfg")
    head, grids = head_and_grids(model)
    priors = generate_priors(head.spec, grids, (300, 300))
    expected = reference(VOC_RATIOS_300, [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                         [8, 16, 32, 64, 100, 300], True, grids, 300)
    assert priors.shape == (8732, 4)
    assert torch.equal(priors, expected)


NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"
TRUNK = ("[convolutional]\nfilters=8\nsize=3\nstride=4\npad=1\nactivation=relu\n"
         "[convolutional]\nfilters=8\nsize=3\nstride=2\npad=1\nactivation=relu\n")


def tiny(head_keys: str, net: str = NET):
    return model_from_text(net + TRUNK + "[ssd]\nlayers=0,1\nclasses=3\n" + head_keys)


def test_ratio_formula_without_steps_follows_the_grid():
    model = tiny("min_ratio=0.2\nmax_ratio=0.9\naspect_ratios=2\n")
    head, grids = head_and_grids(model)
    priors = generate_priors(head.spec, grids, (64, 64))
    generator = DefaultBoxGenerator([[2], [2]], min_ratio=0.2, max_ratio=0.9)
    expected = generator._grid_default_boxes([list(g) for g in grids], [64, 64])
    assert torch.equal(priors, expected)


def test_pixel_sizes_on_a_non_square_input_stay_square_in_pixels():
    net = "[net]\nwidth=128\nheight=64\nchannels=3\n"
    model = tiny("min_sizes=16,32\nmax_sizes=32,64\naspect_ratios=2\nclip=0\n", net)
    head, grids = head_and_grids(model)
    priors = generate_priors(head.spec, grids, (64, 128))
    assert priors[0, 2].item() * 128 == pytest.approx(16) and priors[0, 3].item() * 64 == pytest.approx(16)


@pytest.mark.parametrize("keys,message", [
    ("aspect_ratios=2;2;3\n", "3 groups for 2 source layers"),
    ("scales=0.1,0.2\n", "'scales' needs 3 values"),
    ("scales=0.1,0.2,0.3\nmin_sizes=1,2\nmax_sizes=2,3\n", "give only one of"),
    ("min_sizes=10\nmax_sizes=20\n", "need 2 values each"),
    ("steps=8\n", "'steps' needs 2 positive values"),
    ("aspect_ratios=2,x\n", "not ';'-separated lists"),
])
def test_prior_key_errors_name_the_line(keys, message):
    with pytest.raises(CfgError, match=message) as err:
        tiny(keys)
    assert "<cfg>:" in str(err.value)
