"""Weights from other toolkits into detkit models: torchvision's ssd300_vgg16 -> cfg/ssd300-coco.cfg.

torchvision's state dict is matched to the cfg by order, not by name: its backbone convolutions
(VGG16 to conv5_3, fc6, fc7, the extra layers: registration order, which torch.save keeps) go to
the cfg's [convolutional] sections in cfg order, `backbone.scale_weight` to the [l2norm] section,
and `head.regression_head` / `head.classification_head` module i to the [ssd] head's loc / conf
predictor of source i. Every shape is checked, so a cfg that does not describe the same network
fails with the layer and key named, never loads half a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import WeightsError
from .heads.ssd import SSDHead
from .layers.conv import Convolutional
from .layers.l2norm import L2Norm

_HEAD_KEY = re.compile(r"head\.(regression|classification)_head\.module_list\.(\d+)\.(weight|bias)$")


@dataclass
class ConvertReport:
    convolutions: int
    l2norms: int
    head_sources: int
    tensors: int


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved by torch.save, or a training checkpoint holding one under 'model'.

    Loaded with weights_only=True: a file from elsewhere must never run code.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: state dict not found") from None
    except Exception as exc:  # torch raises several types for a file that is not a state dict
        raise WeightsError(f"{path}: not a loadable PyTorch state dict ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a model's state_dict)")
    return data


def torchvision_ssd_into(model, state: dict[str, torch.Tensor]) -> ConvertReport:
    """Copy a torchvision SSD-VGG16 state dict (ssd300_vgg16) into a detkit model in place."""
    convs = [layer for layer in model.layers if isinstance(layer, Convolutional)]
    norms = [layer for layer in model.layers if isinstance(layer, L2Norm)]
    heads = [layer for layer in model.layers if isinstance(layer, SSDHead)]
    if len(heads) != 1:
        raise WeightsError(f"the cfg needs exactly one [ssd] head for a torchvision SSD, has {len(heads)}")
    pairs = _backbone_pairs(state)
    if len(pairs) != len(convs):
        raise WeightsError(f"torchvision's backbone has {len(pairs)} convolutions, the cfg "
                           f"{len(convs)} [convolutional] sections")
    with torch.no_grad():
        for layer, (key, weight, bias) in zip(convs, pairs, strict=True):
            _copy_conv(layer, key, weight, bias)
        _copy_l2norm(norms, state)
        sources = _copy_head(heads[0], state)
    tensors = 2 * len(convs) + len(norms) + 4 * sources
    return ConvertReport(len(convs), len(norms), sources, tensors)


def _backbone_pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, weight, bias) of every backbone convolution, in the state dict's order."""
    pairs = []
    for key, value in state.items():
        if key.startswith("backbone.") and key.endswith(".weight") and value.dim() == 4:
            bias_key = key[: -len("weight")] + "bias"
            if bias_key not in state:
                raise WeightsError(f"torchvision key {bias_key} is missing")
            pairs.append((key, value, state[bias_key]))
    if not pairs:
        raise WeightsError("no 'backbone.*' convolutions: not a torchvision SSD state dict")
    return pairs


def _copy_conv(layer: Convolutional, key: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if layer.bn is not None:
        raise WeightsError(f"layer {layer.index} has batch_normalize=1; torchvision's SSD-VGG16 "
                           f"has no batch norm ({key})")
    _check_shape(layer.conv.weight, weight, f"layer {layer.index}", key)
    layer.conv.weight.copy_(weight)
    layer.conv.bias.copy_(bias)


def _copy_l2norm(norms: list[L2Norm], state: dict[str, torch.Tensor]) -> None:
    scale = state.get("backbone.scale_weight")
    if scale is None and not norms:
        return
    if scale is None or len(norms) != 1:
        raise WeightsError(f"torchvision's backbone.scale_weight needs exactly one [l2norm] "
                           f"section (the cfg has {len(norms)})")
    _check_shape(norms[0].weight, scale, f"layer {norms[0].index} [l2norm]", "backbone.scale_weight")
    norms[0].weight.copy_(scale)


def _copy_head(head: SSDHead, state: dict[str, torch.Tensor]) -> int:
    """Predictors source by source; the class columns follow the cfg's background index."""
    found: dict[tuple[str, int, str], torch.Tensor] = {}
    for key, value in state.items():
        match = _HEAD_KEY.match(key)
        if match:
            found[(match[1], int(match[2]), match[3])] = value
    sources = len(head.sources)
    for kind, convs in (("regression", head.loc), ("classification", head.conf)):
        count = len({i for (k, i, _) in found if k == kind})
        if count != sources:
            raise WeightsError(f"torchvision's {kind} head has {count} predictors, the [ssd] "
                               f"layer {sources} source layers")
        for i, conv in enumerate(convs):
            for name in ("weight", "bias"):
                value = found[(kind, i, name)]
                if kind == "classification":
                    value = _move_background(value, head.classes + 1, head.background)
                target = getattr(conv, name)
                _check_shape(target, value, f"layer {head.index} [ssd] source {i}",
                             f"head.{kind}_head.module_list.{i}.{name}")
                target.copy_(value)
    return sources


def _move_background(value: torch.Tensor, columns: int, background: int) -> torch.Tensor:
    """torchvision puts background at logit 0; move it to the cfg's `background` index."""
    if background == 0 or value.shape[0] % columns:
        return value
    order = list(range(1, background + 1)) + [0] + list(range(background + 1, columns))
    per_box = value.reshape(-1, columns, *value.shape[1:])
    return per_box[:, order].reshape(value.shape)


def _check_shape(target: torch.Tensor, value: torch.Tensor, where: str, key: str) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise WeightsError(f"{where} expects {tuple(target.shape)} but torchvision's {key} is "
                           f"{tuple(value.shape)}: the cfg does not describe this network")


def convert_torchvision_ssd(state_dict: str | Path, cfg: str | Path, out: str | Path) -> ConvertReport:
    """Build `cfg`, fill it from a torchvision ssd300_vgg16 state dict, write darknet .weights."""
    from .model import model_from_cfg
    from .weights import save_darknet_weights

    model = model_from_cfg(cfg)
    report = torchvision_ssd_into(model, load_state_dict(state_dict))
    save_darknet_weights(model, out)
    return report
