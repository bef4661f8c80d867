"""Grouped expert layers and their autograd functions.

- :class:`GroupedLinear`: one linear layer per contiguous row group.
- :class:`GroupedMLP`: fused grouped ``fc1 -> activation (* probs) -> fc2``.
- :class:`MoE`: top-k router + ``GroupedMLP`` experts, no host sync.
- :func:`linear_cross_entropy` / :func:`causal_lm_loss`: chunked LM head + cross-entropy
  (never all logits at once; HF's causal-LM loss semantics).

Precision is a GEMM backend (:mod:`.gemm`: bf16, fp8, emulated), not a second layer;
:mod:`.grouped_gemm` wraps ``torch._grouped_mm``.
"""
from .grouped_linear import GroupedLinear
from .grouped_mlp import GroupedMLP
from .linear_cross_entropy import causal_lm_loss, linear_cross_entropy
from .moe import MoE

__all__ = ["GroupedLinear", "GroupedMLP", "MoE", "causal_lm_loss", "linear_cross_entropy"]
