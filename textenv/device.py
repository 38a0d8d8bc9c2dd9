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
        raise ValueError(
            f"device {name!r} was asked for but no CUDA GPU is available (use --device cpu or auto)"
        )
    return device


def set_torch_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for this process (``None`` or ``0``: leave it as it is).

    torch's default is one thread per core, and its threads spin while they wait for each
    other: when another process holds a core, a text iteration runs 15-70 times slower (see
    ``benchmarks/results/busy_cpu.md``). One thread never oversubscribes a shared machine.
    """
    if threads is None or threads == 0:
        return
    if threads < 0:
        raise ValueError(f"torch_threads must be >= 0 (0: torch's default), got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
