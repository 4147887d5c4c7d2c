"""Training checkpoints: written atomically, loaded with weights_only=True (never runs code)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ..errors import WeightsError
from ..weights import atomic_write_bytes


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to memory, then temp file + fsync + rename: a kill never leaves half a file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: checkpoint not found") from None
    except Exception as exc:  # pickle or zip errors from a damaged or foreign file
        raise WeightsError(f"{path}: not a loadable detkit checkpoint ({exc})") from None
