"""Device selection shared by the trainers (the text environments use the same rule)."""

from textenv.device import resolve_device

__all__ = ["resolve_device"]
