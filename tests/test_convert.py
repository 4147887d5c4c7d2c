"""detkit.convert and `detkit convert torchvision-ssd`: a torchvision SSD state dict -> .weights.

The full ssd300_vgg16 import is proven in test_ssd.py (same outputs, loss and detections); here a
tiny SSD keeps the file round trip and the CLI quick: its state dict is written with torchvision's
key layout, converted, loaded back, and must reproduce the model it came from.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from conftest import randomize_model

from detkit import cli
from detkit.convert import load_state_dict, torchvision_ssd_into
from detkit.errors import DetkitError, WeightsError
from detkit.layers.conv import Convolutional
from detkit.model import model_from_text
from detkit.weights import load_darknet_weights

TINY = """[net]
width=64
height=64
channels=3
channel_order=rgb
input_scale=255
mean=123,117,104
[convolutional]
filters=8
size=3
stride=4
pad=1
activation=relu
[l2norm]
[route]
layers=-2
[convolutional]
filters=16
size=3
stride=2
pad=1
activation=relu
[ssd]
layers=1,3
classes=3
aspect_ratios=2;2,3
scales=0.2,0.5,0.9
"""


def random_tiny(text: str = TINY):
    model = model_from_text(text).eval()
    randomize_model(model, seed=11)
    with torch.no_grad():
        model.layers[1].weight.uniform_(10, 30)
    return model


def torchvision_layout(model) -> OrderedDict:
    """The model's tensors under torchvision SSD key names, in torchvision's order."""
    state = OrderedDict([("backbone.scale_weight", model.layers[1].weight.detach().clone())])
    convs = [layer for layer in model.layers if isinstance(layer, Convolutional)]
    for i, layer in enumerate(convs):
        prefix = "backbone.features.0" if i == 0 else f"backbone.extra.{i - 1}.0"
        state[f"{prefix}.weight"] = layer.conv.weight.detach().clone()
        state[f"{prefix}.bias"] = layer.conv.bias.detach().clone()
    head = model.layers[-1]
    for kind, convs_ in (("classification", head.conf), ("regression", head.loc)):
        for i, conv in enumerate(convs_):
            state[f"head.{kind}_head.module_list.{i}.weight"] = conv.weight.detach().clone()
            state[f"head.{kind}_head.module_list.{i}.bias"] = conv.bias.detach().clone()
    return state


def test_cli_converts_a_state_dict_to_weights(tmp_path):
    source = random_tiny()
    (tmp_path / "tiny.cfg").write_text(TINY)
    torch.save({"model": torchvision_layout(source), "epoch": 3}, tmp_path / "ckpt.pth")
    out = tmp_path / "tiny.weights"
    run = subprocess.run([sys.executable, "-m", "detkit", "convert", "torchvision-ssd",
                          str(tmp_path / "ckpt.pth"), "--cfg", str(tmp_path / "tiny.cfg"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "2 convolutions, 1 l2norm, 2 head sources" in run.stdout
    fresh = model_from_text(TINY).eval()
    load_darknet_weights(fresh, out)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), source(x))


def test_background_column_moves_to_the_cfgs_index():
    source = random_tiny()
    moved = model_from_text(TINY.replace("classes=3", "classes=3\nbackground=2")).eval()
    torchvision_ssd_into(moved, torchvision_layout(source))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(moved(x), source(x), atol=1e-6)


def test_mismatched_network_names_layer_and_key():
    state = torchvision_layout(random_tiny())
    other = model_from_text(TINY.replace("classes=3", "classes=4"))
    with pytest.raises(WeightsError, match=r"layer 4 \[ssd\] source 0 .*head\.classification_head"):
        torchvision_ssd_into(other, state)
    fewer = OrderedDict((k, v) for k, v in state.items() if not k.startswith("backbone.extra"))
    with pytest.raises(WeightsError, match="1 convolutions, the cfg 2"):
        torchvision_ssd_into(model_from_text(TINY), fewer)


def test_bad_files_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match="not a loadable PyTorch state dict"):
        load_state_dict(junk)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
    with pytest.raises(DetkitError, match="unknown kind 'caffe-ssd'"):
        cli.convert("caffe-ssd", junk, cfg=junk, out=tmp_path / "x.weights")
