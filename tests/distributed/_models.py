"""Tiny models shared by the distributed tests."""
from __future__ import annotations

import torch
from torch import nn

from moe_offload.ops import MoE


class Block(nn.Module):
    """Pre-norm residual block: ``x + proj(norm(x))`` then ``x + moe(norm(x))``."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, ep_group=None,
                 device=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, device=device)
        self.proj = nn.Linear(hidden, hidden, device=device)
        self.norm2 = nn.LayerNorm(hidden, device=device)
        self.moe = MoE(hidden, ffn, num_experts, top_k, ep_group=ep_group, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.proj(self.norm1(x)))
        return x + self.moe(self.norm2(x))


class Stack(nn.Module):
    """``blocks`` (an ``nn.ModuleList``) applied in turn."""

    def __init__(self, num_blocks: int, *args, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(*args, **kwargs) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def aux_loss(self) -> torch.Tensor:
        """Sum of the blocks' MoE load-balancing losses of the last forward."""
        return sum(blk.moe.aux_loss for blk in self.blocks)
