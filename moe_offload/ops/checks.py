"""Argument and input checks shared by the grouped layers (clear errors naming the argument)."""
from __future__ import annotations

import torch

__all__ = ["check_int", "check_grouped_input"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``.

    Raises ``TypeError`` for a non-integer (``2.0`` included: a float size is a bug at
    the call site) and ``ValueError`` below ``minimum``, both naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_grouped_input(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``x`` if it cannot feed a grouped layer."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (T, {in_features}), got shape {tuple(x.shape)}")
    if x.shape[1] != in_features:
        raise ValueError(f"x has {x.shape[1]} features, expected in_features={in_features}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} does not match weight dtype {weight.dtype}")
    if x.device != weight.device:
        raise TypeError(f"x device {x.device} does not match weight device {weight.device}")
