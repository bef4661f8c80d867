"""The layers of the synthetic stacks (built into workloads by
:mod:`~moe_offload.bench.workloads`): ``L`` expert layers run as ``x = layer(x)``.

Shape legend: ``T`` tokens, ``H`` hidden, ``F`` ffn hidden, ``X = 2F`` fc1 width,
``E`` experts (= groups ``G``), ``L`` layers.

- ``fused``: our :class:`~moe_offload.ops.grouped_mlp.GroupedMLP` (one autograd op per
  layer; saves ``x`` and the fc1 output, recomputes SwiGLU).  Variants share the very
  same ``Parameter`` objects: ``fused/fc1`` (``recompute="fc1"``: saves only ``x``) and
  ``fused/<recipe>`` (FP8 & co).
- ``unfused``: the peers' stack, ``torch._grouped_mm(x, w1) -> silu(a) * b ->
  torch._grouped_mm(., w2)`` composed with plain autograd (saves ``x``, the fc1 output,
  ``silu(a)``/``a``/``b`` intermediates and the activation).  Its weights are copies of
  the fused ones in the peers' ``(E, K, N)`` layout, so both stacks compute the same
  function.
- ``moe``: a stack of full :class:`~moe_offload.ops.moe.MoE` blocks (router included).

Stacks have no norm and no residual: gradients are deterministic functions of the
weights and inputs, so two strategies can be compared bitwise.  Split sizes stay on the
device (a host sync in the MoE path is what we avoid).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UnfusedSwiGLU", "FusedLayer", "MoELayer", "make_split_sizes"]


def make_split_sizes(tokens: int, experts: int, kind: str, seed: int,
                     device: torch.device) -> torch.Tensor:
    """Tokens per expert as an int64 tensor on ``device`` summing to ``tokens``.

    ``uniform``: as even as possible; ``random``: each token draws an expert (seeded)."""
    if kind == "uniform":
        sizes = torch.full((experts,), tokens // experts, dtype=torch.int64)
        sizes[: tokens % experts] += 1
    elif kind == "random":
        gen = torch.Generator().manual_seed(seed)
        choice = torch.randint(0, experts, (tokens,), generator=gen)
        sizes = torch.bincount(choice, minlength=experts).to(torch.int64)
    else:
        raise ValueError(f"unknown split kind {kind!r}; expected 'uniform' or 'random'")
    return sizes.to(device)


class UnfusedSwiGLU(nn.Module):
    """The peers' unfused grouped SwiGLU expert MLP on device offsets ``offs_G``.

    ``w1_EHX`` ``(E, H, 2F)`` and ``w2_EFH`` ``(E, F, H)``; the gate is the first half of
    the fc1 output (as in ``GroupedMLP``)."""

    def __init__(self, w1_EHX: torch.Tensor, w2_EFH: torch.Tensor, offs_G: torch.Tensor):
        super().__init__()
        self.w1_EHX = nn.Parameter(w1_EHX)
        self.w2_EFH = nn.Parameter(w2_EFH)
        self.offs_G = offs_G

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """``fc2(silu(a) * b)`` with ``[a | b] = fc1(x)`` per expert."""
        h_TX = torch._grouped_mm(x_TH, self.w1_EHX, self.offs_G)
        a_TF, b_TF = h_TX.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(a_TF) * b_TF, self.w2_EFH, self.offs_G)


class FusedLayer(nn.Module):
    """A :class:`GroupedMLP` bound to the stack's device offsets: ``forward(x)``.

    Like the unfused stack (and like ``MoE``, which routes once per block), the int32
    offsets are computed once on the device and shared by every layer
    (``GroupedMLP.forward_offsets``; the split sizes sum to ``T``, so they cover every
    row)."""

    def __init__(self, mlp: nn.Module, offs_G: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        self.offs_G = offs_G

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """Grouped MLP of ``x`` on the bound offsets."""
        return self.mlp.forward_offsets(x_TH, self.offs_G, covered=True)


class MoELayer(nn.Module):
    """A full MoE block; its backward includes its load-balancing loss (``MoE`` attaches
    it to its output)."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The block's output (its backward also back-propagates the aux loss)."""
        out = self.moe(x_TH)
        return out[0] if isinstance(out, (tuple, list)) else out
