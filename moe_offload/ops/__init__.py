"""Grouped expert layers and their autograd functions.

- :class:`GroupedLinear`: one linear layer per contiguous row group.
- :class:`GroupedMLP`: fused grouped ``fc1 -> activation (* probs) -> fc2``.
- :class:`MoE`: top-k router + ``GroupedMLP`` experts, no host sync.

Precision is a GEMM backend (:mod:`.gemm`: bf16, fp8, emulated), not a second layer;
:mod:`.grouped_gemm` wraps ``torch._grouped_mm``.
"""
from .grouped_linear import GroupedLinear
from .grouped_mlp import GroupedMLP
from .moe import MoE

__all__ = ["GroupedLinear", "GroupedMLP", "MoE"]
