"""darknet .weights reading and writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_model

import detkit
from detkit.errors import WeightsError
from detkit.model import model_from_cfg, model_from_text
from detkit.weights import expected_floats, load_darknet_weights, save_darknet_weights

SMALL = """[net]
width=32
height=32
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
pad=1
activation=leaky
[convolutional]
filters=6
size=1
activation=linear
[maxpool]
size=2
stride=2
[connected]
output=5
batch_normalize=1
activation=relu
[connected]
output=3
activation=linear
"""


def small(seed: int):
    return randomize_model(model_from_text(SMALL), seed).eval()


def all_tensors(model):
    return [t.clone() for t in list(model.state_dict().values())]


def test_round_trip_restores_every_tensor(tmp_path):
    source, target = small(1), small(2)
    save_darknet_weights(source, tmp_path / "w.weights", seen=1234)
    report = load_darknet_weights(target, tmp_path / "w.weights")
    assert report.header.seen == 1234 and (report.header.major, report.header.minor) == (0, 2)
    assert report.layers_loaded == 5  # darknet numbering: the maxpool counts too
    for a, b in zip(all_tensors(source), all_tensors(target), strict=True):
        assert torch.equal(a, b)


def test_file_layout_is_darknets(tmp_path):
    model = small(3)
    save_darknet_weights(model, tmp_path / "w.weights")
    data = np.fromfile(tmp_path / "w.weights", np.uint8)
    assert np.frombuffer(data[:12].tobytes(), "<i4").tolist() == [0, 2, 0]
    floats = data[20:].view("<f4")
    conv, bn = model.layers[0].conv, model.layers[0].bn
    expected = [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    offset = 0
    for t in expected:
        assert np.array_equal(floats[offset:offset + t.numel()], t.detach().numpy().ravel())
        offset += t.numel()
    fc = model.layers[3]  # connected: biases, weights, then scales, mean, variance
    offset += 6 + 6 * 8  # second conv: biases, weights
    for t in [fc.bn.bias, fc.linear.weight, fc.bn.weight, fc.bn.running_mean, fc.bn.running_var]:
        assert np.array_equal(floats[offset:offset + t.numel()], t.detach().numpy().ravel())
        offset += t.numel()


def write_old_header(path, model, major=0, minor=1, transpose_fc=False):
    header = np.array([major, minor, 0], "<i4").tobytes() + np.array([77], "<u4").tobytes()
    parts = [header]
    for layer in model.layers:
        from detkit.layers.conv import darknet_tensors

        for t in darknet_tensors(layer):
            array = t.detach().numpy()
            if transpose_fc and t.dim() == 2:
                array = array.T
            parts.append(np.ascontiguousarray(array).astype("<f4").tobytes())
    path.write_bytes(b"".join(parts))


def test_version_0_1_has_a_32_bit_seen(tmp_path):
    source, target = small(4), small(5)
    write_old_header(tmp_path / "old.weights", source)
    report = load_darknet_weights(target, tmp_path / "old.weights")
    assert report.header.seen == 77 and not report.header.seen_is_64bit
    assert torch.equal(source.layers[3].linear.weight, target.layers[3].linear.weight)


def test_transpose_flag_transposes_connected_weights(tmp_path):
    source, target = small(6), small(7)
    write_old_header(tmp_path / "t.weights", source, major=1001, minor=0, transpose_fc=True)
    load_darknet_weights(target, tmp_path / "t.weights")
    assert torch.equal(source.layers[3].linear.weight, target.layers[3].linear.weight)
    assert torch.equal(source.layers[0].conv.weight, target.layers[0].conv.weight)


def test_size_mismatch_names_expected_and_actual(tmp_path):
    model = small(8)
    save_darknet_weights(model, tmp_path / "w.weights")
    data = (tmp_path / "w.weights").read_bytes()
    (tmp_path / "short.weights").write_bytes(data[:-40])
    need = expected_floats(model)
    with pytest.raises(WeightsError, match=f"needs {need:,} floats but the file holds {need - 10:,}"):
        load_darknet_weights(model, tmp_path / "short.weights")


def test_partial_and_cutoff_loading(tmp_path):
    source, target = small(9), small(10)
    save_darknet_weights(source, tmp_path / "w.weights")
    data = (tmp_path / "w.weights").read_bytes()
    (tmp_path / "trunc.weights").write_bytes(data[:-40])  # cuts into the last layer (18 floats)
    report = load_darknet_weights(target, tmp_path / "trunc.weights", partial=True)
    assert report.layers_loaded == 4
    assert torch.equal(source.layers[3].linear.weight, target.layers[3].linear.weight)
    assert not torch.equal(source.layers[4].linear.weight, target.layers[4].linear.weight)
    fresh = small(11)
    report = load_darknet_weights(fresh, tmp_path / "w.weights", cutoff=2)
    assert report.layers_loaded == 2
    assert torch.equal(source.layers[1].conv.weight, fresh.layers[1].conv.weight)
    assert not torch.equal(source.layers[3].linear.weight, fresh.layers[3].linear.weight)


def test_bad_weights_files(tmp_path):
    model = small(12)
    (tmp_path / "tiny.weights").write_bytes(b"\x00" * 7)
    with pytest.raises(WeightsError, match="too short"):
        load_darknet_weights(model, tmp_path / "tiny.weights")
    with pytest.raises(WeightsError, match="not found"):
        load_darknet_weights(model, tmp_path / "missing.weights")
    (tmp_path / "odd.weights").write_bytes(np.array([0, 2, 0, 0, 0], "<i4").tobytes() + b"\x00" * 3)
    with pytest.raises(WeightsError, match="whole number of float32"):
        load_darknet_weights(model, tmp_path / "odd.weights")


def test_official_yolov3_tiny_loads_exactly(tiny_weights):
    model = model_from_cfg(detkit_cfg("yolov3-tiny"))
    report = load_darknet_weights(model, tiny_weights)
    assert report.floats_loaded == report.floats_in_file == (35_434_956 - 20) // 4
    assert report.header.seen == 32_013_312 and (report.header.major, report.header.minor) == (0, 2)


def detkit_cfg(name):
    from conftest import REPO

    return REPO / "cfg" / f"{name}.cfg"


def test_official_weights_with_cutoff(tiny_weights):
    model = detkit.load_model(detkit_cfg("yolov3-tiny"), tiny_weights, cutoff=15)
    assert model.layers[14].bn.running_var.abs().sum() > 0


def test_transfer_from_another_class_count_reinitialises_only_the_head_convs(tiny_weights):
    from detkit.weights import load_darknet_weights_transfer

    coco = detkit.load_model(detkit_cfg("yolov3-tiny"), tiny_weights)
    trees = model_from_cfg(detkit_cfg("yolov3-tiny-trees"))
    fresh = {k: v.clone() for k, v in trees.state_dict().items()}
    report = load_darknet_weights_transfer(trees, tiny_weights)
    assert report.source_classes == 80 and report.reinitialised == [15, 22]
    assert report.floats_loaded == report.floats_in_file
    for name, tensor in trees.state_dict().items():
        layer = int(name.split(".")[1])
        if layer in (15, 22):
            assert torch.equal(tensor, fresh[name]), name  # left at its init
        else:
            assert torch.equal(tensor, coco.state_dict()[name]), name


def test_transfer_refuses_a_length_that_fits_no_class_count(tmp_path, tiny_weights):
    from detkit.weights import load_darknet_weights_transfer

    data = tiny_weights.read_bytes()
    (tmp_path / "cut.weights").write_bytes(data[: len(data) - 4 * 1000])
    with pytest.raises(WeightsError, match="fits no other class count"):
        load_darknet_weights_transfer(model_from_cfg(detkit_cfg("yolov3-tiny-trees")), tmp_path / "cut.weights")



def test_fresh_heads_start_at_prior_objectness():
    model = model_from_cfg(detkit_cfg("yolov3-tiny-trees"))
    before = model.layers[22].conv.bias.clone()
    assert model.init_head_biases({15}) == [15]
    bias = model.layers[15].conv.bias.view(3, 6)
    cells = (model.input_size[0] // 32) * (model.input_size[1] // 32)  # the stride-32 head's grid
    assert torch.allclose(torch.sigmoid(bias[:, 4]), torch.full((3,), 8 / cells), rtol=1e-5)
    assert torch.equal(model.layers[22].conv.bias, before)  # loaded layers are left alone
    region = model_from_cfg(detkit_cfg("yolov2-tiny-voc"))
    last = len(region.layers) - 2
    assert region.init_head_biases({last}) == [last]
    objectness = torch.sigmoid(region.layers[last].conv.bias.view(5, 25)[:, 4])
    assert torch.allclose(objectness, torch.full((5,), 8 / (13 * 13)), rtol=1e-5)


def test_transfer_refuses_a_file_whose_length_only_happens_to_fit(tmp_path, tiny_weights):
    """39 classes' worth of floats cut from the front: the length fits a 41-class file, the
    content is shifted, and the batch-norm variances give it away."""
    from detkit.weights import _floats_per_class, load_darknet_weights_transfer

    trees = model_from_cfg(detkit_cfg("yolov3-tiny-trees"))
    data = tiny_weights.read_bytes()
    cut = 4 * 39 * _floats_per_class(trees)
    (tmp_path / "shifted.weights").write_bytes(data[:20] + data[20 + cut:])
    with pytest.raises(WeightsError, match="batch-norm variances"):
        load_darknet_weights_transfer(trees, tmp_path / "shifted.weights")
