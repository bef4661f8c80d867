"""Precision as a pluggable GEMM backend of the grouped layers: the one recipe registry.

- :mod:`.base`: the protocol (:class:`GemmBackend`), the operand records and the
  save/load helpers of the layers' backward records;
- :mod:`.bf16`: identity (the parameters' dtype);
- :mod:`.fp8`: ``torch._scaled_grouped_mm`` on sm90+;
- :mod:`.emulated`: quantize, dequantize, fp32 GEMM (MXFP8, NVFP4, FP8 elsewhere).

A recipe (:class:`Recipe`) names its block size (features must be multiples of it) and
picks a backend per GEMM.  Adding a recipe means adding a backend file and one entry
in :data:`RECIPES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import fp8
from .base import GemmBackend
from .bf16 import BF16
from .emulated import EmulatedBackend

__all__ = ["Recipe", "RECIPES", "check_recipe", "backend_for", "GemmBackend"]


@dataclass(frozen=True)
class Recipe:
    """A low-precision recipe: its name, block size, and the backend of one GEMM
    (``select(x, K, N)``: the input ``x`` and the GEMM's in/out features)."""
    name: str
    block: int
    select: Callable[[torch.Tensor, int, int], GemmBackend]


_FP8, _FP8_EMULATED = fp8.Fp8Backend(), EmulatedBackend("fp8")

RECIPES: Dict[str, Recipe] = {
    "fp8": Recipe("fp8", 1, lambda x, K, N: _FP8 if fp8.applies(x, K, N) else _FP8_EMULATED),
    "mxfp8": Recipe("mxfp8", 32, lambda x, K, N, _b=EmulatedBackend("mxfp8"): _b),
    "nvfp4": Recipe("nvfp4", 16, lambda x, K, N, _b=EmulatedBackend("nvfp4"): _b),
}


def check_recipe(recipe: Optional[str], **features: int) -> Optional[str]:
    """Return ``recipe`` if it is ``None`` or a key of :data:`RECIPES`, else raise.

    ``features``: name -> size of each dimension the recipe quantizes in blocks; each
    must be a multiple of the recipe's block (MXFP8 32, NVFP4 16), else ``ValueError``
    naming it (caught at construction, not mid-backward)."""
    if recipe is None:
        return None
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; expected None or one of {tuple(RECIPES)}")
    block = RECIPES[recipe].block
    for name, size in features.items():
        if size % block:
            raise ValueError(f"recipe {recipe!r} quantizes in blocks of {block}: {name} must be a "
                             f"multiple of {block}, got {size}")
    return recipe


def backend_for(recipe: Optional[str], x: torch.Tensor, K: int, N: int) -> GemmBackend:
    """The backend running one ``(T, K) x (K, N)`` grouped GEMM of ``x`` in ``recipe``."""
    if recipe is None:
        return BF16
    return RECIPES[check_recipe(recipe)].select(x, K, N)
