"""Layer semantics that darknet defines: maxpool padding, reorg order, route groups, shortcut."""

from __future__ import annotations

import pytest
import torch
from conftest import DARKNET_CFG

from detkit.model import model_from_cfg, model_from_text

NET = "[net]\nwidth={w}\nheight={h}\nchannels={c}\n"


def net(body: str, w: int = 16, h: int = 16, c: int = 4):
    return model_from_text(NET.format(w=w, h=h, c=c) + body).eval()


@pytest.mark.parametrize("size,stride,inp,out", [(2, 2, 416, 208), (2, 1, 13, 13), (5, 1, 13, 13),
                                                 (9, 1, 13, 13), (13, 1, 19, 19), (3, 2, 75, 38)])
def test_maxpool_darknet_padding_sizes(size, stride, inp, out):
    model = net(f"[maxpool]\nsize={size}\nstride={stride}\n", w=inp, h=inp, c=1)
    assert model.shapes()[0][1] == (1, out, out)
    y = model.layer_outputs(torch.rand(1, 1, inp, inp))[0]
    assert y.shape == (1, 1, out, out)


def test_maxpool_pads_with_minus_infinity():
    model = net("[maxpool]\nsize=2\nstride=1\n", w=2, h=2, c=1)
    x = -torch.arange(1.0, 5.0).view(1, 1, 2, 2)  # all negative: zero padding would leak 0
    y = model.layer_outputs(x)[0]
    assert torch.equal(y, torch.tensor([[[[-1.0, -2.0], [-3.0, -4.0]]]]))


def reorg_pj(x, s):
    """The formula in darknet-semantics.md, checked there against libdarknet bit for bit."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (s * s), h, s, w, s).permute(0, 3, 5, 1, 2, 4).reshape(b, c * s * s, h // s, w // s)


def reorg_loop(x, s):
    """A direct transcription of pjreddie's reorg_cpu(x, w, h, c, batch, stride, forward=0)."""
    b, c, h, w = x.shape
    flat_in = x.reshape(-1)
    out = torch.empty_like(flat_in)
    out_c = c // (s * s)
    for bi in range(b):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * bi))
                    c2 = k % out_c
                    offset = k // out_c
                    w2 = i * s + offset % s
                    h2 = j * s + offset // s
                    out_index = w2 + w * s * (h2 + h * s * (c2 + out_c * bi))
                    out[in_index] = flat_in[out_index]
    return out.reshape(b, c * s * s, h // s, w // s)


def test_reorg_is_pjreddie_order_not_space_to_depth():
    x = torch.arange(2 * 8 * 4 * 4, dtype=torch.float32).view(2, 8, 4, 4)
    y = net("[reorg]\nstride=2\n", w=4, h=4, c=8).layer_outputs(x)[0]
    assert torch.equal(y, reorg_loop(x, 2))
    assert torch.equal(y, reorg_pj(x, 2))
    assert not torch.equal(y, torch.nn.functional.pixel_unshuffle(x, 2))


def test_route_groups_take_channel_slices():
    model = net("[convolutional]\nfilters=8\nactivation=linear\n[route]\nlayers=-1\ngroups=2\ngroup_id=1\n"
                "[route]\nlayers=-1,0\n")
    outs = model.layer_outputs(torch.rand(1, 4, 16, 16))
    assert torch.equal(outs[1], outs[0][:, 4:])
    assert torch.equal(outs[2], torch.cat([outs[1], outs[0]], 1))
    assert model.shapes()[2][1] == (12, 16, 16)


def test_shortcut_adds_with_alpha_beta_and_activation():
    model = net("[convolutional]\nfilters=4\nactivation=linear\n[convolutional]\nfilters=4\n"
                "activation=linear\n[shortcut]\nfrom=-2\nactivation=leaky\nalpha=0.5\nbeta=2\n")
    outs = model.layer_outputs(torch.randn(1, 4, 16, 16))
    expected = torch.nn.functional.leaky_relu(0.5 * outs[1] + 2 * outs[0], 0.1)
    assert torch.allclose(outs[2], expected)


def test_upsample_nearest():
    y = net("[upsample]\nstride=2\n", w=2, h=2, c=1).layer_outputs(torch.tensor([[[[1.0, 2], [3, 4]]]]))[0]
    assert torch.equal(y[0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))


@pytest.mark.parametrize("name,x,expected", [
    ("leaky", -2.0, -0.2), ("relie", -2.0, -0.02), ("ramp", -1.0, -0.1), ("ramp", 2.0, 2.2),
    ("loggy", 0.0, 0.0), ("hardtan", 3.0, 1.0), ("lhtan", 2.0, 1.001), ("plse", 8.0, 1.04),
    ("stair", 3.5, 1.5), ("elu", -1.0, -0.6321206), ("relu6", 9.0, 6.0), ("swish", 1.0, 0.7310586),
])
def test_activations_match_darknet_definitions(name, x, expected):
    from detkit.layers.activations import ACTIVATIONS

    assert ACTIVATIONS[name](torch.tensor([x])).item() == pytest.approx(expected, abs=1e-6)


def test_only_routed_outputs_are_kept_until_their_last_reader():
    model = model_from_cfg(DARKNET_CFG / "yolov3-tiny.cfg")
    assert model._keep == {8, 13, 19}
    assert {k: sorted(v) for k, v in model._release.items()} == {17: [13], 20: [8, 19]}


def test_dilated_conv_keeps_size_with_pad():
    model = net("[convolutional]\nfilters=4\nsize=3\npad=1\ndilation=6\nactivation=relu\n", w=19, h=19)
    assert model.shapes()[0][1] == (4, 19, 19)
    assert model.layer_outputs(torch.rand(1, 4, 19, 19))[0].shape == (1, 4, 19, 19)
