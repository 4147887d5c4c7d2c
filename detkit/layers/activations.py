"""Darknet activations (activations.c), by the names cfg files use."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _leaky(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.1)


def _relie(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, 0.01 * x)


def _ramp(x: Tensor) -> Tensor:
    return x * (x > 0) + 0.1 * x


def _plse(x: Tensor) -> Tensor:
    return torch.where(x < -4, 0.01 * (x + 4), torch.where(x > 4, 0.01 * (x - 4) + 1, 0.125 * x + 0.5))


def _lhtan(x: Tensor) -> Tensor:
    return torch.where(x < 0, 0.001 * x, torch.where(x > 1, 0.001 * (x - 1) + 1, x))


def _stair(x: Tensor) -> Tensor:
    n = torch.floor(x)
    half = torch.floor(x / 2.0)
    return torch.where(torch.remainder(n, 2) == 0, half, (x - n) + half)


def _elu(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x, torch.exp(x) - 1)


def _selu(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0507 * x, 1.0507 * 1.6732 * (torch.exp(x) - 1))


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(0.797885 * x + 0.035677 * x * x * x))


def _hard_mish(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))


def _mish(x: Tensor) -> Tensor:
    # AlexeyAB's softplus uses a threshold of 20, as torch's does.
    return x * torch.tanh(F.softplus(x, threshold=20))


ACTIVATIONS = {
    "linear": lambda x: x,
    "logistic": torch.sigmoid,
    "loggy": lambda x: 2 * torch.sigmoid(x) - 1,
    "relu": F.relu,
    "relu6": lambda x: torch.clamp(x, 0, 6),
    "elu": _elu,
    "selu": _selu,
    "relie": _relie,
    "plse": _plse,
    "hardtan": lambda x: torch.clamp(x, -1, 1),
    "lhtan": _lhtan,
    "ramp": _ramp,
    "leaky": _leaky,
    "tanh": torch.tanh,
    "stair": _stair,
    "swish": lambda x: x * torch.sigmoid(x),
    "mish": _mish,
    "hard_mish": _hard_mish,
    "gelu": _gelu,
}


class Activation(torch.nn.Module):
    """A named darknet activation as a module, so it prints and scripts like one."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name
