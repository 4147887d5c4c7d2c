"""Darknet's learning-rate policies and decay groups."""

from __future__ import annotations

import pytest
from conftest import DARKNET_CFG

from detkit.cfg import parse_cfg, parse_cfg_text
from detkit.engine.schedule import Schedule, parameter_groups
from detkit.model import model_from_cfg


def test_yolov3_steps_with_burn_in():
    schedule = Schedule.from_net(parse_cfg(DARKNET_CFG / "yolov3.cfg")[0])
    assert (schedule.burn_in, schedule.steps, schedule.scales) == (1000, [400000, 450000], [0.1, 0.1])
    assert schedule.rate(500) == pytest.approx(0.001 * 0.5 ** 4)
    assert schedule.rate(1000) == pytest.approx(0.001)
    assert schedule.rate(399999) == pytest.approx(0.001)
    assert schedule.rate(400000) == pytest.approx(0.0001)
    assert schedule.rate(450000) == pytest.approx(0.00001)


@pytest.mark.parametrize("text,iteration,expected", [
    ("policy=step\nstep=10\nscale=0.5", 25, 0.25),
    ("policy=exp\ngamma=0.9", 2, 0.81),
    ("policy=poly\npower=2\nmax_batches=100", 50, 0.25),
    ("policy=constant", 10**6, 1.0),
])
def test_other_policies(text, iteration, expected):
    net = parse_cfg_text(f"[net]\nlearning_rate=1\n{text}\n")[0]
    assert Schedule.from_net(net).rate(iteration) == pytest.approx(expected)


def test_decay_only_on_weights():
    model = model_from_cfg(DARKNET_CFG / "yolov3-tiny.cfg")
    decayed, plain = parameter_groups(model, 0.0005)
    assert decayed["weight_decay"] == 0.0005 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 4 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) == 13
