"""Shared fixtures: repository paths, the reference darknet, random non-trivial weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DARKNET_CFG = Path("/usr/share/darknet/cfg")
DARKNET_DATA = Path("/usr/share/darknet/data")
TINY_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
REQUIRE_REFERENCE = os.environ.get("DETKIT_REQUIRE_REFERENCE") == "1"

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collection_modifyitems(config, items):
    """Skip `reference` tests without darknet, unless CI requires them (then they fail)."""
    from darknet_ref import darknet_available

    have_darknet = darknet_available()
    have_cuda = torch.cuda.is_available()
    for item in items:
        if "reference" in item.keywords and not have_darknet and not REQUIRE_REFERENCE:
            item.add_marker(pytest.mark.skip(reason="reference darknet not installed"))
        if "gpu" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="CUDA not available"))


@pytest.fixture
def one_torch_thread():
    """These tests check results, not speed: one intra-op thread keeps them quick on a shared CPU
    (with torch imported before detkit, OpenMP threads spin and stall under contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_weights() -> Path:
    """The official pjreddie yolov3-tiny.weights fetched by `make assets`."""
    if not TINY_WEIGHTS.exists():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{TINY_WEIGHTS} missing: run `make assets`")
        pytest.skip("official yolov3-tiny.weights not fetched (make assets)")
    return TINY_WEIGHTS


def randomize_model(model: torch.nn.Module, seed: int = 0,
                    calibrate: torch.Tensor | None = None) -> torch.nn.Module:
    """Fill every parameter and BN statistic with non-trivial values.

    Conv/linear weights: He-scaled normals; BN scale U(0.5, 1.5), bias U(-0.5, 0.5), mean
    U(-0.3, 0.3), variance U(0.5, 2); plain biases U(-0.5, 0.5). With `calibrate` (an input
    batch) the BN statistics are first set to that batch's, then scaled by U(0.7, 1.3) and shifted,
    so a deep net keeps activations of order 1 as a trained one does, with statistics still away
    from their defaults.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    uniform(module.bias, -0.5, 0.5)
            elif isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                uniform(module.weight, 0.5, 1.5)
                uniform(module.bias, -0.5, 0.5)
                uniform(module.running_mean, -0.3, 0.3)
                uniform(module.running_var, 0.5, 2.0)
    if calibrate is not None:
        _calibrate_batchnorm(model, calibrate, gen)
    return model


def _calibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> None:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
        for m in norms:
            m.momentum = 0.01
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.6 + 0.7)
            m.running_mean.add_((torch.rand(m.running_mean.shape, generator=gen) - 0.5) * 0.2
                                * m.running_var.sqrt())
    model.eval()
