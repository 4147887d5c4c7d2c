"""Write darknet .weights with random but sane values, for timing networks without trained weights.

Timing does not depend on weight values, but a peer may special-case zeros or NaN/inf, and a
deep net with raw He-initialised weights can overflow to inf (then NMS sees garbage). So convs
get He-scaled normals and batch-norm statistics are calibrated on a random batch, like a trained
net whose activations stay of order 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import detkit
from detkit.weights import save_darknet_weights


def randomize(model: detkit.Model, seed: int = 0, size: tuple[int, int] | None = None) -> None:
    """He-normal conv/linear weights, small biases, BN statistics of a random input batch."""
    gen = torch.Generator().manual_seed(seed)
    norms = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen)
                                    * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.2)
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.fill_(1.0)
                module.bias.copy_((torch.rand(module.bias.shape, generator=gen) - 0.5) * 0.2)
                module.momentum = 1.0
                norms.append(module)
        w, h = size or model.input_size
        model.train()
        model(torch.rand(2, model.input_channels, h, w, generator=gen))
        model.eval()
        for m in norms:
            m.momentum = 0.01


def write_random_weights(cfg: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Random sane weights for `cfg` at `out` (written atomically by detkit); checked finite."""
    model = detkit.load_model(cfg)
    randomize(model, seed)
    with torch.no_grad():
        w, h = model.input_size
        preds = model(torch.rand(1, model.input_channels, h, w))
    if not torch.isfinite(preds).all():
        raise RuntimeError(f"random weights for {cfg} give non-finite outputs")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_darknet_weights(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cfg", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_random_weights(args.cfg, args.out, args.seed)


if __name__ == "__main__":
    main()
