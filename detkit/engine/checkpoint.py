"""The one home of checkpoints: detkit .pt files written atomically and loaded with
weights_only=True (never runs code), and loading a model from a cfg plus darknet .weights or a
.pt. Training saves and resumes through here; detect, eval, export and the Python API load
through load_model."""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from ..errors import WeightsError
from ..model import Model, model_from_cfg
from ..weights import atomic_write_bytes, load_darknet_weights


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to memory, then temp file + fsync + rename: a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(Path(path), buffer.getvalue())
    except OSError as exc:  # disk full, folder removed or read-only: the old file is intact
        raise WeightsError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, not a checkpoint") from None
    except Exception as exc:  # pickle or zip errors from a damaged or foreign file
        raise WeightsError(f"{path}: not a loadable detkit checkpoint ({why_unloadable(path, exc)})"
                           ) from None


def why_unloadable(path: Path, exc: Exception) -> str:
    """torch.load's failure in one line. Its weights_only message runs to a dozen lines and
    advises weights_only=False, which would run code from the file: never pass that on."""
    try:
        if Path(path).stat().st_size == 0:
            return "the file is empty"
    except OSError:
        pass
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (f"it holds a Python object ({unsafe.group(1)}), not only tensors; detkit loads "
                "checkpoints with weights_only=True and never runs code from a file")
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects, not only tensors (weights_only=True refuses them)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first or type(exc).__name__


def load_checkpoint_into(model: Model, path: Path) -> None:
    """Load a detkit .pt (training checkpoint or plain state dict) into `model`; must fit."""
    state = load_checkpoint(path)
    is_training_checkpoint = isinstance(state, dict) and "model" in state
    # a training checkpoint holds the EMA weights when EMA was on; they are the ones to deploy
    weights = (state.get("ema") or state["model"]) if is_training_checkpoint else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: does not fit this cfg (missing {len(missing)} tensors, "
                           f"unexpected {len(unexpected)}; first: {(missing or unexpected)[0]})")


def load_weights(model: Model, weights: str | Path, cutoff: int | None = None) -> None:
    """Load darknet .weights, or a detkit checkpoint (.pt/.pth, loaded with weights_only=True)."""
    path = Path(weights)
    if path.suffix in (".pt", ".pth"):
        load_checkpoint_into(model, path)
    else:
        load_darknet_weights(model, path, cutoff=cutoff)


def load_model(cfg: str | Path, weights: str | Path | None = None, device: str = "cpu",
               cutoff: int | None = None) -> Model:
    """Build the network of a .cfg, load darknet .weights (or a detkit .pt) and put it in eval mode."""
    model = model_from_cfg(cfg)
    if weights is not None:
        load_weights(model, weights, cutoff=cutoff)
    return model.to(device).eval()
