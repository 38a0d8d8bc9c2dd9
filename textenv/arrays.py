"""Small helpers the vector envs share: reset masks and the torch/numpy choice of outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def selected_rows(reset_mask: Any, num_envs: int) -> list[int]:
    """The rows ``options["reset_mask"]`` selects (all of them when it is absent)."""
    if reset_mask is None:
        return list(range(num_envs))
    if isinstance(reset_mask, torch.Tensor):
        reset_mask = reset_mask.cpu().numpy()
    mask = np.asarray(reset_mask)
    if mask.shape != (num_envs,) or mask.dtype != np.bool_:
        raise ValueError(
            f"options['reset_mask'] must be {num_envs} booleans, "
            f"got shape {mask.shape} of {mask.dtype}"
        )
    if not mask.any():
        raise ValueError("options['reset_mask'] selects no row to reset")
    return np.flatnonzero(mask).tolist()


def as_arrays(x: Any, arrays: str) -> Any:
    """``x`` as the caller asked for it: tensors as they are (``"torch"``), or numpy arrays
    (recursively)."""
    if arrays == "torch":
        return x
    if isinstance(x, torch.Tensor):
        return x.cpu().numpy()
    if isinstance(x, dict):
        return {k: as_arrays(v, arrays) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(as_arrays(v, arrays) for v in x)
    return x


def row_seeds(seed: int | list[int], num_envs: int) -> list[int]:
    """One seed per row: ``seed + i`` for an int (row ``i`` then replays a single env seeded
    ``seed + i``), or the list given, which must have ``num_envs`` entries."""
    seeds = [seed + i for i in range(num_envs)] if isinstance(seed, int) else list(seed)
    if len(seeds) != num_envs:
        raise ValueError(f"expected {num_envs} seeds, got {len(seeds)}")
    return seeds
