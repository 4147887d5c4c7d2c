"""Loading a detkit .pt checkpoint (or plain state dict) into a model."""

from __future__ import annotations

from pathlib import Path

from .engine.checkpoint import load_checkpoint
from .errors import WeightsError


def load_checkpoint_into(model, path: Path) -> None:
    state = load_checkpoint(path)
    is_training_checkpoint = isinstance(state, dict) and "model" in state
    # a training checkpoint holds the EMA weights when EMA was on; they are the ones to deploy
    weights = (state.get("ema") or state["model"]) if is_training_checkpoint else state
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: does not fit this cfg (missing {len(missing)} tensors, "
                           f"unexpected {len(unexpected)}; first: {(missing or unexpected)[0]})")
