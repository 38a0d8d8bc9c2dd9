"""Device selection for the envs and the trainers (torch only: cheap to import)."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a one-line error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return device
